"""Rebuild the bundled demo repository (gateway/demo_repository), served by default.

Usage: python scripts/build_demo_models.py [OUTPUT_DIR]
The output is byte-for-byte deterministic; tests/unit/test_models_builders.py fails when the
committed files differ from a fresh build.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.models import TINY_MLP, build_iris_classifier, build_mlp, make_version, write_config

DEMO_REPOSITORY = ROOT / "gateway" / "demo_repository"

IRIS_CONFIG = """
    name: "iris_classifier"
    platform: "onnxruntime_onnx"
    max_batch_size: 64
    input [
      { name: "input" data_type: TYPE_FP32 dims: [ 4 ] }
    ]
    output [
      { name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },
      { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }
    ]
    dynamic_batching { }
"""

TINY_MLP_CONFIG = f"""
    name: "tiny_mlp"
    platform: "onnxruntime_onnx"
    max_batch_size: 64
    input [
      {{ name: "input" data_type: TYPE_FP32 dims: [ {TINY_MLP[0]} ] }}
    ]
    output [
      {{ name: "output" data_type: TYPE_FP32 dims: [ {TINY_MLP[-1]} ] }}
    ]
    dynamic_batching {{ max_queue_delay_microseconds: 0 }}
    instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""


def build_demo_repository(repo: Path = DEMO_REPOSITORY) -> Path:
    """Write both demo models (config.pbtxt and version 1) under ``repo``."""
    repo = Path(repo)
    make_version(repo, "iris_classifier", 1, build_iris_classifier)
    write_config(repo / "iris_classifier", IRIS_CONFIG)
    make_version(repo, "tiny_mlp", 1, build_mlp, TINY_MLP)
    write_config(repo / "tiny_mlp", TINY_MLP_CONFIG)
    return repo


if __name__ == "__main__":
    out = build_demo_repository(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_REPOSITORY)
    print(f"demo repository written to {out}")
