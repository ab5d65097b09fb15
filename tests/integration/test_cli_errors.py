"""Operator and CLI errors (issue 13): a clear message and a non-zero exit, never a traceback.

Each case runs the real ``gateway`` command in a subprocess and asserts the exit code and the
message together. Also here: SIGHUP never stops a gateway (alone or with --workers), and the
metrics port answers /metrics only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from support import ROOT, free_port, make_pki, start_gateway, wait_for

from bench import models

# grpc's C core may log a line of its own on stderr; the checks below look at ours.
ENV = {**os.environ, "GRPC_VERBOSITY": "NONE"}


def gateway(*args: str, env: dict | None = None, timeout: float = 60.0,
            stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], check=False, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT,
                          env={**ENV, **(env or {})}, timeout=timeout)


def refused(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Assert exit ``code`` and one stderr line holding every fragment; return that line."""
    output = (result.stdout or "") + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == code, (result.returncode, output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    matching = [line for line in lines if all(f in line for f in fragments)]
    assert matching, f"no stderr line with {fragments}: {result.stderr!r}"
    return matching[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and broken files."""
    d = tmp_path_factory.mktemp("pki")
    make_pki(d)
    (d / "garbage.pem").write_text("this is not a certificate\n")
    return d


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_repo")
    models.make_version(d, "mlp", 1, models.build_mlp)
    return d


@pytest.fixture(scope="module")
def plain(repo):
    with start_gateway(repo) as gw:
        yield gw


@pytest.fixture(scope="module")
def mutual_tls(repo, pki):
    """A gateway that requires TLS and a client certificate signed by the test CA."""
    with start_gateway(repo, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                       str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem")) as gw:
        yield gw


# ---- files named on the command line ------------------------------------------------------------

def test_feedback_file_missing_or_a_directory(tmp_path):
    missing = tmp_path / "missing.csv"
    refused(gateway("feedback", "mlp", "--file", str(missing), "--url", "127.0.0.1:1"), 1,
            f"--file {missing}", "No such file or directory")
    refused(gateway("feedback", "mlp", "--file", str(tmp_path), "--url", "127.0.0.1:1"), 1,
            f"--file {tmp_path}", "is a directory")


@pytest.mark.parametrize("command", [["models"], ["traffic", "show"], ["rollout", "status", "m"],
                                     ["versions", "m"], ["feedback", "m"]])
def test_client_tls_files_missing_or_invalid(command, pki, tmp_path):
    missing = tmp_path / "missing.pem"
    verb = " ".join(c for c in command if c != "m")
    refused(gateway(*command, "--tls-ca", str(missing)), 2,
            f"gateway {verb}: --tls-ca {missing}", "No such file or directory")
    refused(gateway(*command, "--tls-ca", str(pki / "garbage.pem")), 2,
            "--tls-ca", "garbage.pem", "is not a valid PEM certificate")
    refused(gateway(*command, "--tls-cert", str(pki / "client.pem")), 2,
            "--tls-cert and --tls-key go together")
    refused(gateway(*command, "--tls-ca", str(pki / "ca.pem"), "--tls-cert",
                    str(pki / "client.pem"), "--tls-key", str(pki / "server.key")), 2,
            "--tls-key", "server.key", "does not match certificate", "client.pem")


def test_bench_tls_ca_missing(tmp_path):
    missing = tmp_path / "missing.pem"
    refused(gateway("bench", "--model", "mlp", "--tls-ca", str(missing)), 2,
            f"--tls-ca {missing}", "No such file or directory")


# ---- gateway serve: settings ----------------------------------------------------------------------

def test_serve_unknown_log_level():
    refused(gateway("serve", "--log-level", "LOUD"), 2,
            "gateway serve: log level 'LOUD' is not one of", "DEBUG", "ERROR")


def test_serve_environment_value_that_does_not_convert():
    refused(gateway("serve", env={"GATEWAY_GRPC_PORT": "abc"}), 2,
            "gateway serve: GATEWAY_GRPC_PORT='abc' is not an integer")
    refused(gateway("serve", env={"GATEWAY_DRAIN_SECONDS": "soon"}), 2,
            "GATEWAY_DRAIN_SECONDS='soon' is not a number")


def test_serve_out_of_range_port():
    refused(gateway("serve", "--grpc-port", "70000"), 2, "gRPC port 70000 is not 0-65535")


def test_serve_refuses_a_model_directory_as_the_repository(repo, tmp_path):
    model_dir = repo / "mlp"  # holds 1/model.onnx: served as a repository, "1" would be a model
    line = refused(gateway("serve", "--model-repository", str(model_dir)), 2,
                   "looks like a model directory", "version directory 1/")
    assert f"--model-repository {repo.resolve()}" in line
    with_config = tmp_path / "m"
    (with_config / "2").mkdir(parents=True)
    (with_config / "config.pbtxt").write_text('name: "m"\n')
    refused(gateway("serve", "--model-repository", str(with_config)), 2,
            "looks like a model directory", "config.pbtxt")


def test_serve_invalid_tls_files_are_named(pki, repo):
    base = ["serve", "--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "0"]
    refused(gateway(*base, "--tls-cert", str(pki / "garbage.pem"), "--tls-key",
                    str(pki / "server.key")), 2,
            "TLS certificate", "garbage.pem", "is not a valid PEM certificate")
    refused(gateway(*base, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                    str(pki / "garbage.pem")), 2,
            "TLS key", "garbage.pem", "is not a valid unencrypted PEM private key")
    refused(gateway(*base, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                    str(pki / "client.key")), 2,
            "TLS key", "client.key", "does not match certificate", "server.pem")
    result = gateway(*base, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                     str(pki / "server.key"), "--tls-client-ca", str(pki / "garbage.pem"))
    refused(result, 2, "TLS client CA", "garbage.pem")
    assert "Failed to bind" not in result.stderr


def test_serve_busy_metrics_port_names_the_port(repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gateway("serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                         "--grpc-port", "0", "--metrics-port", str(port))
    line = refused(result, 1, f"metrics port {port}", "Address already in use",
                   "--metrics-port")
    assert "Errno" not in line


def test_serve_busy_grpc_port_names_the_port(repo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gateway("serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                         "--grpc-port", str(port), "--metrics-port", "-1", "--http-port", "-1")
    assert result.returncode == 1, result.stderr
    assert (f"cannot start: the gRPC port 127.0.0.1:{port} is already in use by another "
            "process (choose another with --grpc-port") in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_empty_repository_is_ready_with_a_warning(tmp_path):
    with start_gateway(tmp_path) as gw:
        assert "WARNING" in gw.log() and "holds no model directories" in gw.log(), gw.log()
        assert gw.stop() == 0


# ---- talking to a server ----------------------------------------------------------------------------

def test_client_against_a_dead_port_says_so():
    url = f"127.0.0.1:{free_port()}"
    refused(gateway("models", "--url", url), 1, "UNAVAILABLE", f"is a gateway serving on {url}?")
    started = time.monotonic()
    refused(gateway("bench", "--model", "mlp", "--url", url, "--quiet"), 1,
            f"cannot reach a gRPC server at {url}", "Connection refused")
    assert time.monotonic() - started < 20, "bench waited instead of failing fast"


def test_client_against_a_tls_server_hints_at_the_tls_flags(mutual_tls, pki):
    url = mutual_tls.url
    refused(gateway("models", "--url", url), 1, "UNAVAILABLE",
            "the server may require TLS: use --tls-ca")
    refused(gateway("traffic", "show", "--url", url, "--tls-ca", str(pki / "ca.pem")), 1,
            "gateway traffic show: UNAVAILABLE",
            "may require a client certificate: use --tls-cert")
    started = time.monotonic()
    refused(gateway("bench", "--model", "mlp", "--url", url, "--quiet"), 1,
            "cannot reach a gRPC server", "may require TLS: use --tls-ca")
    assert time.monotonic() - started < 20, "bench waited instead of failing fast"


def test_client_certificate_flags_reach_a_mutual_tls_server(mutual_tls, pki):
    tls = ["--url", mutual_tls.url, "--tls-ca", str(pki / "ca.pem"), "--tls-cert",
           str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    listed = gateway("models", *tls)
    assert listed.returncode == 0, listed.stderr
    assert "mlp" in listed.stdout and "READY" in listed.stdout
    for command in (["traffic", "show", "mlp"], ["versions", "mlp"], ["feedback", "mlp"]):
        result = gateway(*command, *tls)
        assert "Traceback" not in result.stderr, result.stderr
        assert "UNAVAILABLE" not in result.stderr, (command, result.stderr)
    bench = gateway("bench", "--model", "mlp", *tls, "--requests", "20", "--warmup", "0",
                    "--clients", "1", "--plain", "--quiet")
    assert bench.returncode == 0, bench.stderr


def test_tls_client_against_a_plaintext_server(plain, pki):
    refused(gateway("models", "--url", plain.url, "--tls-ca", str(pki / "ca.pem")), 1,
            "UNAVAILABLE", "the server may not use TLS")


@pytest.mark.parametrize("command", [["models"], ["traffic", "show", "mlp"]])
def test_a_closed_pipe_ends_the_command_quietly(plain, command):
    """`gateway ... | head -1` where head has gone: no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", *command, "--url", plain.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    proc.stdout.close()  # the reader is gone before the command writes
    _, err = proc.communicate(timeout=60)
    assert err.decode() == "", err.decode()
    assert proc.returncode == 128 + signal.SIGPIPE


# ---- signals ----------------------------------------------------------------------------------------

def test_sighup_without_auth_tokens_is_logged_and_ignored(plain):
    plain.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP ignored" in plain.log(), what="the SIGHUP log line")
    plain.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert plain.process.poll() is None, plain.log()
    listed = gateway("models", "--url", plain.url)
    assert listed.returncode == 0 and "mlp" in listed.stdout, listed.stderr


def test_sighup_leaves_every_worker_serving(repo):
    port = free_port()
    with start_gateway(repo, "--grpc-port", str(port), "--workers", "2") as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        # The workers, by the pids in their ready lines (the supervisor's third child is the
        # metrics aggregator, which ignores SIGHUP too).
        workers = re.findall(r"worker \d+ pid (\d+)", gw.log())
        children = subprocess.run(["pgrep", "-P", str(gw.process.pid)], check=True,
                                  capture_output=True, text=True).stdout.split()
        assert len(workers) == 2 and set(workers) <= set(children), (workers, children)
        gw.process.send_signal(signal.SIGHUP)  # the supervisor passes it on
        wait_for(lambda: gw.log().count("SIGHUP ignored") >= 2, what="2 SIGHUP log lines")
        # Then to each worker directly (one at a time: a signal still pending from the
        # supervisor would merge with ours, standard signals do not queue).
        for pid in workers:
            os.kill(int(pid), signal.SIGHUP)
        wait_for(lambda: gw.log().count("SIGHUP ignored") >= 4, what="4 SIGHUP log lines")
        time.sleep(0.5)
        assert gw.process.poll() is None, gw.log()
        for pid in workers:
            os.kill(int(pid), 0)  # ProcessLookupError if a worker died
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            listed = gateway("models", "--url", gw.url)
            assert listed.returncode == 0 and "mlp" in listed.stdout, listed.stderr
        assert gw.stop() == 0, gw.log()


# ---- the metrics port -------------------------------------------------------------------------------

def test_metrics_port_answers_metrics_only(plain):
    base = f"http://127.0.0.1:{plain.metrics_port}"
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        assert response.status == 200
        assert b"gateway_" in response.read()
    for path in ("/v2/health/ready", "/", "/metricsx", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + path, timeout=10)
        assert info.value.code == 404, path
        body = info.value.read().decode()
        assert "not found" in body and "/metrics" in body and len(body) < 300, body
