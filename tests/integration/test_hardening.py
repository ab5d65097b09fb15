"""Bad input is refused before memory is spent (issue 13), on the wire against a real server.

Each case asserts the status code and the message together, and that the server's resident
memory (VmRSS) stays bounded while it answers, with generous margins: the failures these
cases guard against grew the server by hundreds of MB to GBs.
"""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper
from support import TIMEOUT, assert_no_path, raises, rpc_error, start_gateway

from bench import models
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc
from gateway.protocol.pb import grpc_service_pb2 as pb
from gateway.protocol.pb import grpc_service_pb2_grpc as pb_grpc

MB = 1 << 20
LIMIT = 64 * MB  # the server's default message limit (send and receive)
LONG = "n" * 20_000  # over gRPC's 16 KiB metadata limit, were it echoed whole
SHOWN = "n" * 128 + "...(20000 characters)"
TILE = 64  # the tile model's output is this many times its input


def build_tile(path):
    """INPUT0 FP32 [batch, n] -> OUTPUT0 [batch, n * TILE]: an answer far larger than the ask."""
    repeats = numpy_helper.from_array(np.array([1, TILE], dtype=np.int64), "repeats")
    graph = helper.make_graph(
        [helper.make_node("Tile", ["INPUT0", "repeats"], ["OUTPUT0"], name="tile")], "tile",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "m"])],
        initializer=[repeats])
    return models._save(graph, path)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = tmp_path_factory.mktemp("hardening")
    models.make_version(repo, "strings", 1, models.build_identity, "BYTES")
    models.make_version(repo, "ident", 1, models.build_identity, "FP32")
    models.make_version(repo, "add_sub", 1, models.build_add_sub)
    models.make_version(repo, "tile", 1, build_tile)
    models.make_version(repo, "iris", 1, models.build_iris_classifier)
    (repo / "iris" / "gateway.yaml").write_text("feedback: {}\n")
    with start_gateway(repo) as gw, grpc.insecure_channel(gw.url, options=[
            ("grpc.max_send_message_length", 2 * LIMIT),
            ("grpc.max_receive_message_length", 2 * LIMIT)]) as channel:
        gw.repo = repo
        gw.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        gw.admin = apb_grpc.GatewayAdminStub(channel)
        gw.client = grpcclient.InferenceServerClient(gw.url)
        yield gw
        gw.client.close()
    assert gw.process.returncode == 0, gw.log()


def tree_of(root) -> list[str]:
    """Every path under root, hidden ones included (a staging directory would show)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def rss(gw) -> int:
    """The server's resident memory in bytes (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{gw.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Peak:
    """Samples the server's RSS in a thread while the block runs: ``growth`` is the peak
    above the RSS at entry."""

    def __init__(self, gw):
        self.gw = gw

    def __enter__(self):
        self.start = self.peak = rss(self.gw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss(self.gw))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss(self.gw))

    @property
    def growth(self) -> int:
        return self.peak - self.start


def still_serving(gw):
    x = np.ones((1, 16), np.float32)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        inputs.append(grpcclient.InferInput(name, [1, 16], "FP32"))
        inputs[-1].set_data_from_numpy(x)
    result = gw.client.infer("add_sub", inputs, client_timeout=TIMEOUT)
    assert (result.as_numpy("OUTPUT0") == 2).all()


def infer_request(model, *tensors, outputs=(), **fields) -> pb.ModelInferRequest:
    """(name, datatype, shape, raw bytes or None) per input."""
    msg = pb.ModelInferRequest(model_name=model, **fields)
    raw = []
    for name, datatype, shape, data in tensors:
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        raw.append(data)
    if any(d is not None for d in raw):
        msg.raw_input_contents.extend(raw)
    for name in outputs:
        msg.outputs.add(name=name)
    return msg


# ---- declared sizes against the bytes sent ----------------------------------------------------

