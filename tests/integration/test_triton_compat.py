"""Triton compatibility with tritonclient, on models built here with onnx.helper: a configured
queue delay batches a small fixed-shape model, reshape with -1 dims, a model tensor without
dims served with dims [1], and what is refused at load says why."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from support import TIMEOUT, index_rows, start_gateway

from bench import models


def save(path, nodes, inputs, outputs):
    path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    repo = tmp_path_factory.mktemp("compat")
    # Small and fixed-shape, so it runs on the event loop; the delay must still batch it.
    models.build_add_sub(repo / "delayed" / "1" / "model.onnx")
    models.write_config(repo / "delayed", """
        max_batch_size: 8
        dynamic_batching { preferred_batch_size: [ 2, 6 ] max_queue_delay_microseconds: 60000000 }
    """)
    vi = helper.make_tensor_value_info
    save(repo / "reshaped" / "1" / "model.onnx", [helper.make_node("Identity", ["x"], ["y"])],
         [vi("x", TensorProto.INT32, [8, "n", 1, 6])], [vi("y", TensorProto.INT32, [8, "n", 1, 6])])
    models.write_config(repo / "reshaped", """
        input [ { name: "x" data_type: TYPE_INT32 dims: [ 2, 4, -1, 6 ]
                  reshape: { shape: [ 8, -1, 1, 6 ] } } ]
        output [ { name: "y" data_type: TYPE_INT32 dims: [ 2, 4, -1, 6 ]
                   reshape: { shape: [ 8, -1, 1, 6 ] } } ]
    """)
    save(repo / "scalar" / "1" / "model.onnx", [helper.make_node("Identity", ["x"], ["y"])],
         [vi("x", TensorProto.FLOAT, None)], [vi("y", TensorProto.FLOAT, None)])  # no rank
    models.write_config(repo / "scalar", """
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
    """)
    models.build_add_sub(repo / "stateful" / "1" / "model.onnx")
    models.write_config(repo / "stateful", "max_batch_size: 8\nsequence_batching { }\n")
    with (start_gateway(repo) as gw,
          grpcclient.InferenceServerClient(gw.url) as c):
        yield c


def tensor(name, array, datatype):
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def test_a_configured_queue_delay_batches_a_small_fixed_shape_model(client):
    """Two concurrent requests reach the preferred size 2: one execution of a batch of 2 (the
    inline fast path used to run each alone), and no wait for the 60 s delay."""
    results = {}

    def call(value):
        x = np.full((1, 16), value, np.float32)
        out = client.infer("delayed", [tensor("INPUT0", x, "FP32"), tensor("INPUT1", x, "FP32")],
                           client_timeout=TIMEOUT)
        results[value] = out.as_numpy("OUTPUT0")

    threads = [threading.Thread(target=call, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[2.0], np.full((1, 16), 4.0, np.float32))
    stats = client.get_inference_statistics("delayed").model_stats[0]
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {2: 1}
    assert stats.execution_count == 1 and stats.inference_count == 2


def test_reshape_with_variable_dims(client):
    x = np.arange(2 * 4 * 5 * 6, dtype=np.int32).reshape(2, 4, 5, 6)
    out = client.infer("reshaped", [tensor("x", x, "INT32")], client_timeout=TIMEOUT)
    np.testing.assert_array_equal(out.as_numpy("y"), x)
    meta = client.get_model_metadata("reshaped")
    assert list(meta.inputs[0].shape) == [2, 4, -1, 6]


def test_a_model_tensor_without_dims_is_served_with_dims_one(client):
    x = np.array([3.5], np.float32)
    out = client.infer("scalar", [tensor("x", x, "FP32")], client_timeout=TIMEOUT)
    np.testing.assert_array_equal(out.as_numpy("y"), x)


def test_sequence_batching_is_refused_at_load_with_the_reason(client):
    state, reason = index_rows(client)[("stateful", "1")]
    assert state == "UNAVAILABLE" and "sequence_batching is not supported" in reason
