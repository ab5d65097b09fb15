"""Send requests with ids to the model, then their true labels as feedback, and print the
accuracy the gateway measured per version.

    python examples/retrain_loop/traffic.py --url localhost:8001 --shift 1.5 --requests 400
    python examples/retrain_loop/traffic.py --shift 1.5 --seconds 120   # steady traffic
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import fresh_data


def send(url: str, model: str, x: np.ndarray, prefix: str,
         seconds: float = 0.0) -> dict[str, str]:
    """One request per row, each with an id (for ``seconds``: round and round the rows);
    {request id: version that answered}."""
    import tritonclient.grpc as grpcclient

    served = {}
    stop = time.monotonic() + seconds
    rows = (itertools.takewhile(lambda _: time.monotonic() < stop, itertools.count())
            if seconds else range(len(x)))
    with grpcclient.InferenceServerClient(url) as client:
        for i in rows:
            row = x[i % len(x)]
            inp = grpcclient.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(row[None, :])
            request_id = f"{prefix}-{i}"
            result = client.infer(model, [inp], request_id=request_id)
            served[request_id] = result.get_response().model_version
    return served


def main(argv=None) -> int:
    from gateway.cli import main as gateway

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model", default="iris")
    parser.add_argument("--shift", type=float, default=0.0)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="keep sending for this long instead (cycling through the rows)")
    parser.add_argument("--no-labels", action="store_true", help="send requests only")
    args = parser.parse_args(argv)
    x, y = fresh_data(args.requests, args.shift, args.seed)
    prefix = uuid.uuid4().hex[:8]
    served = send(args.url, args.model, x, prefix, args.seconds)
    versions = sorted(set(served.values()), key=int)
    print(f"{len(served)} requests answered by version(s) {', '.join(versions)}")
    if args.no_labels:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        labels.write_text("id,label\n" + "".join(
            f"{request_id},{y[int(request_id.rsplit('-', 1)[1]) % len(y)]}\n"
            for request_id in served))
        return gateway(["feedback", args.model, "--file", str(labels), "--url", args.url])


if __name__ == "__main__":
    sys.exit(main())
