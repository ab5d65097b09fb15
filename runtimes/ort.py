"""ONNX Runtime implementation of the runtime interface (CPU, and CUDA when installed).

Thread counts are always explicit: ORT's default sizes its pool to every core, and several
instances of several models would then fight over the same cores. One intra-op thread per
instance is the CPU default; raise it per model with the ``intra_op_thread_count`` parameter.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtimes.base import ExecutionError, ModelIO, ModelLoadError, RuntimeOptions, TensorSpec

log = logging.getLogger(__name__)

ORT_TYPE_TO_DATATYPE = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _dims(shape) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def select_providers(device: str, device_id: int = 0) -> list:
    """ONNX Runtime providers for one instance: the CPU, or CUDA on one GPU with the CPU for the
    nodes CUDA has no kernel for. A GPU instance needs onnxruntime-gpu (``onnxruntime`` and
    ``onnxruntime-gpu`` install the same module; a machine has one of the two)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "gpu":
        raise ModelLoadError(f"unknown device {device!r} (cpu or gpu)")
    if not cuda_available():
        raise ModelLoadError(
            "instance_group asks for KIND_GPU but this onnxruntime has no CUDA provider "
            "(install onnxruntime-gpu on a machine with a GPU)"
        )
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


class OrtRuntime:
    """One ONNX Runtime InferenceSession: one model instance on one device."""

    def __init__(self, path: str | Path, options: RuntimeOptions):
        self.device = options.device
        self._device_id = options.device_id
        params = dict(options.parameters)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_thread_count", options.intra_op_threads))
        so.inter_op_num_threads = int(params.get("inter_op_thread_count", options.inter_op_threads))
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Idle worker threads must not spin: the event loop and other instances need the cores.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = select_providers(options.device, options.device_id)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises several private exception types
            raise ModelLoadError(_load_failure(exc, options)) from exc
        if options.device == "gpu" and "CUDAExecutionProvider" not in self._session.get_providers():
            # ORT falls back to the CPU, with a log line only, when the CUDA provider cannot start
            # (CUDA or cuDNN libraries missing, driver too old, no such device): a KIND_GPU
            # instance must not quietly run on the CPU.
            self._session = None
            raise ModelLoadError(
                f"instance_group asks for KIND_GPU but onnxruntime's CUDA provider did not start "
                f"on GPU {options.device_id} (CUDA 13 / cuDNN 9 libraries not found, driver too "
                "old or no such GPU); onnxruntime's log says why")
        self.io = self._read_io()
        self._string_inputs = [s.name for s in self.io.inputs if s.datatype == "BYTES"]
        self._binding = self._session.io_binding() if options.device == "gpu" else None
        # Outputs stay on the GPU until copy_outputs_to_cpu; string tensors only exist in host
        # memory, so those are bound to the CPU.
        self._output_device = {s.name: "cpu" if s.datatype == "BYTES" else "cuda"
                               for s in self.io.outputs}

    def _read_io(self) -> ModelIO:
        inputs, outputs, unsupported = [], [], {}
        for arg in self._session.get_inputs():
            datatype = ORT_TYPE_TO_DATATYPE.get(arg.type)
            if datatype is None:
                raise ModelLoadError(f"input '{arg.name}' has unsupported type {arg.type}")
            inputs.append(TensorSpec(arg.name, datatype, _dims(arg.shape)))
        for arg in self._session.get_outputs():
            datatype = ORT_TYPE_TO_DATATYPE.get(arg.type)
            if datatype is None:
                unsupported[arg.name] = arg.type
            else:
                outputs.append(TensorSpec(arg.name, datatype, _dims(arg.shape)))
        return ModelIO(inputs, outputs, unsupported)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        try:
            return self._run(feeds, output_names)
        except UnicodeDecodeError as exc:
            raise ExecutionError(f"a BYTES input is not valid UTF-8 (at byte {exc.start}); "
                                 "ONNX string tensors hold text") from None
        except Exception as exc:  # ORT raises several private exception types
            raise ExecutionError(_short(exc)) from exc

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        # ORT string tensors hold str; it would str() a bytes object ("b'..'"), so decode here.
        for name in self._string_inputs:
            feeds[name] = _to_str(feeds[name])
        if self._binding is None:
            return self._session.run(output_names, feeds)
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in output_names:
            device = self._output_device.get(name, "cuda")
            binding.bind_output(name, device, self._device_id if device == "cuda" else 0)
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        self._session = None
        self._binding = None


def _to_str(array: np.ndarray) -> np.ndarray:
    if not any(isinstance(v, bytes) for v in array.reshape(-1)):
        return array  # already text (the data plane decodes once, when it validates)
    flat = [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


# How the CUDA provider, cuBLAS, cuDNN and ORT's arena say that GPU memory ran out.
_GPU_MEMORY = re.compile(r"Failed to allocate memory|out of memory|ALLOC_FAILED|"
                         r"cudaErrorMemoryAllocation|CUDA failure 2:", re.IGNORECASE)


def _load_failure(exc: Exception, options: RuntimeOptions) -> str:
    """The reason a version failed to load, as RepositoryIndex shows it."""
    text = _short(exc)
    if options.device == "gpu" and _GPU_MEMORY.search(str(exc)):
        return (f"not enough free memory on GPU {options.device_id} to load the model "
                f"(onnxruntime: {text})")
    return f"onnxruntime could not load the model: {text}"


# The directories of an absolute path ("/srv/repo/m/1/" in "/srv/repo/m/1/model.onnx").
_DIRECTORIES = re.compile(r"(?<![\w.])/(?:[^\s/'\"]+/)+(?=[^\s/'\"])")


def _short(exc: Exception) -> str:
    """ORT messages can carry absolute paths; keep the first line without them."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = _ORT_PREFIX.sub("", text)
    return _DIRECTORIES.sub("", text)[:300]


# "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : " says nothing to a caller.
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
