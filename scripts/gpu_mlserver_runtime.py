"""MLServer runtime over onnxruntime for the GPU bench (scripts/gpu_bench.py): the model on the
GPU through the CUDA provider (``BENCH_ORT_PROVIDER=cuda``, the default) or on the CPU (``cpu``,
a dry run), one intra-op thread as the gateway's instances.

The same ~30 lines as bench/mlserver_runtime.py, with the provider chosen and checked: a CUDA
provider that did not start fails the load instead of serving on the CPU. Loaded by MLServer,
never by the gateway: it imports only mlserver, onnxruntime and numpy.
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
        options.intra_op_num_threads = 1
        path = await get_model_uri(self._settings)
        if os.environ.get("BENCH_ORT_PROVIDER", "cuda") == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(path, options, providers=providers)
        used = self._session.get_providers()
        if providers[0] != "CPUExecutionProvider" and used[0] != "CUDAExecutionProvider":
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
