"""Train an iris classifier on fresh data, convert it to ONNX and publish it as a canary.

    python examples/retrain_loop/train.py --url localhost:8001 --model iris --shift 1.5 --canary 10
    python examples/retrain_loop/train.py --shift 1.5 --save /tmp/run-2   # files for the CLI

"Fresh data" is sklearn's bundled iris data, resampled with jitter and shifted by ``--shift``
(petal measurements grow, the labels stay): the world the deployed model has drifted away
from. The run trains StandardScaler + LogisticRegression, converts it with skl2onnx, and
publishes it with ``gateway.publish``: metadata (run id, data fingerprint, holdout accuracy)
and the training inputs as the drift baseline go with it, and ``--canary`` starts a rollout.

As a drift hook (``--hook``, see gateway.yaml from setup_repository.py) it reads the alert's
JSON payload on stdin and retrains the model the alert names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

SHIFT_DIRECTION = np.array([0.0, 0.0, 1.0, 0.4])  # cm per unit of shift, per feature


def fresh_data(samples: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Iris rows drawn with replacement, jittered, and shifted: (x float32, y int64)."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(x), samples)
    jitter = rng.normal(0.0, 0.1, (samples, x.shape[1])) * x.std(axis=0)
    return (x[rows] + jitter + shift * SHIFT_DIRECTION).astype(np.float32), y[rows]


def train(x: np.ndarray, y: np.ndarray, path: Path) -> float:
    """Fit on 80% of the data, write the ONNX model to ``path``; the holdout accuracy."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    cut = int(len(x) * 0.8)
    clf = LogisticRegression(max_iter=1000)
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", clf)]).fit(x[:cut], y[:cut])
    accuracy = float(pipe.score(x[cut:], y[cut:]))
    onnx_model = convert_sklearn(pipe, name="iris", initial_types=[("input",
                                                                    FloatTensorType([None, 4]))],
                                 target_opset={"": 17, "ai.onnx.ml": 3},
                                 options={id(clf): {"zipmap": False}})
    path.write_bytes(onnx_model.SerializeToString())
    return accuracy


def save(directory: Path, shift: float, seed: int, samples: int) -> None:
    """Train and keep the files (model.onnx, train.npy) for `gateway publish` by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    x, y = fresh_data(samples, shift, seed)
    accuracy = train(x, y, directory / "model.onnx")
    np.save(directory / "train.npy", x)
    print(f"holdout accuracy {accuracy:.3f}; wrote {directory / 'model.onnx'} and "
          f"{directory / 'train.npy'} (data fingerprint "
          f"{hashlib.sha256(x.tobytes()).hexdigest()[:16]})")


def run(model: str, shift: float, seed: int, samples: int, url: str | None,
        repository: str | None, canary: float | None, canary_interval: float | None,
        reason: str = "manual"):
    from gateway import publish

    x, y = fresh_data(samples, shift, seed)
    run_id = uuid.uuid4().hex[:12]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{model}-{run_id}.onnx"
        accuracy = train(x, y, path)
        result = publish(
            model, path, url=url, repository=repository, baseline=x, canary=canary,
            canary_interval=canary_interval,
            metadata={"run_id": run_id, "reason": reason, "shift": shift, "samples": samples,
                      "holdout_accuracy": round(accuracy, 4),
                      "data_fingerprint": hashlib.sha256(x.tobytes()).hexdigest()[:16]})
    print(f"run {run_id}: holdout accuracy {accuracy:.3f}; published {model} version "
          f"{result.version} ({result.state}{': ' + result.detail if result.detail else ''})")
    if result.rollout is not None:
        print(f"canary: {result.rollout.percent:g}% of traffic to version {result.version} "
              f"(baseline {result.rollout.from_version})")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("GATEWAY_MODEL", "iris"))
    parser.add_argument("--url", help="publish through this gateway (host:port)")
    parser.add_argument("--repository", help="or write into this repository directly")
    parser.add_argument("--shift", type=float, default=0.0, help="how far the fresh data moved")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--canary", type=float, help="start a rollout at this percent")
    parser.add_argument("--canary-interval", type=float, help="seconds per canary step")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help="only train: write DIR/model.onnx and DIR/train.npy")
    parser.add_argument("--hook", action="store_true",
                        help="called by the gateway's drift hook: read its payload on stdin")
    args = parser.parse_args(argv)
    reason = "manual"
    if args.hook:
        payload = json.loads(sys.stdin.read() or "{}")
        args.model = payload.get("model") or args.model
        reason = f"drift alert on version {payload.get('version', '?')}"
        print(f"drift hook: {json.dumps(payload, sort_keys=True)[:300]}")
    seed = args.seed if args.seed is not None else int(time.time())
    if args.save is not None:
        save(args.save, args.shift, seed, args.samples)
        return 0
    if not args.url and not args.repository:
        parser.error("give --url (a running gateway), --repository, or --save")
    run(args.model, args.shift, seed, args.samples, args.url, args.repository, args.canary,
        args.canary_interval, reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
