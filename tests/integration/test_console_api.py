"""The console's JSON API (/ui/api/) against a real gateway with a token file of every role:
status codes and messages together, the same validation, roles and audit as the CLI, and the
approval gate end to end (publish through the gateway, refused self-approval, a second
identity's approval, traffic checked with tritonclient)."""

from __future__ import annotations

import csv
import http.client
import io
import json

import pytest
from consolekit import (
    TOKENS,
    api,
    build_repository,
    cli,
    model_file,
    publish,
    served_versions,
    write_tokens,
)
from support import start_gateway

STATIC = ("index.html", "app.js", "style.css")


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    root = tmp_path_factory.mktemp("console_api")
    repo = build_repository(root / "repo")
    tokens = write_tokens(root / "tokens")
    with start_gateway(repo, "--auth-tokens", str(tokens)) as gateway:
        gateway.root = root
        yield gateway


@pytest.fixture(scope="module")
def open_gw(tmp_path_factory):
    """A gateway without --auth-tokens that lets this machine change things."""
    repo = build_repository(tmp_path_factory.mktemp("console_open") / "repo")
    with start_gateway(repo, "--console-allow-changes") as gateway:
        yield gateway


def raw_get(gw, path: str, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def overview_model(gw, name: str, who: str = "vera") -> dict:
    status, body = api(gw, "GET", "overview", who)
    assert status == 200, body
    return next(m for m in body["models"] if m["name"] == name)


def audit(gw, caller: str | None = "vera", **query) -> list[dict]:
    """Audit records; ``query``: the API's filters (who, model, action, section, limit)."""
    from urllib.parse import urlencode

    status, body = api(gw, "GET", "audit?" + urlencode(query), caller)
    assert status == 200, body
    return body["records"]


# ---- the page ---------------------------------------------------------------------------------

def test_the_page_is_served_whole_with_no_external_assets(gw):
    status, headers, _ = raw_get(gw, "/ui")
    assert (status, headers["Location"]) == (302, "/ui/")
    for name, kind in zip(STATIC, ("text/html", "text/javascript", "text/css")):
        status, headers, body = raw_get(gw, "/ui/" if name == "index.html" else f"/ui/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind), (name, headers)
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        text = body.decode()
        assert "http://" not in text and "https://" not in text, name  # works offline
    status, _, body = raw_get(gw, "/ui/secrets.txt")
    assert status == 404 and b"is not an endpoint of this server" in body


# ---- roles -------------------------------------------------------------------------------------

def test_every_api_call_needs_a_token_of_the_right_role(gw):
    status, body, headers = api(gw, "GET", "session", raw=True)
    assert (status, json.loads(body)["error"], headers["WWW-Authenticate"]) == \
        (401, "missing credentials: send 'authorization: Bearer TOKEN'", "Bearer")
    assert api(gw, "GET", "overview", headers={"Authorization": "Bearer not-a-valid-token"}) \
        == (401, {"error": "invalid token"})
    assert api(gw, "GET", "session", "app") == \
        (403, {"error": "this call needs the viewer role; the token has 'infer'"})
    for who, operate, approve in (("vera", False, False), ("olivia", True, False),
                                  ("bob", True, True)):
        status, session = api(gw, "GET", "session", who)
        assert status == 200
        assert (session["who"], session["role"], session["can_operate"],
                session["can_approve"], session["auth"]) == \
            (who, TOKENS[who][0], operate, approve, True)


def test_a_viewer_is_refused_changes_on_the_console_and_over_grpc(gw):
    assert api(gw, "POST", "models/split/split", "vera", {"weights": {"1": 50, "2": 50}}) == \
        (403, {"error": "this call needs the operator role; the token has 'viewer'"})
    assert api(gw, "POST", "models/split/rollout/abort", "vera", {}) == \
        (403, {"error": "this call needs the operator role; the token has 'viewer'"})
    assert api(gw, "POST", "models/gated/versions/2/approve", "olivia", {}) == \
        (403, {"error": "this call needs the admin role; the token has 'operator'"})
    refused = cli(gw, "traffic", "set", "split", "1=50", "2=50", who="vera")
    assert refused.returncode == 1
    assert "PERMISSION_DENIED: this call needs the operator role; the token has 'viewer'" in \
        refused.stderr
    shown = cli(gw, "traffic", "show", "split", who="vera")
    assert shown.returncode == 0 and "split:      (none" in shown.stdout


# ---- splits, shadows, the audit trail --------------------------------------------------------

@pytest.mark.parametrize("body, status, message", [
    ({"weights": {"1": 60, "2": 30}}, 400,
     "weights must sum to 100 (or to 1 as fractions); they sum to 90"),
    ({"weights": {"1": 50, "7": 50}}, 400,
     "model 'split' version 7 is not serving; serving versions: 1, 2"),
    ({"weights": {"1": "lots"}}, 400, "weight of version 1 must be a number, not 'lots'"),
    ({"weights": {"1": True}}, 400, "weight of version 1 must be a number"),
    ({"weights": {}}, 400, 'send {"weights": {"VERSION": PERCENT, ...}}'),
    ({"weights": {"1": -10, "2": 110}}, 400, "weight of version 1 must not be negative"),
    (b"{not json", 400, "the request body is not JSON"),
    (b"[1, 2]", 400, "the request body must be a JSON object"),
])
def test_a_refused_split_says_why_and_changes_nothing(gw, body, status, message):
    assert api(gw, "POST", "models/split/split", "olivia", body) == (status, {"error": message})
    assert overview_model(gw, "split")["split"] == {}


def test_changes_must_be_json_and_name_a_known_model(gw):
    assert api(gw, "POST", "models/split/split", "olivia", b"weights=1",
               headers={"Content-Type": "application/x-www-form-urlencoded"}) == \
        (400, {"error": "send changes as JSON (Content-Type: application/json)"})
    status, body = api(gw, "POST", "models/nope/split", "olivia", {"weights": {"1": 100}})
    assert status == 404 and "unknown model" in body["error"] and "'nope'" in body["error"]
    status, body = api(gw, "POST", "models/bad%20name/split", "olivia", {"weights": {"1": 100}})
    assert status == 400 and body["error"].startswith("invalid model name 'bad name'")


def test_a_split_set_on_the_console_is_served_shown_by_the_cli_and_audited(gw):
    status, body = api(gw, "POST", "models/split/split", "olivia",
                       {"weights": {"1": 20, "2": 80}})
    assert (status, body) == (200, {"ok": True, "message": "model split: split 1=20% 2=80%"})
    shown = cli(gw, "traffic", "show", "split", who="vera")
    assert "split:      1=20% 2=80%" in shown.stdout, shown.stdout
    counts = served_versions(gw, "split", 300)
    assert set(counts) == {"1", "2"} and 180 <= counts["2"] <= 290, counts
    model = overview_model(gw, "split")
    assert model["split"] == {"1": 20.0, "2": 80.0}
    assert model["effective"] == {"1": 20.0, "2": 80.0}
    assert {v["version"]: v["traffic"] for v in model["versions"]} == {"1": 20.0, "2": 80.0}
    record = audit(gw, model="split", action="set")[-1]
    assert (record["who"], record["action"], record["section"]) == ("olivia", "set", "traffic")
    assert record["summary"].endswith("-> 1=20% 2=80%")
    assert record["new"]["weights"] == {"1": 20.0, "2": 80.0}
    # Shadows, with the CLI's validation.
    assert api(gw, "POST", "models/split/shadow", "olivia", {"version": "1", "percent": 500}) \
        == (400, {"error": "shadow percent must be above 0 and at most 100"})
    assert api(gw, "POST", "models/split/shadow", "olivia", {"version": "1", "percent": 5}) == \
        (200, {"ok": True, "message": "model split: 1=20% 2=80%, shadow 1 at 5%"})
    assert overview_model(gw, "split")["shadow"] == {"version": "1", "percent": 5.0}
    assert api(gw, "POST", "models/split/unshadow", "olivia", {})[0] == 200
    assert api(gw, "POST", "models/split/clear", "olivia", {})[0] == 200
    assert overview_model(gw, "split")["split"] == {}


def test_the_audit_trail_filters_and_exports_as_csv_and_jsonl(gw):
    api(gw, "POST", "models/split/split", "olivia", {"weights": {"1": 50, "2": 50}})
    api(gw, "POST", "models/split/clear", "olivia", {})
    everything = audit(gw, limit=10000)
    assert everything and all(r["who"] for r in everything)
    by_olivia = audit(gw, who="olivia", model="split")
    assert by_olivia and {r["who"] for r in by_olivia} == {"olivia"}
    assert {r["action"] for r in audit(gw, action="clear", model="split")} == \
        {"clear", "clear-shadow"}  # a part of the action's name
    assert audit(gw, who="nobody-at-all") == []
    last_two = audit(gw, model="split", limit=2)
    assert [r["action"] for r in last_two] == ["set", "clear"]
    status, body, headers = api(gw, "GET", "audit?model=split&format=csv", "vera", raw=True)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert headers["Content-Disposition"] == 'attachment; filename="gateway-audit.csv"'
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert rows[0].keys() == {"time", "revision", "who", "section", "model", "action", "old",
                              "new", "summary"}
    assert rows[-1]["action"] == "clear" and rows[-1]["who"] == "olivia"
    assert json.loads(rows[-1]["old"]) == {"weights": {"1": 50.0, "2": 50.0}, "shadow": None}
    status, body, headers = api(gw, "GET", "audit?model=split&format=jsonl", "vera", raw=True)
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert status == 200 and lines[-1]["action"] == "clear"
    assert len(lines) == len(rows)
    assert api(gw, "GET", "audit?format=xml", "vera") == \
        (400, {"error": "format 'xml' is not json, jsonl or csv"})
    assert api(gw, "GET", "audit?limit=0", "vera") == \
        (400, {"error": "limit must be between 1 and 10000"})


# ---- rollouts ------------------------------------------------------------------------------------

def test_a_rollout_started_paused_resumed_and_aborted_from_the_console(gw):
    assert api(gw, "POST", "models/split/rollout", "olivia", {"to": "2", "steps": "5,200"}) == \
        (400, {"error": "steps must be increasing percentages in (0, 100]"})
    status, body = api(gw, "POST", "models/split/rollout", "olivia",
                       {"to": "2", "from": "1", "steps": "10,50,100", "interval": 600})
    assert (status, body["message"]) == \
        (200, "model split: rollout to version 2 started at 10% (baseline 1)")
    rollout = overview_model(gw, "split")["rollout"]
    assert (rollout["state"], rollout["percent"], rollout["steps"], rollout["to"]) == \
        ("running", 10.0, [10.0, 50.0, 100.0], "2")
    assert rollout["canary"]["requests"] == 0 and rollout["step_remaining_s"] > 500
    assert api(gw, "POST", "models/split/split", "olivia", {"weights": {"1": 100}}) == \
        (400, {"error": "model 'split' has a running rollout to version 2 (canary at 10%), "
                        "which owns its split: abort it first (gateway rollout abort split) or "
                        "force the change (--force aborts the rollout)"})
    for verb, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        status, body = api(gw, "POST", f"models/split/rollout/{verb}", "olivia", {})
        assert status == 200 and body["message"].startswith(f"model split: rollout {state}")
    assert api(gw, "POST", "models/split/rollout/pause", "olivia", {}) == \
        (400, {"error": "the rollout of model 'split' already ended (aborted)"})
    model = overview_model(gw, "split")
    assert model["rollout"]["state"] == "aborted"
    assert [e["event"] for e in model["rollout"]["history"]] == \
        ["start", "pause", "resume", "aborted"]
    actions = [r["action"] for r in audit(gw, model="split", section="rollouts")]
    assert actions[-4:] == ["rollout-start", "rollout-pause", "rollout-resume",
                            "rollout-aborted"]
    api(gw, "POST", "models/split/clear", "olivia", {})


# ---- the approval gate -------------------------------------------------------------------------

def test_the_approval_gate_end_to_end(gw, tmp_path):
    model = overview_model(gw, "gated")
    assert model["gated"] and "holds traffic on version 1" in model["held"]
    assert served_versions(gw, "gated", 40) == {"1": 40}
    version = publish(gw, "gated", model_file(tmp_path, seed=3), who="alice")
    assert version == "3"
    assert served_versions(gw, "gated", 40) == {"1": 40}  # published: still held
    v3 = next(v for v in overview_model(gw, "gated")["versions"] if v["version"] == "3")
    assert v3["lineage"]["published_by"] == "alice" and v3["approval"] is None
    gate = ("model 'gated' requires approval (gateway.yaml require_approval): version 3 is not "
            "approved, so {what} cannot give it traffic; someone other than the publisher must "
            "approve first (gateway approve gated 3, or the console)")
    assert api(gw, "POST", "models/gated/split", "olivia", {"weights": {"1": 50, "3": 50}}) == \
        (400, {"error": gate.format(what="this split")})
    assert api(gw, "POST", "models/gated/rollout", "olivia", {"to": "3"}) == \
        (400, {"error": gate.format(what="a rollout")})
    mine = "alice published version 3 of model 'gated' and cannot approve it: the approval " \
           "gate needs someone else"
    assert api(gw, "POST", "models/gated/versions/3/approve", "alice", {}) == \
        (403, {"error": mine})
    refused = cli(gw, "approve", "gated", "3", who="alice")
    assert refused.returncode == 1 and f"PERMISSION_DENIED: {mine}" in refused.stderr
    assert served_versions(gw, "gated", 40) == {"1": 40}
    status, body = api(gw, "POST", "models/gated/versions/3/approve", "bob", {})
    assert (status, body["message"]) == (200, "model gated version 3 approved by bob")
    assert (body["approval"]["publisher"], body["approval"]["gated"]) == ("alice", True)
    again = cli(gw, "approve", "gated", "3", who="bob")
    assert again.returncode == 0
    assert "model gated version 3 was already approved by bob" in again.stdout
    assert served_versions(gw, "gated", 40) == {"1": 40}  # an approval moves no traffic
    status, body = api(gw, "POST", "models/gated/rollout", "olivia",
                       {"to": "3", "steps": "20,100", "interval": 600})
    assert (status, body["message"]) == \
        (200, "model gated: rollout to version 3 started at 20% (baseline 1)")
    counts = served_versions(gw, "gated", 300)
    assert set(counts) == {"1", "3"} and 25 <= counts["3"] <= 110, counts
    records = audit(gw, model="gated", section="approvals")
    assert [(r["who"], r["action"]) for r in records] == [
        ("olivia", "gate-refused"), ("olivia", "gate-refused"), ("alice", "approve-refused"),
        ("alice", "approve-refused"), ("bob", "approve")]
    versions = {v["version"]: v["approval"] for v in overview_model(gw, "gated")["versions"]}
    assert versions["3"]["by"] == "bob" and versions["2"] is None
    api(gw, "POST", "models/gated/rollout/abort", "olivia", {})


# ---- without authentication --------------------------------------------------------------------

def test_without_auth_and_without_the_flag_the_console_is_read_only(tmp_path):
    repo = build_repository(tmp_path / "repo")
    with start_gateway(repo) as gw:
        status, session = api(gw, "GET", "session")
        assert (status, session["role"], session["can_operate"]) == (200, "viewer", False)
        assert "the console is read-only" in session["notice"]
        assert api(gw, "POST", "models/split/split", body={"weights": {"1": 50, "2": 50}},
                   headers={"Origin": f"http://{gw.http_url}"}) == (403, {"error": (
                       "the gateway runs without --auth-tokens, so the console is read-only; "
                       "start it with --auth-tokens, or with --console-allow-changes to change "
                       "from a browser on this machine")})


def test_without_auth_the_console_changes_only_from_this_machine(open_gw):
    status, session = api(open_gw, "GET", "session")
    assert (status, session["auth"], session["role"], session["can_operate"]) == \
        (200, False, "admin", True)
    assert "accepts changes only from a browser on this machine" in session["notice"]
    refusal = ("the gateway runs without --auth-tokens, so the console accepts changes only "
               "from a browser on this machine (localhost); start it with --auth-tokens to "
               "change from elsewhere")
    body = {"weights": {"1": 50, "2": 50}}
    for headers in ({"Origin": "http://evil.example"},  # a cross-site page
                    {"Host": "rebound.example:8000"}):  # DNS rebinding to 127.0.0.1
        assert api(open_gw, "POST", "models/split/split", body=body, headers=headers) == \
            (403, {"error": refusal})
    status, session = api(open_gw, "GET", "session", headers={"Host": "rebound.example"})
    assert (status, session["role"], session["can_operate"]) == (200, "viewer", False)
    status, answer = api(open_gw, "POST", "models/split/split", body=body,
                         headers={"Origin": f"http://{open_gw.http_url}"})
    assert (status, answer["message"]) == (200, "model split: split 1=50% 2=50%")
    record = audit(open_gw, caller=None, model="split")[-1]
    assert record["who"].startswith("ipv4:127.0.0.1:")
