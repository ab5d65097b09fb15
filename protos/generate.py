"""Regenerate the committed Python modules for every protos/*.proto.

The generated code is committed so the gateway runs without grpcio-tools; this
script is the one way to refresh it, and `--check` lets CI prove it is fresh.

    python protos/generate.py           # rewrite the generated packages
    python protos/generate.py --check   # exit 1 and list stale files

Each proto goes to the package of the layer that owns it (``OUTPUTS``): the wire protocol
and the admin API to ``gateway/protocol/pb/`` (the protocol edge), ``model_config.proto`` to
``gateway/modelconfig_pb/``, because config.pbtxt is a repository file format that the core
reads and the core never imports ``gateway.protocol``. gRPC stubs (``*_pb2_grpc.py``, which
import grpc) are generated only for protos that declare a service.

protoc emits top-level imports (`import model_config_pb2`) that only work with
the output directory on sys.path; they are rewritten to package-relative ones within a
package and to absolute ones across packages.
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
# proto file -> the package directory (relative to ROOT) its generated modules live in
OUTPUTS = {
    "grpc_service.proto": "gateway/protocol/pb",
    "gateway_admin.proto": "gateway/protocol/pb",
    "model_config.proto": "gateway/modelconfig_pb",
}
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")
INIT_TEXT = {
    "gateway/protocol/pb": (
        '"""Generated protobuf/gRPC modules of the wire protocol; regenerate with '
        'protos/generate.py."""\n'
    ),
    "gateway/modelconfig_pb": (
        '"""Generated protobuf module of config.pbtxt (Triton\'s ModelConfig), a repository file\n'
        "format read by the core; regenerate with protos/generate.py. No grpc here.\"\"\"\n"
    ),
}


def _generated_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for pattern in GENERATED for p in directory.glob(pattern)}


def _package(directory: str) -> str:
    return directory.replace("/", ".")


def _fix_imports(text: str, here: str, homes: dict[str, str]) -> str:
    """Turn `import x_pb2 as y` into `from . import x_pb2 as y` for modules of the same
    package and `from <package> import x_pb2 as y` for our modules of another package."""

    def repl(m: re.Match[str]) -> str:
        home = homes.get(m.group(1))
        if home is None:
            return m.group(0)
        source = "." if home == here else _package(home)
        return f"from {source} import {m.group(1)}"

    return re.sub(r"^import (\w+)(?= as )", repl, text, flags=re.MULTILINE)


def _has_service(proto: Path) -> bool:
    return re.search(r"^\s*service\s+\w+", proto.read_text(), flags=re.MULTILINE) is not None


def generate(out_root: Path) -> list[Path]:
    """Run protoc over all protos into their packages under out_root; return files written."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("grpcio-tools is not installed: pip install grpcio-tools")
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        sys.exit(f"no .proto files in {PROTO_DIR}")
    unplaced = [p.name for p in protos if p.name not in OUTPUTS]
    if unplaced:
        sys.exit(f"no output package for {', '.join(unplaced)}: add it to OUTPUTS")
    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    homes: dict[str, str] = {}
    for p in protos:
        homes[f"{p.stem}_pb2"] = homes[f"{p.stem}_pb2_grpc"] = OUTPUTS[p.name]
    written: list[Path] = []
    for proto in protos:
        here = OUTPUTS[proto.name]
        out_dir = out_root / here
        out_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
        ]
        if _has_service(proto):
            args.append(f"--grpc_python_out={out_dir}")
        if protoc.main([*args, proto.name]) != 0:
            sys.exit(f"protoc failed on {proto.name}")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            path = out_dir / f"{proto.stem}{suffix}"
            if path.exists():
                path.write_text(_fix_imports(path.read_text(), here, homes))
                written.append(path)
    return sorted(written)


def _tree(root: Path) -> dict[str, bytes]:
    files = {}
    for directory in sorted(set(OUTPUTS.values())):
        for name, path in _generated_files(root / directory).items():
            files[f"{directory}/{name}"] = path.read_bytes()
    return files


def check() -> list[str]:
    """Names of committed files that differ from a fresh generation (or are missing/orphaned)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = _tree(Path(tmp))
    committed = _tree(ROOT)
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
                f"stale generated files (checked with grpcio-tools {tools}); "
                "regenerate with: python protos/generate.py"
            )
            print("\n".join(f"  {n}" for n in stale))
            return 1
        print("generated modules are up to date")
        return 0
    for directory in set(OUTPUTS.values()):  # drop outputs of deleted or moved protos
        for path in _generated_files(ROOT / directory).values():
            path.unlink()
    written = generate(ROOT)
    for directory, text in INIT_TEXT.items():
        init = ROOT / directory / "__init__.py"
        if not init.exists():
            init.write_text(text)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