@pytest.mark.parametrize("count", [2**27, 2**31])
def test_a_huge_bytes_shape_with_no_data_is_refused_without_allocating(gateway, count):
    # 30 bytes on the wire used to allocate ~3 GB (2**27) or fail INTERNAL (2**31).
    msg = infer_request("strings", ("INPUT0", "BYTES", [1, count], b""))
    assert msg.ByteSize() < 64
    with Peak(gateway) as peak:
        rpc_error(gateway.stub.ModelInfer, msg, "INVALID_ARGUMENT",
                  f"expected {count} string elements for inference input 'INPUT0' for model "
                  "'strings', got 0 bytes, which hold at most 0")
    assert peak.growth < 100 * MB, peak.growth
    still_serving(gateway)


def test_huge_numeric_and_typed_shapes_are_refused_without_allocating(gateway):
    with Peak(gateway) as peak:
        rpc_error(gateway.stub.ModelInfer,
                  infer_request("ident", ("INPUT0", "FP32", [1, 2**31], b"\0" * 8)),
                  "INVALID_ARGUMENT", "input 'INPUT0': shape [1, 2147483648] of FP32 needs "
                  "8589934592 bytes but 8 were sent")
        typed = infer_request("strings", ("INPUT0", "BYTES", [1, 2**31], None))
        rpc_error(gateway.stub.ModelInfer, typed, "INVALID_ARGUMENT",
                  "input 'INPUT0': shape [1, 2147483648] needs 2147483648 values but 0 were sent "
                  "in contents.bytes_contents")
        # Many tiny strings: within the message limit, past the per-request element cap.
        count = (1 << 20) + 1
        rpc_error(gateway.stub.ModelInfer,
                  infer_request("strings", ("INPUT0", "BYTES", [1, count], b"\0" * (4 * count))),
                  "INVALID_ARGUMENT", "input 'INPUT0': the request's inputs hold more than "
                  "1048576 BYTES elements and typed-contents values together")
    assert peak.growth < 100 * MB, peak.growth
    still_serving(gateway)


def test_bytes_count_mismatches_use_tritons_wording(gateway):
    data = b"".join(len(s).to_bytes(4, "little") + s for s in (b"ab", b"cd", b"ef"))
    rpc_error(gateway.stub.ModelInfer, infer_request("strings", ("INPUT0", "BYTES", [1, 2], data)),
              "INVALID_ARGUMENT", "unexpected number of string elements 3 for inference input "
              "'INPUT0' for model 'strings', expecting 2")
    rpc_error(gateway.stub.ModelInfer, infer_request("strings", ("INPUT0", "BYTES", [1, 4], data)),
              "INVALID_ARGUMENT", "expected 4 string elements for inference input 'INPUT0' for "
              "model 'strings', got 3")


# ---- outputs and the size of the answer -------------------------------------------------------

def test_an_output_asked_for_twice_is_refused(gateway):
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        inputs.append(grpcclient.InferInput(name, [1, 16], "FP32"))
        inputs[-1].set_data_from_numpy(np.ones((1, 16), np.float32))
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT1", "OUTPUT0", "OUTPUT1")]
    with raises("INVALID_ARGUMENT", "output 'OUTPUT1' already exists in request"):
        gateway.client.infer("add_sub", inputs, outputs=outputs, client_timeout=TIMEOUT)
    # 200,000 times: one 3.4 MB request used to build a 160 MB answer and fail with a traceback.
    x = np.ones((1, 16), np.float32).tobytes()
    msg = infer_request("add_sub", ("INPUT0", "FP32", [1, 16], x), ("INPUT1", "FP32", [1, 16], x),
                        outputs=["OUTPUT0"] * 200_000)
    with Peak(gateway) as peak:
        rpc_error(gateway.stub.ModelInfer, msg, "INVALID_ARGUMENT",
                  "output 'OUTPUT0' already exists in request")
    assert peak.growth < 50 * MB, peak.growth
    still_serving(gateway)


def tile_request(n: int, request_id: str) -> pb.ModelInferRequest:
    x = np.full((1, n), 0.5, np.float32).tobytes()
    return infer_request("tile", ("INPUT0", "FP32", [1, n], x), id=request_id)


BIG = LIMIT // (4 * TILE) + 4096  # tiled, just over the send limit


