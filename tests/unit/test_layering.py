"""Import boundaries: the core never imports the protocol edge or grpc; runtimes never import
the gateway.

The core is every module under gateway/ except the edge modules listed in ``EDGE`` below; an
edge module speaks a wire protocol (serves it, or is a client of it) and may import
``gateway.protocol`` and grpc. Imports are read from the source (every ``import`` statement,
also inside functions), so a lazy import counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The protocol edge, relative to gateway/. A directory entry ends with "/".
EDGE = {
    "protocol/": "the gRPC and HTTP adapters and their generated stubs",
    "server.py": "assembles the gRPC server, health, reflection and the servicers",
    "cli.py": "the command line (its client commands speak gRPC)",
    "commands.py": "client commands: gRPC calls to a running gateway",
    "hooks.py": "training hooks: a gRPC client of the admin API",
    "auth.py": "a gRPC server interceptor (bearer tokens and roles)",
    "tls.py": "gRPC server and channel credentials",
    "__main__.py": "python -m gateway, the command line",
    "batch/engines/remote.py": "batch scoring against a remote gateway: a gRPC client",
}
FORBIDDEN_IN_CORE = ("gateway.protocol", "grpc", "grpc_health", "grpc_reflection")


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved against
    ``package``, by default the file's own)."""
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _is_edge(relative: str) -> bool:
    return any(relative == e or (e.endswith("/") and relative.startswith(e)) for e in EDGE)


def _core_modules() -> list[Path]:
    gateway = ROOT / "gateway"
    return sorted(p for p in gateway.rglob("*.py")
                  if not _is_edge(p.relative_to(gateway).as_posix()))


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_core_list_is_not_empty_and_edges_exist() -> None:
    core = {p.relative_to(ROOT / "gateway").as_posix() for p in _core_modules()}
    assert {"dataplane.py", "batching.py", "repository.py", "modelconfig.py",
            "loading.py"} <= core
    # Every listed edge except untracked work in progress is a real path.
    for edge in ("protocol/", "server.py", "cli.py", "commands.py", "hooks.py"):
        assert (ROOT / "gateway" / edge).exists(), edge


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_core_does_not_import_the_protocol_or_grpc(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _matches(n, FORBIDDEN_IN_CORE))
    assert not bad, (f"{path.relative_to(ROOT)} is core and imports {bad}: convert at the "
                     "protocol edge (gateway/protocol/), or list the module as an edge in "
                     "tests/unit/test_layering.py with the reason")


@pytest.mark.parametrize("path", sorted((ROOT / "runtimes").rglob("*.py")),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_runtimes_import_nothing_of_the_gateway(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if _matches(n, ("gateway",)))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; runtimes/ stands alone"


def test_detector_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """Guards the guard: an import inside a function and a relative one are both found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import grpc\n    from .protocol import codec\n")
    names = _imports(probe, package="gateway")
    assert "grpc" in names and "gateway.protocol.codec" in names
