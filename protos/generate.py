"""Regenerate the committed Python modules for every protos/*.proto.

The generated code is committed so the gateway runs without grpcio-tools; this
script is the one way to refresh it, and `--check` lets CI prove it is fresh.

    python protos/generate.py           # rewrite gateway/protocol/pb/
    python protos/generate.py --check   # exit 1 and list stale files

protoc emits top-level imports (`import model_config_pb2`) that only work with
the output directory on sys.path; they are rewritten to package-relative ones.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "gateway" / "protocol" / "pb"
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
INIT_TEXT = (
    '"""Generated protobuf/gRPC modules; regenerate with protos/generate.py."""\n'
)


def _generated_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for pattern in GENERATED for p in directory.glob(pattern)}


def _make_relative(text: str, local_modules: set[str]) -> str:
    """Turn `import x_pb2 as y` into `from . import x_pb2 as y` for our own modules."""

    def repl(m: re.Match[str]) -> str:
        return (
            f"from . import {m.group(1)}" if m.group(1) in local_modules else m.group(0)
        )

    return re.sub(r"^import (\w+)(?= as )", repl, text, flags=re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over all protos into out_dir; return the files written."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio-tools is not installed: pip install grpcio-tools")
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        sys.exit(f"no .proto files in {PROTO_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(p.name for p in protos),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    local = {f"{p.stem}_pb2" for p in protos} | {f"{p.stem}_pb2_grpc" for p in protos}
    written = sorted(_generated_files(out_dir).values())
    for path in written:
        path.write_text(_make_relative(path.read_text(), local))
    return written


def check() -> list[str]:
    """Names of committed files that differ from a fresh generation (or are missing/orphaned)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {n: p.read_bytes() for n, p in _generated_files(Path(tmp)).items()}
    committed = {n: p.read_bytes() for n, p in _generated_files(OUT_DIR).items()}
    return sorted(
        n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail if committed output is stale"
    )
    if parser.parse_args().check:
        stale = check()
        if stale:
            tools = importlib.metadata.version("grpcio-tools")
            print(
                f"stale generated files in {OUT_DIR.relative_to(ROOT)} (checked with "
                f"grpcio-tools {tools}); regenerate with: python protos/generate.py"
            )
            print("\n".join(f"  {n}" for n in stale))
            return 1
        print("generated modules are up to date")
        return 0
    for path in _generated_files(OUT_DIR).values():  # drop outputs of deleted protos
        path.unlink()
    written = generate(OUT_DIR)
    init = OUT_DIR / "__init__.py"
    if not init.exists():
        init.write_text(INIT_TEXT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
