"""Create a model repository for the retraining loop: ``iris`` version 1 trained on today's
data (with its drift baseline), a config that keeps two versions for canaries, and a
gateway.yaml that keeps predictions for feedback and retrains when the inputs drift.

    python examples/retrain_loop/setup_repository.py /tmp/loop-repo --url localhost:8001
    gateway serve --model-repository /tmp/loop-repo --control-mode poll
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train import run

CONFIG = """\
max_batch_size: 64
dynamic_batching { }
version_policy { latest { num_versions: 2 } }  # the baseline stays loaded during a canary
"""

GATEWAY_YAML = """\
feedback:                  # keep predictions of requests with an id; labels come later
  output: label
  kind: classification
drift:
  window: {window}
  min_samples: {min_samples}
  for: {hold}
  threshold: 0.25
  hook:                    # retrain on fresh data and publish it as a 10% canary
    command: {command}
    timeout: 2m
    cooldown: 30m
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--url", default="localhost:8001",
                        help="where the gateway will listen (the drift hook publishes there)")
    parser.add_argument("--shift", type=float, default=1.5,
                        help="how far the data the hook retrains on has moved")
    parser.add_argument("--canary-interval", type=float, default=30.0)
    parser.add_argument("--no-hook", action="store_true",
                        help="no drift hook: retrain and publish by hand")
    parser.add_argument("--window", default="1m")
    parser.add_argument("--min-samples", type=int, default=200)
    parser.add_argument("--for", dest="hold", default="10s")
    args = parser.parse_args(argv)
    model_dir = args.repository / "iris"
    if model_dir.exists():
        parser.error(f"{model_dir} exists already")
    args.repository.mkdir(parents=True, exist_ok=True)
    run("iris", shift=0.0, seed=0, samples=600, url=None, repository=str(args.repository),
        canary=None, canary_interval=None, reason="initial")
    (model_dir / "config.pbtxt").write_text(CONFIG)
    command = [sys.executable, str(HERE / "train.py"), "--hook", "--url", args.url,
               "--shift", str(args.shift), "--canary", "10",
               "--canary-interval", str(args.canary_interval)]
    text = GATEWAY_YAML.format(window=args.window, min_samples=args.min_samples,
                               hold=args.hold, command=json.dumps(command))
    if args.no_hook:
        text = text[:text.index("  hook:")]
    (model_dir / "gateway.yaml").write_text(text)
    print(f"repository ready: {args.repository} (model iris version 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
