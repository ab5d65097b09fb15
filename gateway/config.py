"""Server settings: defaults, overridden by ``GATEWAY_*`` environment variables, overridden by
command-line flags. Frozen once the server starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

DEMO_REPOSITORY = Path(__file__).parent / "demo_repository"
CONTROL_MODES = ("none", "poll", "explicit")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True, slots=True)
class Settings:
    model_repository: Path = DEMO_REPOSITORY
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # 0 picks a free port (tests)
    metrics_port: int = 8002  # 0 picks a free port; -1 turns the metrics endpoint off
    http_port: int = 8000  # KServe V2 over HTTP/REST; 0 picks a free port; -1 turns it off
    gpu_sample_interval: float = 5.0  # seconds between NVML samples; 0 = no GPU metrics
    drift_interval: float = 1.0  # seconds between input statistics / drift updates
    control_mode: str = "none"
    load_models: tuple[str, ...] = ()  # explicit mode: models loaded at start ("*" = all)
    poll_interval: float = 5.0  # seconds between repository scans in poll mode
    state_poll_interval: float = 0.2  # seconds between checks of the file store's state.json
    max_message_bytes: int = 64 * 1024 * 1024
    drain_seconds: float = 30.0  # grace for in-flight requests on SIGTERM
    cpu_threads: int = 1  # ORT intra-op threads of each CPU model instance
    # max_batch_size of a model without one whose tensors all have a dynamic first dim
    # (Triton's default, 4); 0 turns such auto-completed batching off
    default_max_batch_size: int = 4
    cache_size: int = 0  # bytes of the response cache (models opt in); 0 = no cache
    log_level: str = "INFO"
    state_dir: Path | None = None  # operator state; default <repository>/.gateway
    state_url: str = ""  # "" or file://DIR: the file store; redis://HOST:PORT/DB: a fleet's
    rollout_lease: float = 15.0  # seconds a silent rollout judge keeps its lease
    # without --auth-tokens the console is read-only, unless this allows changes from a
    # browser on this machine
    console_allow_changes: bool = False
    state_start_wait: float = 10.0  # seconds start retries reading the state before serving
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
    metrics_rundir: Path | None = None  # set by the --workers supervisor: announce metrics here

    def state_directory(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self.model_repository.resolve() == DEMO_REPOSITORY.resolve():
            return Path.home() / ".local" / "state" / "gateway" / "demo"  # not in site-packages
        return self.model_repository / ".gateway"

    def validated(self) -> Settings:
        """This, if it can serve; else ValueError with a one-line message for the operator."""
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"control mode must be one of {', '.join(CONTROL_MODES)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log level {self.log_level!r} is not one of "
                             f"{', '.join(LOG_LEVELS)}")
        if not self.model_repository.is_dir():
            raise ValueError(f"model repository {self.model_repository} is not a directory")
        model_dir = _model_directory_evidence(self.model_repository)
        if model_dir:
            raise ValueError(
                f"model repository {self.model_repository} looks like a model directory "
                f"({model_dir}), not a repository of models: give its parent, "
                f"--model-repository {self.model_repository.resolve().parent}")
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"gRPC port {self.grpc_port} is not 0-65535")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port {self.metrics_port} is not -1 (off) or 0-65535")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"HTTP port {self.http_port} is not -1 (off) or 0-65535")
        if self.workers < 1 or self.cpu_threads < 1:
            raise ValueError("workers and CPU threads must be at least 1")
        if self.default_max_batch_size < 0 or self.cache_size < 0:
            raise ValueError("default max batch size and cache size must not be negative")
        if self.max_inflight < 1 or self.max_inflight_per_model < 1:
            raise ValueError("max in-flight limits must be at least 1")
        if self.max_message_bytes < 1:
            raise ValueError("max message bytes must be at least 1")
        if self.poll_interval <= 0 or self.drain_seconds < 0:
            raise ValueError("poll interval must be positive and drain seconds not negative")
        if self.gpu_sample_interval < 0 or self.drift_interval <= 0:
            raise ValueError("GPU sample interval must not be negative and drift interval must "
                             "be positive")
        if self.execution_timeout < 0:
            raise ValueError("execution timeout must not be negative")
        if not 0.5 <= self.rollout_lease <= 3600:
            raise ValueError("--rollout-lease must be between 0.5 and 3600 seconds")
        if self.state_url and not self.state_url.startswith(
                ("file:", "redis://", "rediss://", "unix://")):
            raise ValueError(f"--state-url {self.state_url!r}: use file://DIR, "
                             "redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        for path in (self.auth_tokens, self.tls_cert, self.tls_key, self.tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        if self.tls_cert is not None:
            from gateway.tls import check_server_files

            check_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.auth_tokens is not None:
            from gateway.auth import parse_tokens

            try:
                parse_tokens(self.auth_tokens.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise ValueError(f"{self.auth_tokens}: {exc}") from None
        return self


def _model_directory_evidence(root: Path) -> str:
    """Why ``root`` looks like one model's directory rather than a repository ('' if not).

    A repository holds model directories; a model directory holds config.pbtxt and numeric
    version directories with the model file in them. Served as a repository, its versions
    would become "models" named 1, 2, ...
    """
    if (root / "config.pbtxt").is_file():
        return "it holds config.pbtxt"
    try:
        children = [c for c in root.iterdir() if c.is_dir() and c.name.isdigit()]
        for child in sorted(children, key=lambda c: int(c.name)):
            if any(f.is_file() and f.suffix == ".onnx" for f in child.iterdir()):
                return f"version directory {child.name}/ holds an .onnx file"
    except OSError:
        return ""
    return ""


def _convert(kind, text: str):
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return float(text)
    if kind in ("bool", bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("not a boolean (true/false)")
    if kind in ("Path", Path, "Path | None"):
        return Path(text)
    if kind == "tuple[str, ...]":
        return tuple(part for part in text.split(",") if part)
    return text


def from_environment(environ=os.environ) -> Settings:
    """Defaults overridden by ``GATEWAY_<FIELD>`` variables (e.g. GATEWAY_GRPC_PORT=9001)."""
    changes = {}
    for f in fields(Settings):
        name = "GATEWAY_" + f.name.upper()
        value = environ.get(name)
        if value is not None and value != "":
            try:
                changes[f.name] = _convert(f.type, value)
            except ValueError:
                kind = {"int": "an integer", "float": "a number",
                        "bool": "true or false"}.get(str(f.type), "valid")
                raise ValueError(f"{name}={value!r} is not {kind}") from None
    return replace(Settings(), **changes)