def test_an_answer_over_the_send_limit_is_a_clear_error(gateway):
    details = rpc_error(gateway.stub.ModelInfer, tile_request(BIG, "big"), "RESOURCE_EXHAUSTED",
                        "the response would be about ", " bytes, over the server's message "
                        f"limit of {LIMIT} bytes; ask for fewer outputs or a smaller batch")
    assert int(details.split()[5]) > BIG * 4 * TILE
    answer = gateway.stub.ModelInfer(tile_request(16, "small"), timeout=TIMEOUT)
    assert answer.outputs[0].shape == [1, 16 * TILE]


def test_one_answer_over_the_send_limit_on_a_stream_fails_alone(gateway):
    """It used to kill the stream: every other answer on it was lost."""
    sent = [tile_request(16, "a"), tile_request(BIG, "big"), tile_request(16, "b"),
            pb.ModelInferRequest(model_name="nope", id="c"), tile_request(32, "d")]
    answers = list(gateway.stub.ModelStreamInfer(iter(sent), timeout=TIMEOUT))
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["a", "b", "big", "c", "d"]
    for rid, n in (("a", 16), ("b", 16), ("d", 32)):
        assert not by_id[rid].error_message
        assert by_id[rid].infer_response.outputs[0].shape == [1, n * TILE]
    message = by_id["big"].error_message
    assert message.startswith("the response would be about ") and message.endswith(
        f" bytes, over the server's message limit of {LIMIT} bytes; ask for fewer outputs or "
        "a smaller batch")
    assert by_id["big"].infer_response.model_name == "tile"
    assert by_id["c"].error_message == "Request for unknown model: 'nope' is not found"


# ---- streams: backpressure --------------------------------------------------------------------

def test_a_stream_whose_client_does_not_read_stops_being_read(gateway):
    """1.6 MB of requests on a stream nobody read grew the server by 211 MB: the server read
    everything and queued every answer. Now it reads while a bounded number are in flight, and
    every request it read is still answered once the client reads."""
    n, width = 8000, 4096  # 16 KiB per request, 128 MB in all
    x = np.arange(width, dtype=np.float32).reshape(1, width).tobytes()
    taken = [0]

    def requests():
        for i in range(n):
            taken[0] += 1
            yield infer_request("ident", ("INPUT0", "FP32", [1, width], x), id=str(i))

    with Peak(gateway) as peak:
        answers = gateway.stub.ModelStreamInfer(requests(), timeout=120)
        last, still = -1, 0
        while still < 20:  # until the sender has been held back for a second
            time.sleep(0.05)
            still = still + 1 if taken[0] == last else 0
            last = taken[0]
        held_back_at = taken[0]
    assert held_back_at < n, "the server read the whole stream while nobody read its answers"
    assert peak.growth < 64 * MB, peak.growth
    got = []
    for answer in answers:
        assert not answer.error_message, answer.error_message
        got.append(int(answer.infer_response.id))
    assert sorted(got) == list(range(n))
    still_serving(gateway)


# ---- callers' strings in messages -------------------------------------------------------------

def test_names_over_16_kib_are_truncated_in_errors(gateway):
    """Echoed whole, they made the status trailer too large: RESOURCE_EXHAUSTED instead."""
    x = np.ones((1, 16), np.float32).tobytes()
    stub = gateway.stub
    rpc_error(stub.ModelInfer, infer_request(LONG, ("INPUT0", "FP32", [1, 16], x)),
              "NOT_FOUND", f"Request for unknown model: '{SHOWN}' is not found")
    rpc_error(stub.ModelInfer, infer_request("ident", (LONG, "FP32", [1, 16], x)),
              "INVALID_ARGUMENT", f"model 'ident' has no input '{SHOWN}'")
    rpc_error(stub.ModelInfer, infer_request("ident", ("INPUT0", "FP32", [1, 16], x),
                                             outputs=[LONG]),
              "INVALID_ARGUMENT", f"unexpected inference output '{SHOWN}' for model 'ident'")
    rpc_error(stub.ModelInfer, infer_request("ident", ("INPUT0", LONG, [1, 16], x)),
              "INVALID_ARGUMENT", f"input 'INPUT0' has unsupported datatype '{SHOWN}'")
    rpc_error(stub.ModelInfer, infer_request("ident", ("INPUT0", "FP32", [1, 16], x),
                                             model_version=LONG),
              "NOT_FOUND", f"Request for unknown model: 'ident' version {SHOWN} is not found")
    rpc_error(stub.ModelMetadata, pb.ModelMetadataRequest(name=LONG), "NOT_FOUND",
              f"Request for unknown model: '{SHOWN}' is not found")
    rpc_error(stub.ModelConfig, pb.ModelConfigRequest(name="ident", version=LONG), "NOT_FOUND",
              f"Request for unknown model: 'ident' version {SHOWN} is not found")
    rpc_error(gateway.admin.GetTraffic, apb.GetTrafficRequest(model=LONG), "INVALID_ARGUMENT",
              f"invalid model name '{SHOWN}'")
    # On a stream too: the error answer is sent, the stream goes on.
    answers = list(stub.ModelStreamInfer(iter([
        infer_request(LONG, ("INPUT0", "FP32", [1, 16], x), id="long"),
        infer_request("ident", ("INPUT0", "FP32", [1, 16], x), id="ok")]), timeout=TIMEOUT))
    by_id = {a.infer_response.id: a for a in answers}
    assert by_id["long"].error_message == f"Request for unknown model: '{SHOWN}' is not found"
    assert not by_id["ok"].error_message


