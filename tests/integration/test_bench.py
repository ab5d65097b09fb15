"""The bench suite (``python -m bench``) run briefly against a real gateway.

Checks what the report says, not how fast anything is: fields and their consistency, errors
counted by gRPC status (by HTTP status over REST), versions counted from responses, the plot
file. The one timing check is open-loop pacing: the suite must send at the rate it was asked for
(it paces itself, so this holds whatever the machine's load).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from support import ROOT, make_pki, start_gateway

DEMO_MLP = ROOT / "gateway" / "demo_repository" / "tiny_mlp" / "1" / "model.onnx"
FAST = ("--warmup", "0.3", "--window", "0.5", "--clients", "2", "--plain")

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def bench(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_json(tmp_path, *args) -> dict:
    out = tmp_path / "run.json"
    result = bench(*args, "--json", out, *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def gateway():
    with start_gateway() as gw:  # the bundled demo repository
        yield gw


@pytest.fixture(scope="module")
def sweep(gateway, tmp_path_factory):
    """One closed-loop sweep against the gateway and the bare floor, with the in-process limit."""
    out = tmp_path_factory.mktemp("bench")
    plot = ("--plot", out / "sweep.png") if HAVE_MATPLOTLIB else ()
    result = bench("--url", gateway.url, "--model", "tiny_mlp", "--concurrency", "1,4",
                   "--max-windows", "4", "--compare", "floor", "--limit", "--model-file", DEMO_MLP,
                   "--limit-seconds", "0.5", "--json", out / "sweep.json", *plot, *FAST)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "sweep.json").read_text()), result.stdout, out


def test_sweep_report_fields(sweep):
    doc, stdout, _ = sweep
    assert doc["model"] == "tiny_mlp" and doc["batch_size"] == 1
    assert doc["inputs"]["shapes"] == {"input": [1, 32]}
    assert [t["label"] for t in doc["targets"]] == ["gateway", "floor"]
    rows = {(r["target"], r["point"]): r for r in doc["rows"]}
    assert set(rows) == {(t, p) for t in ("gateway", "floor") for p in ("c=1", "c=4")}
    for (target, point), row in rows.items():
        assert row["mode"] == "closed" and row["concurrency"] == int(point[2:])
        assert row["requests"] > 0 and row["throughput_rps"] > 0
        assert row["errors"] == {} and row["error_count"] == 0
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert row["versions"] == {"1": row["requests"]}  # read from every response
        assert row["client"]["processes"] >= 1 and row["client"]["cpu_s"] > 0
        assert row["outcome"] in ("stable", "unstable") and 1 <= row["used_windows"] <= 3
        if target == "gateway":  # ModelStatistics before/after: queue vs compute
            server = row["server"]
            assert server["succeeded"] > 0 and server["failed"] == 0
            assert server["queue_us"] >= 0 and server["compute_us"] > 0
            assert server["batch_mean"] >= 1
        else:  # the floor offers no statistics
            assert row["server"] is None
    ratios = {(r["point"], r["of"], r["over"]) for r in doc["ratios"]}
    for point in ("c=1", "c=4"):
        assert (point, "gateway", "floor") in ratios
        assert (point, "gateway", "limit") in ratios
    limit = doc["limit"]
    assert limit["batch_size"] == 1 and limit["runs"] > 0 and limit["throughput_rps"] > 0
    assert len(doc["steps"]) == 4 and all(s["windows"] for s in doc["steps"])
    for word in ("p99 ms", "gateway", "floor", "gateway / floor", "limit: onnxruntime"):
        assert word in stdout


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_sweep_plot_written(sweep):
    _, _, out = sweep
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_unknown_model_counted_as_not_found(gateway, tmp_path):
    """Every request fails; a count bound makes the number exact. Data from a .npz file, since
    an unknown model has no metadata to build requests from."""
    data = tmp_path / "x.npz"
    np.savez(data, input=np.random.default_rng(0).random((10, 32), dtype=np.float32))
    doc = run_json(tmp_path, "--url", gateway.url, "--model", "no_such_model", "--input-data",
                   data, "--concurrency", "2", "--requests", "300")
    (row,) = doc["rows"]
    assert row["errors"] == {"NOT_FOUND": 300} and row["error_count"] == 300
    assert row["requests"] == 0 and row["latency_ms"] is None and row["versions"] == {}
    assert row["outcome"] == "count bound"
    assert doc["inputs"]["source"].startswith("x.npz")


def test_unknown_version_counted_as_not_found(gateway, tmp_path):
    doc = run_json(tmp_path, "--url", gateway.url, "--model", "tiny_mlp", "--model-version", "99",
                   "--concurrency", "2", "--duration", "0.5")
    (row,) = doc["rows"]
    assert set(row["errors"]) == {"NOT_FOUND"} and row["error_count"] > 0
    assert row["requests"] == 0


def test_open_loop_paces_at_the_asked_rate(gateway, tmp_path):
    """Constant arrivals at 80/s for 4 s from two processes: the suite sends at that rate and
    the gateway keeps up, whatever its latency. Sticky keys and an explicit version ride along.
    (5% of 320 requests is a 200 ms stall of the whole machine at the very end of the run.)"""
    doc = run_json(tmp_path, "--url", gateway.url, "--model", "tiny_mlp", "--rate", "80",
                   "--duration", "4", "--model-version", "1", "--routing-key-count", "3")
    (row,) = doc["rows"]
    windows = doc["steps"][0]["windows"]
    assert row["mode"] == "open" and row["rate"] == 80 and row["arrivals"] == "constant"
    assert row["sent_rps"] == pytest.approx(80, rel=0.05), windows
    assert row["completed_rps"] == pytest.approx(80, rel=0.05), windows
    assert row["errors"] == {} and row["versions"] == {"1": row["requests"]}
    assert row["send_lag_ms"] is not None  # how late the client sent is reported apart
    assert doc["plan"]["routing_keys"] == 3


def test_http_protocol_against_a_gateway_started_here(tmp_path):
    """``--protocol http --url gateway``: REST against a gateway the suite starts (its HTTP
    port) and the bare aiohttp floor, binary tensors (tritonclient.http's default) over the
    bench's own HTTP/1.1 client, from two client processes."""
    doc = run_json(tmp_path, "--protocol", "http", "--url", "gateway", "--model", "tiny_mlp",
                   "--concurrency", "1,4", "--duration", "1", "--compare", "floor")
    assert doc["protocol"] == "http" and doc["http"] == {"data": "binary", "client": "h1"}
    assert [(t["label"], t["protocol"]) for t in doc["targets"]] == [("gateway", "http"),
                                                                    ("floor", "http")]
    assert doc["inputs"]["shapes"] == {"input": [1, 32]}  # metadata and config over REST
    rows = {(r["target"], r["point"]): r for r in doc["rows"]}
    assert set(rows) == {(t, p) for t in ("gateway", "floor") for p in ("c=1", "c=4")}
    for (target, _), row in rows.items():
        assert row["requests"] > 0 and row["errors"] == {}
        assert row["versions"] == {"1": row["requests"]}  # read from every response's JSON
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
        if target == "gateway":  # statistics over REST (/v2/models/tiny_mlp/stats)
            assert row["server"]["succeeded"] > 0 and row["server"]["failed"] == 0
        else:
            assert row["server"] is None
    assert rows[("gateway", "c=4")]["client"]["processes"] == 2
    assert {(r["point"], r["of"], r["over"]) for r in doc["ratios"]} == {
        ("c=1", "gateway", "floor"), ("c=4", "gateway", "floor")}


def test_http_json_open_loop_with_aiohttp(gateway, tmp_path):
    """Plain JSON tensors through aiohttp's client, open loop, an explicit version and sticky
    keys, against a running gateway's REST port."""
    doc = run_json(tmp_path, "--protocol", "http", "--http-data", "json", "--http-client",
                   "aiohttp", "--url", gateway.http_url, "--model", "tiny_mlp", "--rate", "40",
                   "--duration", "1", "--model-version", "1", "--routing-key-count", "2")
    assert doc["http"] == {"data": "json", "client": "aiohttp"}
    (row,) = doc["rows"]
    assert row["mode"] == "open" and row["errors"] == {} and row["requests"] > 0
    assert row["versions"] == {"1": row["requests"]} and row["server"]["succeeded"] > 0


def test_http_errors_counted_by_status(gateway, tmp_path):
    data = tmp_path / "x.npz"
    np.savez(data, input=np.random.default_rng(0).random((10, 32), dtype=np.float32))
    doc = run_json(tmp_path, "--protocol", "http", "--url", gateway.http_url, "--model",
                   "no_such_model", "--input-data", data, "--concurrency", "2",
                   "--requests", "100")
    (row,) = doc["rows"]
    assert row["errors"] == {"HTTP_404": 100} and row["requests"] == 0


def test_http_with_a_token_over_mutual_tls(tmp_path):
    """A gateway with auth and mutual TLS on its HTTP port: the bench's TLS flags and token
    reach every REST call, from both HTTP clients."""
    make_pki(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text("admin bench-token-0123456789 bench\n")
    with start_gateway(None, "--auth-tokens", str(tokens), "--tls-cert",
                       str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
                       "--tls-client-ca", str(tmp_path / "ca.pem")) as gw:
        for client in ("h1", "aiohttp"):
            doc = run_json(tmp_path, "--protocol", "http", "--http-client", client, "--url",
                           gw.http_url, "--model", "tiny_mlp", "--concurrency", "2",
                           "--duration", "0.5", "--token", "bench-token-0123456789", "--tls-ca",
                           tmp_path / "ca.pem", "--tls-cert", tmp_path / "client.pem",
                           "--tls-key", tmp_path / "client.key")
            (row,) = doc["rows"]
            assert row["errors"] == {} and row["requests"] > 0, client
            assert row["server"]["succeeded"] > 0  # statistics over TLS with the token
        result = bench("--protocol", "http", "--url", gw.http_url, "--model", "tiny_mlp",
                       "--plain", "--quiet")  # plaintext at a TLS port: said, not waited on
        assert result.returncode == 1 and "cannot reach an HTTP server" in result.stderr


def test_http_protocol_says_why_it_cannot_connect():
    result = bench("--protocol", "http", "--url", "127.0.0.1:1", "--model", "m", "--plain",
                   "--quiet")
    assert result.returncode == 1
    assert "cannot reach an HTTP server at 127.0.0.1:1" in result.stderr
    assert "is the server running?" in result.stderr


def test_no_metadata_and_no_data_is_a_clear_error(gateway):
    result = bench("--url", gateway.url, "--model", "no_such_model", "--plain", "--quiet")
    assert result.returncode == 1
    assert "no metadata for model 'no_such_model'" in result.stderr
    assert "--input-data" in result.stderr


def test_gateway_bench_subcommand_passes_arguments_through():
    result = subprocess.run([sys.executable, "-m", "gateway", "bench", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gateway bench")
    for flag in ("--concurrency", "--rate", "--compare", "--limit", "--json", "--plot"):
        assert flag in result.stdout


def test_h2load_compare_still_runs(tmp_path):
    """``python -m bench.compare`` (h2load against the floor and a gateway it starts)."""
    from bench import h2load

    if not h2load.available():
        pytest.skip("h2load not installed (apt-get install nghttp2-client)")
    out = tmp_path / "compare.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--model", "tiny_mlp", "--streams", "8",
         "--seconds", "1", "--rounds", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    assert doc["floor_rps"][0] > 0 and doc["gateway_rps"][0] > 0 and doc["ratio_median"] > 0


def test_ensemble_cost_reports_the_three_ways_side_by_side():
    """``python -m bench.ensemble_cost``: an ensemble, the client-side chain, one model."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.ensemble_cost", "--streams", "2", "--seconds", "0.5",
         "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    point = json.loads(result.stdout)["points"][0]
    assert point["streams"] == 2
    for way in ("ensemble", "client chain", "one model"):
        assert point[way]["answers_per_s"] > 0 and point[way]["p50_ms"] > 0
    assert point["ensemble_over_client_chain"] > 0
