"""Score through a running gateway (or a fleet, or Triton) over KServe V2 gRPC.

Requests carry raw tensor contents, as ``tritonclient`` sends them, through the server's own
routing: an explicit ``version`` is honoured as is, otherwise the traffic split chooses, and
each answer names the version that served it. The model's inputs and outputs come from the
ModelConfig RPC (the completed config the server serves), so nothing is parsed twice.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np

from gateway.batch.engines.base import ModelInfo
from gateway.batch.errors import InferenceFailure, UsageError
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from gateway.protocol.pb import model_config_pb2 as mc
from gateway.tensors import DATATYPE_TO_DTYPE, TensorSpec

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_LENGTH = struct.Struct("<I")


def _datatype(enum_value: int) -> str:
    return mc.DataType.Name(enum_value).removeprefix("TYPE_").replace("STRING", "BYTES")


def _specs(tensors) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, _datatype(t.data_type), tuple(t.dims)) for t in tensors)


class RemoteEngine:
    def __init__(self, url: str, model: str, version: str = "", *, timeout: float = 60.0,
                 token: str | None = None, tls=None, routing_key: str | None = None):
        self.url = url
        self.model = model
        self.version = version
        self.timeout = timeout
        self.tls = tls  # gateway.tls.ClientTLS or None
        metadata = []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        if routing_key:
            metadata.append(("x-routing-key", routing_key))
        self.metadata = tuple(metadata) or None
        self.description = f"gateway at {url}"
        self.concurrency = 8  # requests in flight: enough to hide the round trip
        self._channel = None
        self._stub = None
        self._info: ModelInfo | None = None

    async def start(self) -> ModelInfo:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if self.tls is not None:
            self._channel = grpc.aio.secure_channel(self.url, self.tls.credentials(), options)
        else:
            self._channel = grpc.aio.insecure_channel(self.url, options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        try:
            response = await self._stub.ModelConfig(
                pb.ModelConfigRequest(name=self.model, version=self.version),
                timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
            if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                raise InferenceFailure(code, f"{details} (is a gateway serving on {self.url}?)") \
                    from None
            raise UsageError(f"the gateway at {self.url} refused model '{self.model}'"
                             f"{' version ' + self.version if self.version else ''}: "
                             f"{code}: {details}") from None
        config = response.config
        self._info = ModelInfo(self.model, self.version, config.max_batch_size,
                               _specs(config.input), _specs(config.output))
        return self._info

    async def infer(self, inputs: dict[str, np.ndarray],
                    outputs: list[str]) -> tuple[str, list[np.ndarray]]:
        request = pb.ModelInferRequest(model_name=self.model, model_version=self.version)
        raw = []
        for spec in self._info.inputs:
            array = inputs[spec.name]
            request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
            raw.append(_encode(array, spec.datatype))
        request.raw_input_contents.extend(raw)
        for name in outputs:
            request.outputs.add(name=name)
        try:
            response = await self._stub.ModelInfer(request, timeout=self.timeout,
                                                   metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise InferenceFailure(exc.code().name, exc.details() or "") from None
        by_name = {}
        contents = response.raw_output_contents
        for index, tensor in enumerate(response.outputs):
            by_name[tensor.name] = _decode(contents[index], tensor.datatype, tuple(tensor.shape))
        missing = [n for n in outputs if n not in by_name]
        if missing:
            raise InferenceFailure("INTERNAL", f"the answer has no output {', '.join(missing)}")
        return response.model_version, [by_name[n] for n in outputs]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _encode(array: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=DATATYPE_TO_DTYPE[datatype]).tobytes()
    parts = []
    for item in array.reshape(-1):
        value = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LENGTH.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def _decode(data: bytes, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(data, dtype=DATATYPE_TO_DTYPE[datatype]).reshape(shape)
    items, offset = [], 0
    while offset < len(data):
        (length,) = _LENGTH.unpack_from(data, offset)
        items.append(data[offset + 4:offset + 4 + length])
        offset += 4 + length
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)