def test_a_model_name_with_a_trailing_newline_is_refused(gateway, tmp_path):
    data = models.build_iris_classifier(tmp_path / "iris.onnx").read_bytes()
    before = tree_of(gateway.repo)
    for name, shown in (("newmodel\n", "newmodel\\n"), ("iris\n", "iris\\n")):
        chunks = [apb.PublishChunk(header=apb.PublishHeader(model=name, size=len(data))),
                  apb.PublishChunk(data=data)]
        with pytest.raises(grpc.RpcError) as info:
            gateway.admin.PublishVersion(iter(chunks), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"invalid model name '{shown}': use letters")
    assert tree_of(gateway.repo) == before
    rpc_error(gateway.stub.ModelInfer, infer_request("iris\n", ("input", "FP32", [1, 4], b"\0" * 16)),
              "NOT_FOUND", "Request for unknown model: 'iris\\n' is not found")


def test_a_garbage_baseline_npz_is_invalid_argument(gateway, tmp_path):
    data = models.build_iris_classifier(tmp_path / "iris.onnx").read_bytes()
    before = tree_of(gateway.repo)
    good = io.BytesIO()
    np.savez(good, format=np.array(1))
    for baseline, message in [
        (b"PK\x03\x04" + b"\x00" * 100, ("baseline.npz is not usable: not a readable npz (zip) "
         "archive (BadZipFile)")),
        (good.getvalue()[:-40], "baseline.npz is not usable: not a readable npz (zip) archive"),
        (b"garbage" * 10, "baseline.npz is not usable: not a readable npz (zip) archive"),
        (good.getvalue(), "baseline.npz is not usable: missing array"),
    ]:
        chunks = [apb.PublishChunk(header=apb.PublishHeader(model="iris", size=len(data),
                                                            baseline_npz=baseline)),
                  apb.PublishChunk(data=data)]
        with pytest.raises(grpc.RpcError) as info:
            gateway.admin.PublishVersion(iter(chunks), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith(message), info.value.details()
        assert_no_path(info.value.details(), gateway.repo)
    assert tree_of(gateway.repo) == before


def test_feedback_does_not_keep_huge_request_ids(gateway):
    """500 requests with 1 MB ids held 490 MB of the server. A first round settles the
    allocator (buffers for 1 MB messages); a second round of 300 would add ~300 MB if kept."""
    x = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32).tobytes()

    def send(first, count):
        for i in range(first, first + count):
            gateway.stub.ModelInfer(infer_request("iris", ("input", "FP32", [1, 4], x),
                                                  id=f"{i:04d}" + "i" * MB), timeout=TIMEOUT)

    send(0, 100)
    with Peak(gateway) as peak:
        send(100, 300)
    assert peak.growth < 100 * MB, peak.growth
    gateway.stub.ModelInfer(infer_request("iris", ("input", "FP32", [1, 4], x), id="short"),
                            timeout=TIMEOUT)
    status = gateway.admin.GetFeedback(apb.GetFeedbackRequest(model="iris"), timeout=TIMEOUT)
    assert status.kept == 1
