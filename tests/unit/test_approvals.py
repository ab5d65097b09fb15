"""The approval gate (gateway/control/approvals.py) on a real file store and router, and the
roles of the token file (gateway/auth.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gateway.auth import GRANTS, TokenAuthenticator, parse_tokens, required_role
from gateway.control import ControlPlane, RolloutSpec, approvals
from gateway.control.filestore import FileStore
from gateway.errors import FailedPrecondition, NotFound, PermissionDenied
from gateway.events import Events
from gateway.repository import ModelEntry
from gateway.routing import Router


class Repository:
    """The seams the router and the gate read: a root directory with model directories (for
    gateway.yaml and metadata.json) and the serving versions."""

    def __init__(self, root, **models: list[str]):
        self.root = root
        self.models = {}
        self.events = Events()
        for name, versions in models.items():
            self.set_serving(name, versions)

    def set_serving(self, name: str, versions: list[str]) -> None:
        for v in versions:
            (self.root / name / v).mkdir(parents=True, exist_ok=True)
        entry = self.models.setdefault(name, ModelEntry(name))
        entry.serving = {v: SimpleNamespace(model=name, version=v) for v in versions}
        entry.latest = entry.serving[max(versions, key=int)] if versions else None
        self.events.emit("model_changed", name)

    def get(self, name):
        if name not in self.models:
            raise NotFound(f"unknown model '{name}'")
        return self.models[name]

    def version(self, name, version):
        entry = self.get(name)
        return entry.serving[version] if version else entry.latest

    def gate(self, name: str, on: bool = True) -> None:
        (self.root / name / "gateway.yaml").write_text(f"require_approval: {str(on).lower()}\n")

    def publisher(self, name: str, version: str, who: str) -> None:
        (self.root / name / version / "metadata.json").write_text(json.dumps(
            {"published_by": who, "publisher": "ci@build-host", "sha256": "ab" * 32}))


@pytest.fixture
def repo(tmp_path):
    repository = Repository(tmp_path / "repo", m=["1", "2"])
    repository.gate("m")
    return repository


@pytest.fixture
async def plane(tmp_path, repo):
    control = ControlPlane(FileStore(tmp_path / "state", poll_interval=0.05), Router(repo))
    repo.events.subscribe(model_changed=control.traffic.model_changed)  # as the server does
    await control.refresh()
    return control


def served(plane) -> dict[str, float]:
    return plane.router.effective("m")[0]


async def test_a_gated_model_holds_traffic_on_what_serves_until_a_version_is_approved(plane,
                                                                                         repo):
    assert served(plane) == {"1": 100.0}  # none approved: the oldest serving version
    assert "holds traffic on version 1" in approvals.held(plane.snapshot, plane.router, "m")
    repo.set_serving("m", ["1", "2", "3"])  # a new version loads: it gets nothing
    assert served(plane) == {"1": 100.0}
    repo.gate("m", False)
    repo.set_serving("m", ["1", "2", "3"])
    assert served(plane) == {"3": 100.0}  # without the gate the newest serves


async def test_splits_that_give_a_new_unapproved_version_traffic_are_refused_and_audited(plane):
    with pytest.raises(approvals.ApprovalRequired) as info:
        await plane.traffic.set_split("m", {"1": 90, "2": 10}, "olivia")
    assert info.value.code == "FAILED_PRECONDITION"
    assert info.value.message.startswith(
        "model 'm' requires approval (gateway.yaml require_approval): version 2 is not "
        "approved, so this split cannot give it traffic")
    assert "gateway approve m 2" in info.value.message
    assert served(plane) == {"1": 100.0}
    record = (await plane.history("m", 10))[-1]
    assert (record["who"], record["action"], record["section"]) == \
        ("olivia", "gate-refused", "approvals")
    # Shadows are not live traffic: allowed.
    await plane.traffic.set_shadow("m", "2", 5, "olivia")
    assert served(plane) == {"1": 100.0}


async def test_the_publisher_cannot_approve_and_a_second_identity_can(plane, repo):
    repo.publisher("m", "2", "alice")
    with pytest.raises(PermissionDenied) as info:
        await approvals.approve(plane, "m", "2", "alice")
    assert info.value.message == ("alice published version 2 of model 'm' and cannot approve "
                                  "it: the approval gate needs someone else")
    refused = (await plane.history("m", 10))[-1]
    assert (refused["who"], refused["action"]) == ("alice", "approve-refused")
    approval = await approvals.approve(plane, "m", "2", "bob")
    assert (approval["by"], approval["publisher"], approval["already"], approval["gated"]) == \
        ("bob", "alice", False, True)
    # Approving does not move traffic: the version serving now is pinned in the same commit.
    assert served(plane) == {"1": 100.0}
    records = await plane.history("m", 10)
    assert [r["action"] for r in records[-2:]] == ["approve", "approval-hold"]
    assert records[-2]["summary"] == "version 2 approved by bob (published by alice)"
    assert "an approval does not move traffic" in records[-1]["summary"]
    again = await approvals.approve(plane, "m", "2", "carol")
    assert (again["by"], again["already"]) == ("bob", True)
    await plane.traffic.set_split("m", {"1": 50, "2": 50}, "olivia")
    assert served(plane) == {"1": 50.0, "2": 50.0}


async def test_without_auth_an_address_cannot_approve_what_it_published(plane, repo):
    repo.publisher("m", "2", "ipv4:10.0.0.5:40022")
    with pytest.raises(PermissionDenied) as info:
        await approvals.approve(plane, "m", "2", "ipv4:10.0.0.5:51000")
    assert "callers are known only by their address" in info.value.message
    await approvals.approve(plane, "m", "2", "ipv4:10.0.0.6:51000")


async def test_approve_refuses_unknown_versions_and_bad_numbers(plane):
    with pytest.raises(NotFound) as info:
        await approvals.approve(plane, "m", "9", "bob")
    assert info.value.message == "model 'm' has no version 9 in the repository"
    with pytest.raises(Exception) as info:
        await approvals.approve(plane, "m", "x", "bob")
    assert info.value.code == "INVALID_ARGUMENT"


async def test_rolling_back_to_an_older_version_is_never_blocked(plane, repo):
    await approvals.approve(plane, "m", "2", "bob")
    await plane.traffic.set_split("m", {"2": 100}, "olivia")
    repo.set_serving("m", ["1", "2", "3"])
    await plane.traffic.set_split("m", {"1": 100}, "olivia")  # 1 was never approved: older
    with pytest.raises(approvals.ApprovalRequired):
        await plane.traffic.set_split("m", {"1": 90, "3": 10}, "olivia")


async def test_rollouts_start_only_for_an_approved_canary(plane):
    spec = RolloutSpec("m", "2", "1", steps=(10.0, 100.0), interval_s=30, min_requests=0)
    with pytest.raises(approvals.ApprovalRequired) as info:
        await plane.rollouts.start(spec, "olivia")
    assert "so a rollout cannot give it traffic" in info.value.message
    assert plane.rollouts.active("m") is None
    await approvals.approve(plane, "m", "2", "bob")
    rollout = await plane.rollouts.start(spec, "olivia")
    assert (rollout.state, rollout.percent) == ("running", 10.0)
    assert served(plane) == {"1": 90.0, "2": 10.0}


async def test_a_step_the_gate_blocks_pauses_the_rollout(tmp_path, repo):
    repo.gate("m", False)
    clock = SimpleNamespace(now=1000.0)
    control = ControlPlane(FileStore(tmp_path / "state", clock=lambda: clock.now),
                           Router(repo))
    repo.events.subscribe(model_changed=control.traffic.model_changed)
    await control.refresh()
    spec = RolloutSpec("m", "2", "1", steps=(10.0, 50.0, 100.0), interval_s=30,
                       min_requests=0)
    await control.rollouts.start(spec, "olivia")
    repo.gate("m", True)  # turned on mid-rollout, version 2 not approved
    clock.now += 31
    await control.rollouts.tick()
    rollout = control.rollouts.status("m")
    assert (rollout.state, rollout.percent) == ("paused", 10.0)
    assert "version 2 is not approved, so the next step cannot give it traffic" in rollout.reason
    assert rollout.history[-1]["event"] == "gate"


def test_a_gateway_yaml_that_cannot_be_read_keeps_the_last_setting(repo, caplog):
    assert approvals.gated(repo, "m")
    (repo.root / "m" / "gateway.yaml").write_text("require_approval: [\n")
    assert approvals.gated(repo, "m")
    assert "the approval gate stays on" in caplog.text
    (repo.root / "m" / "gateway.yaml").write_text("require_approval: yes please\n")
    assert approvals.gated(repo, "m")
    assert "require_approval must be true or false" in caplog.text
    (repo.root / "m" / "gateway.yaml").unlink()
    assert not approvals.gated(repo, "m")


def test_identities_compare_without_ports_and_annotations():
    assert approvals.identity("alice (publish: hold traffic on version 1)") == "alice"
    assert approvals.identity("ipv4:10.0.0.5:40022") == "10.0.0.5"
    assert approvals.identity("ipv6:[::1]:40022") == "::1"
    assert approvals.identity("Alice") == approvals.identity("alice")


# ---- roles --------------------------------------------------------------------------------------

ADMIN = "/gateway.admin.v1.GatewayAdmin/"
INFER = "/inference.GRPCInferenceService/"


def test_each_method_needs_the_least_role_that_may_call_it():
    assert required_role(ADMIN + "GetTraffic") == "viewer"
    assert required_role(ADMIN + "TrafficHistory") == "viewer"
    assert required_role(ADMIN + "SetTraffic") == "operator"
    assert required_role(ADMIN + "AbortRollout") == "operator"
    assert required_role(ADMIN + "ApproveVersion") == "admin"
    assert required_role(ADMIN + "PublishVersion") == "admin"
    assert required_role(ADMIN + "SomethingAddedLater") == "admin"  # deny by default
    assert required_role(INFER + "ModelInfer") == "infer"
    assert required_role(INFER + "RepositoryModelLoad") == "admin"
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert GRANTS["operator"] >= GRANTS["viewer"] | GRANTS["infer"]
    assert GRANTS["admin"] >= GRANTS["operator"]


def test_tokens_of_every_role_and_their_refusals(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("viewer viewer-token-0123456789 vera\noperator operator-token-012345 olivia\n"
                    "admin admin-token-0123456789ab alice\ninfer infer-token-0123456789ab app\n")
    auth = TokenAuthenticator(path)

    def call(method, secret):
        return auth.check(method, (("authorization", f"Bearer {secret}"),))

    assert call(ADMIN + "GetTraffic", "viewer-token-0123456789").name == "vera"
    with pytest.raises(PermissionDenied) as info:
        call(ADMIN + "SetTraffic", "viewer-token-0123456789")
    assert info.value.message == "this call needs the operator role; the token has 'viewer'"
    with pytest.raises(PermissionDenied) as info:
        call(INFER + "ModelInfer", "viewer-token-0123456789")
    assert info.value.message == "this call needs the infer role; the token has 'viewer'"
    assert call(ADMIN + "SetTraffic", "operator-token-012345").name == "olivia"
    assert call(INFER + "ModelInfer", "operator-token-012345").name == "olivia"
    with pytest.raises(PermissionDenied) as info:
        call(ADMIN + "ApproveVersion", "operator-token-012345")
    assert info.value.message == "this call needs the admin role; the token has 'operator'"
    assert call(ADMIN + "ApproveVersion", "admin-token-0123456789ab").name == "alice"
    with pytest.raises(PermissionDenied) as info:
        call(ADMIN + "GetTraffic", "infer-token-0123456789ab")
    assert info.value.message == "this call needs the viewer role; the token has 'infer'"


def test_token_files_of_before_keep_working_and_unknown_roles_are_named():
    assert [c.role for c in parse_tokens("infer a-token-of-16-chars\nadmin b-token-of-16-chars x\n")] \
        == ["infer", "admin"]
    with pytest.raises(ValueError) as info:
        parse_tokens("superuser a-token-of-16-chars\n")
    assert str(info.value) == ("line 1: expected 'ROLE TOKEN [NAME]' with ROLE one of infer, "
                               "viewer, operator, admin")


def test_a_failed_precondition_is_what_the_gate_raises():
    assert issubclass(approvals.ApprovalRequired, FailedPrecondition)
