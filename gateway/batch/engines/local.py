"""Score in this process, with the model loaded exactly as ``gateway serve`` loads it.

The repository code reads ``config.pbtxt`` (or completes it from the ONNX graph), applies the
version policy, opens every instance of ``instance_group`` with ONNX Runtime and warms them up;
requests are checked by the data plane's ``prepare_inputs`` and run through the version's
batcher, so a model behaves here as it does behind the server. A bare ``.onnx`` file is served
from a temporary one-model repository with its config completed from the graph.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from gateway.batch.engines.base import ModelInfo
from gateway.batch.errors import InferenceFailure, UsageError
from gateway.dataplane import DataPlane, prepare_inputs, requested_outputs, response_tensor
from gateway.errors import GatewayError
from gateway.repository import Repository
from gateway.routing import Router
from gateway.tensors import InferRequest, Tensor


class LocalEngine:
    def __init__(self, repository: Path, model: str, version: str = "", *, cpu_threads: int = 1,
                 execution_timeout: float = 0.0):
        self.path = Path(repository)
        self.model = model
        self.version = version
        self.cpu_threads = cpu_threads
        self.execution_timeout = execution_timeout
        self.description = f"in-process ({self.path})"
        self._repository: Repository | None = None
        self._temporary: Path | None = None
        self._served = None
        self._dataplane: DataPlane | None = None  # for an ensemble: its steps route and batch
        self.concurrency = 2

    def _root(self) -> Path:
        if self.path.is_file():
            if self.path.suffix != ".onnx":
                raise UsageError(f"--model-repository {self.path} is a file but not an .onnx "
                                 "model")
            # A one-model repository: <tmp>/<model>/1/model.onnx, config from the graph.
            self._temporary = Path(tempfile.mkdtemp(prefix="gateway-score-"))
            version_dir = self._temporary / self.model / "1"
            version_dir.mkdir(parents=True)
            (version_dir / "model.onnx").symlink_to(self.path.resolve())
            return self._temporary
        if not self.path.is_dir():
            raise UsageError(f"--model-repository {self.path} is neither a directory nor an "
                             ".onnx file")
        return self.path

    async def start(self) -> ModelInfo:
        self._repository = Repository(self._root(), cpu_threads=self.cpu_threads)
        self._repository.execution_timeout_s = self.execution_timeout
        if self.model not in self._repository.scan():
            raise UsageError(f"model '{self.model}' is not in the repository {self.path} "
                             f"(it has: {', '.join(self._repository.scan()) or 'no models'})")
        entry = await self._repository.load(self.model)
        if not entry.serving:
            reasons = "; ".join(f"version {v}: {r}" if v else r
                                for v, r in sorted(entry.reasons.items()))
            raise UsageError(f"model '{self.model}' did not load: {reasons}")
        try:
            self._served = self._repository.version(self.model, self.version)
        except GatewayError as exc:
            raise UsageError(exc.message) from None
        config = self._served.config
        # The inline budget protects other callers' latency on a server's event loop; here the
        # loop serves this job alone, and a batch that waited for the GIL (the reader's threads
        # hold it at times) is no sign that the model is slow: keep a small model inline.
        if config.ensemble is not None:
            # Its steps are requests to their models, through a data plane of this process.
            self._dataplane = DataPlane(Router(self._repository))
            batchers = [v.batcher for e in self._repository.models.values()
                        for v in e.serving.values()]
        else:
            batchers = [self._served.batcher]
        for batcher in batchers:
            if batcher.inline:
                batcher.inline_budget_ns = 1 << 62
        # Two requests per instance: one runs while the next is being prepared.
        self.concurrency = max(2, 2 * sum(len(b.instances) for b in batchers))
        return ModelInfo(self.model, self._served.version, config.max_batch_size,
                         tuple(config.inputs), tuple(config.outputs))

    async def infer(self, inputs: dict[str, np.ndarray],
                    outputs: list[str]) -> tuple[str, list[np.ndarray]]:
        served = self._served
        config = served.config
        try:
            tensors = [Tensor(spec.name, spec.datatype, inputs[spec.name])
                       for spec in config.inputs]
            if self._dataplane is not None:
                response = await self._dataplane.infer(
                    InferRequest(self.model, served.version, "", tensors, list(outputs)))
                return served.version, [t.data for t in response.outputs]
            arrays, size, key = prepare_inputs(config, tensors)
            wanted = requested_outputs(config, outputs)
            results = await served.batcher.run_now(arrays, size)
            if results is None:
                results = await served.batcher.submit(arrays, size, key)
        except GatewayError as exc:
            raise InferenceFailure(exc.code, exc.message) from None
        return served.version, [response_tensor(config, i, results[i], size).data
                                for i in wanted]

    async def close(self) -> None:
        if self._repository is not None:
            await self._repository.close()
            self._repository = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None
