"""The request path's own rules: in-flight limits, draining, statistics, observers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from gateway.dataplane import DataPlane
from gateway.errors import NotFound, ResourceExhausted, Unavailable
from gateway.events import Events
from gateway.modelconfig import ModelConfig, VersionPolicy
from gateway.statistics import ModelStats
from gateway.tensors import InferRequest, Tensor, TensorSpec


def config(name: str) -> ModelConfig:
    spec = TensorSpec("x", "FP32", (2,))
    return ModelConfig(name, "onnxruntime_onnx", 8, (spec,), (TensorSpec("y", "FP32", (2,)),),
                       VersionPolicy(), None, (), {}, "model.onnx", {}, {"x": 0}, {"y": 0},
                       None)


class HeldBatcher:
    """Queues requests and answers them only when the test says so."""

    def __init__(self):
        self.pending: list[asyncio.Future] = []

    async def run_now(self, arrays, size):
        return None  # never idle: every request queues

    def submit(self, arrays, size, key, *args):
        future = asyncio.get_running_loop().create_future()
        future.arrays = arrays
        self.pending.append(future)
        return future

    def release(self):
        for f in self.pending:
            if not f.done():
                f.set_result([f.arrays[0] * 2])
        self.pending.clear()


class FakeRouter:
    def __init__(self, *names):
        self.policies = {}
        self.events = Events()
        self.versions = {n: SimpleNamespace(model=n, version="1", config=config(n),
                                            batcher=HeldBatcher(), stats=ModelStats())
                         for n in names}

    def route(self, model, version, key):
        if model not in self.versions:
            raise NotFound(f"unknown model '{model}'")
        return self.versions[model]


def request(model: str) -> InferRequest:
    return InferRequest(model, "", "id", [Tensor("x", "FP32", np.ones((1, 2), np.float32))])


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_in_flight_limits_per_model_and_overall():
    router = FakeRouter("a", "b")
    plane = DataPlane(router, max_inflight=3, max_inflight_per_model=2)
    held = [asyncio.create_task(plane.infer(request("a"))) for _ in range(2)]
    await settle()
    with pytest.raises(ResourceExhausted) as info:
        await plane.infer(request("a"))
    assert info.value.message == "model 'a' has 2 requests in flight; retry later"
    held.append(asyncio.create_task(plane.infer(request("b"))))
    await settle()
    with pytest.raises(ResourceExhausted) as info:
        await plane.infer(request("b"))
    assert info.value.message == "the server has 3 requests in flight; retry later"
    for version in router.versions.values():
        version.batcher.release()
    results = await asyncio.gather(*held)
    assert [r.outputs[0].data.tolist() for r in results] == [[[2.0, 2.0]]] * 3
    assert plane.inflight == 0 and plane._per_model == {"a": 0, "b": 0}
    # Slots are free again.
    task = asyncio.create_task(plane.infer(request("a")))
    await settle()
    router.versions["a"].batcher.release()
    assert (await task).version == "1"


async def test_statistics_and_observer_see_every_outcome():
    router = FakeRouter("a")
    plane = DataPlane(router)
    seen = []
    plane.events.subscribe(request_finished=lambda model, served, code, ns: seen.append(
        (model, served is not None, code)))
    task = asyncio.create_task(plane.infer(request("a")))
    await settle()
    router.versions["a"].batcher.release()
    await task
    with pytest.raises(NotFound):
        await plane.infer(request("zz"))
    bad = InferRequest("a", "", "", [Tensor("x", "FP64", np.ones((1, 2)))])
    with pytest.raises(Exception) as info:
        await plane.infer(bad)
    assert info.value.message == "input 'x' must be FP32, got FP64"
    assert seen == [("a", True, "OK"), ("zz", False, "NOT_FOUND"), ("a", True, "INVALID_ARGUMENT")]
    stats = router.versions["a"].stats
    assert (stats.success.count, stats.fail.count) == (1, 1)


async def test_drain_refuses_new_requests_and_waits_for_running_ones():
    router = FakeRouter("a")
    plane = DataPlane(router)
    running = asyncio.create_task(plane.infer(request("a")))
    await settle()
    drain = asyncio.create_task(plane.drain(5))
    await settle()
    with pytest.raises(Unavailable) as info:
        await plane.infer(request("a"))
    assert info.value.message == "the server is shutting down; retry on another replica"
    assert not drain.done()
    router.versions["a"].batcher.release()
    assert (await running).outputs[0].data.tolist() == [[2.0, 2.0]]
    assert await drain is True


async def test_an_unexpected_error_is_accounted_as_internal():
    """A bug on the request path reaches the caller as INTERNAL (the protocol edge maps it):
    it is counted like every other outcome, in statistics and by the observer."""
    router = FakeRouter("a")
    plane = DataPlane(router)
    seen = []
    plane.events.subscribe(request_finished=lambda model, served, code, ns: seen.append(
        (model, served is not None, code)))

    async def broken(arrays, size):
        raise KeyError("a bug")

    router.versions["a"].batcher.run_now = broken
    with pytest.raises(KeyError):
        await plane.infer(request("a"))
    assert seen == [("a", True, "INTERNAL")]
    stats = router.versions["a"].stats
    assert (stats.success.count, stats.fail.count) == (0, 1)
    assert plane.inflight == 0 and plane._per_model == {"a": 0}


async def test_requests_refused_while_draining_are_counted():
    plane = DataPlane(FakeRouter("a"))
    assert await plane.drain(1) is True
    for _ in range(2):
        with pytest.raises(Unavailable):
            await plane.infer(request("a"))
    assert plane.refused == 2


async def test_the_encoding_is_accounted_with_the_request():
    """A protocol's encoding runs inside the accounting: a response refused there (too large
    to send) counts as the error the caller gets, not as OK."""
    router = FakeRouter("a")
    plane = DataPlane(router)
    seen = []
    plane.events.subscribe(request_finished=lambda model, served, code, ns: seen.append(code))

    def refuse(response):
        raise ResourceExhausted("the response would be 9 bytes, over the limit of 8")

    async def answer(encode):
        task = asyncio.create_task(plane.infer(request("a"), encode))
        await settle()
        router.versions["a"].batcher.release()
        return await task

    assert await answer(lambda response: ("encoded", response.version)) == ("encoded", "1")
    with pytest.raises(ResourceExhausted):
        await answer(refuse)
    assert seen == ["OK", "RESOURCE_EXHAUSTED"]
    stats = router.versions["a"].stats
    assert (stats.success.count, stats.fail.count) == (1, 1)


# ---------------------------------------------------------------- validation helpers

def config_from(text: str, io) -> ModelConfig:
    from google.protobuf import text_format

    from gateway.modelconfig import complete_config, validate
    from gateway.modelconfig_pb import model_config_pb2 as mc

    proto = text_format.Parse(text, mc.ModelConfig(name="m"))
    complete_config(proto, "max_batch_size" in text, io)
    return validate(proto, io)


def test_a_variable_reshape_carries_the_variable_dims_both_ways():
    """Triton's L0_infer_reshape: dims [2, 4, -1, 6] reshape [8, -1, 1, 6]; the model sees
    [b, 8, n, 1, 6] and the caller gets [b, 2, 4, n, 6] back."""
    from gateway.dataplane import prepare_inputs, response_tensor
    from runtimes.base import ModelIO

    io = ModelIO([TensorSpec("x", "INT32", (-1, 8, -1, 1, 6))],
                 [TensorSpec("y", "INT32", (-1, 8, -1, 1, 6))])
    cfg = config_from("""max_batch_size: 8
        input [ { name: "x" data_type: TYPE_INT32 dims: [ 2, 4, -1, 6 ]
                  reshape: { shape: [ 8, -1, 1, 6 ] } } ]
        output [ { name: "y" data_type: TYPE_INT32 dims: [ 2, 4, -1, 6 ]
                   reshape: { shape: [ 8, -1, 1, 6 ] } } ]""", io)
    x = np.arange(3 * 2 * 4 * 5 * 6, dtype=np.int32).reshape(3, 2, 4, 5, 6)
    (fed,), size, key = prepare_inputs(cfg, [Tensor("x", "INT32", x)])
    assert fed.shape == (3, 8, 5, 1, 6) and size == 3 and key == ((8, 5, 1, 6),)
    out = response_tensor(cfg, 0, fed, size)
    assert out.data.shape == (3, 2, 4, 5, 6)
    np.testing.assert_array_equal(out.data, x)


def test_a_dimensionless_model_tensor_is_fed_as_a_scalar_and_answered_with_config_dims():
    from gateway.dataplane import prepare_inputs, response_tensor
    from runtimes.base import ModelIO

    io = ModelIO([TensorSpec("x", "FP32", ())], [TensorSpec("y", "FP32", ())])
    cfg = config_from("""input [ { name: "x" data_type: TYPE_FP32 dims: [ 1, 1 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 1, 1 ] } ]""", io)
    (fed,), size, _ = prepare_inputs(cfg, [Tensor("x", "FP32", np.ones((1, 1), np.float32))])
    assert fed.shape == ()
    assert response_tensor(cfg, 0, np.float32(2.0), size).data.shape == (1, 1)


def test_an_unknown_output_is_refused_in_tritons_words():
    from gateway.dataplane import requested_outputs
    from gateway.errors import InvalidArgument
    from runtimes.base import ModelIO

    io = ModelIO([TensorSpec("x", "FP32", (-1, 2))], [TensorSpec("y", "FP32", (-1, 2))])
    cfg = config_from("max_batch_size: 4", io)
    with pytest.raises(InvalidArgument) as info:
        requested_outputs(cfg, ["nope"])
    assert info.value.message == ("unexpected inference output 'nope' for model 'm'; its "
                                  "outputs are y")
    with pytest.raises(InvalidArgument, match="output 'y' already exists in request"):
        requested_outputs(cfg, ["y", "y"])


def test_onnxruntime_cannot_carry_bytes_that_are_not_utf8(tmp_path):
    """Why non-UTF-8 BYTES are refused (Triton's L0_string_io round-trips any bytes): ONNX
    Runtime's Python API str()s object elements and decodes bytes_ arrays as UTF-8. If a
    release carries bytes unchanged, this fails: serve them instead of refusing."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gateway.dataplane import as_text
    from gateway.errors import InvalidArgument

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.STRING, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    raw = b"\xff\xfe"
    (y,) = session.run(None, {"x": np.array([raw], dtype=object)})
    assert y[0] != raw and y[0] != raw.decode("latin-1")  # the repr "b'\\xff\\xfe'", not bytes
    with pytest.raises(UnicodeDecodeError):
        session.run(None, {"x": np.array([raw], dtype=np.bytes_)})
    with pytest.raises(InvalidArgument, match="not valid UTF-8 .* as UTF-8 only"):
        as_text("x", np.array([raw], dtype=object))


def test_an_unknown_model_is_unavailable_while_the_server_loads_its_models(tmp_path):
    """At start the port listens before the models load: a model asked for then may be on its
    way, so clients are told to retry (UNAVAILABLE), not that it does not exist."""
    from gateway.errors import NotFound, Unavailable
    from gateway.repository import Repository

    repository = Repository(tmp_path)
    repository.starting = True
    with pytest.raises(Unavailable, match="the server is starting and still loading"):
        repository.version("m", "")
    repository.starting = False
    with pytest.raises(NotFound, match="Request for unknown model: 'm' is not found"):
        repository.get("m")
