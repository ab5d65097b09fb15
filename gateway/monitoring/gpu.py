"""GPU metrics through NVML (the ``pynvml`` module of nvidia-ml-py), sampled on a background
thread every ``interval`` seconds and never on the request path. The exporter reads the latest
sample. Without a GPU or without NVML there are no GPU series: one log line, no error. A reading
a device does not support (power on some boards) is left out of that device's sample.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    index: int
    name: str
    uuid: str
    utilization: float | None = None  # 0..1 of the last sample period
    memory_used: int | None = None  # bytes
    memory_total: int | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None


class GpuSampler:
    def __init__(self, interval: float, nvml=None):
        self.interval = interval
        self.samples: list[GpuSample] = []  # replaced whole by the sampling thread
        self.available = False
        self._nvml = nvml
        self._handles: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Initialise NVML and start sampling; False (and one log line) when there is no GPU."""
        if self.interval <= 0:
            log.info("GPU metrics off (--gpu-sample-interval 0)")
            return False
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            nvml = self._nvml
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors ...
            log.info("GPU metrics off: NVML unavailable (%s)", _reason(exc))
            return False
        if not self._handles:
            log.info("GPU metrics off: NVML reports no GPU")
            self._shutdown()
            return False
        self.available = True
        self.sample()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()
        log.info("GPU metrics on: %d GPU%s sampled every %gs", len(self._handles),
                 "" if len(self._handles) == 1 else "s", self.interval)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:
                log.exception("GPU sampling failed; trying again next interval")

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        samples = []
        for index, handle in enumerate(self._handles):
            memory = _read(nvml.nvmlDeviceGetMemoryInfo, handle)
            samples.append(GpuSample(
                index,
                _text(_read(nvml.nvmlDeviceGetName, handle)) or f"gpu{index}",
                _text(_read(nvml.nvmlDeviceGetUUID, handle)) or "",
                utilization=_maybe(_read(nvml.nvmlDeviceGetUtilizationRates, handle),
                                   lambda u: u.gpu / 100.0),
                memory_used=_maybe(memory, lambda m: int(m.used)),
                memory_total=_maybe(memory, lambda m: int(m.total)),
                power_watts=_maybe(_read(nvml.nvmlDeviceGetPowerUsage, handle),
                                   lambda mw: mw / 1000.0),
                temperature_celsius=_maybe(
                    _read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
                    float),
            ))
        self.samples = samples
        return samples

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.available:
            self._shutdown()
        self.available = False

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", exc)


def _read(function, *args):
    """One NVML reading; None when the device does not support it or it fails."""
    try:
        return function(*args)
    except Exception:
        return None


def _maybe(value, convert):
    return None if value is None else convert(value)


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
