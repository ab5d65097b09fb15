"""Helpers of the operator console tests: a repository with a gated model, a token file with
every role, plain JSON calls to /ui/api/, and the admin CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from support import ROOT, TIMEOUT

from bench import models

# name -> (role, token); the token file names each token by the key
TOKENS = {
    "vera": ("viewer", "viewer-token-0123456789abcdef"),
    "olivia": ("operator", "operator-token-0123456789abcd"),
    "alice": ("admin", "alice-admin-token-0123456789ab"),
    "bob": ("admin", "bob-admin-token-0123456789abcd"),
    "app": ("infer", "infer-token-0123456789abcdef"),
}


def token(name: str) -> str:
    return TOKENS[name][1]


def write_tokens(path: Path) -> Path:
    path.write_text("".join(f"{role} {secret} {name}\n"
                            for name, (role, secret) in TOKENS.items()))
    return path


def build_repository(repo: Path) -> Path:
    """``split`` (versions 1, 2: all served, no gate) and ``gated`` (versions 1, 2 served,
    ``require_approval: true``), small MLPs of 8 -> 4 with a different seed per version."""
    for name, gated in (("split", False), ("gated", True)):
        for version in (1, 2):
            models.make_version(repo, name, version, models.build_mlp, (8, 4), seed=version)
        models.write_config(repo / name, "max_batch_size: 4\nversion_policy { all { } }")
        if gated:
            (repo / name / "gateway.yaml").write_text("require_approval: true\n")
    return repo


def model_file(directory: Path, seed: int) -> Path:
    return models.build_mlp(directory / f"model-{seed}.onnx", (8, 4), seed=seed)


def api(gw, method: str, path: str, who: str | None = None, body=None, headers=None,
        raw: bool = False):
    """(status, JSON answer or raw bytes) of a call to /ui/api/PATH."""
    sent = dict(headers or {})
    data = None
    if who is not None:
        sent["Authorization"] = f"Bearer {token(who)}"
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(f"http://{gw.http_url}/ui/api/{path}", data=data,
                                     headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, payload, response_headers = response.status, response.read(), \
                response.headers
    except urllib.error.HTTPError as exc:
        status, payload, response_headers = exc.code, exc.read(), exc.headers
    if raw:
        return status, payload, response_headers
    return status, json.loads(payload) if payload else None


def cli(gw, *args: str, who: str | None = None) -> subprocess.CompletedProcess:
    """``gateway ARGS --url`` the gateway's gRPC port, as ``who``."""
    env = {**os.environ}
    env.pop("GATEWAY_TOKEN", None)
    if who is not None:
        env["GATEWAY_TOKEN"] = token(who)
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--url", gw.url],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
                          check=False)


def publish(gw, model: str, path: Path, who: str) -> str:
    """Publish through the gateway as ``who``; the new version's number."""
    done = cli(gw, "publish", model, str(path), who=who)
    assert done.returncode == 0, done.stderr + done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("published"))
    return line.split(" version ", 1)[1].split()[0]


def served_versions(gw, model: str, n: int = 200, who: str = "app") -> dict[str, int]:
    """How many of ``n`` requests (without a version) each version served, over gRPC."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    counts: dict[str, int] = {}
    x = np.ones((1, 8), np.float32)
    with grpcclient.InferenceServerClient(gw.url) as client:
        for _ in range(n):
            inp = grpcclient.InferInput("input", [1, 8], "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer(model, [inp], headers={"authorization":
                                                         f"Bearer {token(who)}"})
            version = result.get_response().model_version
            counts[version] = counts.get(version, 0) + 1
    return counts
