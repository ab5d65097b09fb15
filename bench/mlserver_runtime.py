"""A minimal MLServer runtime over onnxruntime, so MLServer serves the very ONNX file the gateway
serves and a comparison measures the servers, not the runtimes.

Loaded by MLServer inside its own virtual environment (``bench.mlserver_peer``), never by the
gateway: it imports only mlserver, onnxruntime and numpy. Adaptive batching is MLServer's own
(``max_batch_size``/``max_batch_time`` in model-settings.json): it concatenates requests along
the first axis before ``predict`` and splits the outputs after.

``BENCH_ORT_PROVIDER=cuda`` (scripts/gpu_bench.py) puts the model on the GPU through the CUDA
provider; a CUDA provider that did not start fails the load instead of serving on the CPU.
The default, ``cpu``, is the CPU provider.
"""

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        # One intra-op thread per instance, as the gateway runs its CPU instances by default.
        options.intra_op_num_threads = int(os.environ.get("BENCH_ORT_THREADS", "1"))
        path = await get_model_uri(self._settings)
        providers = ["CPUExecutionProvider"]
        if os.environ.get("BENCH_ORT_PROVIDER", "cpu") == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
        self._session = ort.InferenceSession(path, options, providers=providers)
        used = self._session.get_providers()
        if len(providers) > 1 and used[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the CUDA provider did not start ({used})")
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name, model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, np.asarray(value))
                     for name, value in zip(self._outputs, results)])
