"""Server settings: defaults, overridden by ``GATEWAY_*`` environment variables, overridden by
command-line flags. Frozen once the server starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

DEMO_REPOSITORY = Path(__file__).parent / "demo_repository"
CONTROL_MODES = ("none", "poll", "explicit")


@dataclass(frozen=True, slots=True)
class Settings:
    model_repository: Path = DEMO_REPOSITORY
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # 0 picks a free port (tests)
    metrics_port: int = 8002  # 0 picks a free port; -1 turns the metrics endpoint off
    gpu_sample_interval: float = 5.0  # seconds between NVML samples; 0 = no GPU metrics
    drift_interval: float = 1.0  # seconds between input statistics / drift updates
    control_mode: str = "none"
    load_models: tuple[str, ...] = ()  # explicit mode: models loaded at start ("*" = all)
    poll_interval: float = 5.0  # seconds between repository scans in poll mode
    state_poll_interval: float = 1.0  # seconds between checks of the shared traffic state file
    max_message_bytes: int = 64 * 1024 * 1024
    drain_seconds: float = 30.0  # grace for in-flight requests on SIGTERM
    cpu_threads: int = 1  # ORT intra-op threads of each CPU model instance
    log_level: str = "INFO"
    state_dir: Path | None = None  # operator state; default <repository>/.gateway
    auth_tokens: Path | None = None  # "ROLE TOKEN [NAME]" lines; None = no authentication
    tls_cert: Path | None = None  # PEM certificate chain for the gRPC port
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed
    execution_timeout: float = 120.0  # seconds a batch may run before its instance is stuck
    max_inflight: int = 8192  # requests in the server at once; beyond: RESOURCE_EXHAUSTED
    max_inflight_per_model: int = 2048  # the same, per model
    reuse_port: bool = False  # set for --workers: several processes share the gRPC port
    worker_index: int = 0
    workers: int = 1  # processes sharing the gRPC port (--workers)

    def state_directory(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self.model_repository.resolve() == DEMO_REPOSITORY.resolve():
            return Path.home() / ".local" / "state" / "gateway" / "demo"  # not in site-packages
        return self.model_repository / ".gateway"

    def validated(self) -> Settings:
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"control mode must be one of {', '.join(CONTROL_MODES)}")
        if not self.model_repository.is_dir():
            raise ValueError(f"model repository {self.model_repository} is not a directory")
        if self.workers < 1 or self.cpu_threads < 1:
            raise ValueError("workers and CPU threads must be at least 1")
        if self.poll_interval <= 0 or self.drain_seconds < 0:
            raise ValueError("poll interval must be positive and drain seconds not negative")
        if self.gpu_sample_interval < 0 or self.drift_interval <= 0:
            raise ValueError("GPU sample interval must not be negative and drift interval must "
                             "be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for path in (self.auth_tokens, self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        if self.auth_tokens is not None:
            from gateway.auth import parse_tokens

            try:
                parse_tokens(self.auth_tokens.read_text())
            except ValueError as exc:
                raise ValueError(f"{self.auth_tokens}: {exc}") from None
        return self


def _convert(kind, text: str):
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return float(text)
    if kind in ("Path", Path, "Path | None"):
        return Path(text)
    if kind == "tuple[str, ...]":
        return tuple(part for part in text.split(",") if part)
    return text


def from_environment(environ=os.environ) -> Settings:
    """Defaults overridden by ``GATEWAY_<FIELD>`` variables (e.g. GATEWAY_GRPC_PORT=9001)."""
    changes = {}
    for f in fields(Settings):
        value = environ.get("GATEWAY_" + f.name.upper())
        if value is not None and value != "":
            changes[f.name] = _convert(f.type, value)
    return replace(Settings(), **changes)
