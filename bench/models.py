"""Deterministic builders of real ONNX models for the demo repository, the tests and the benchmarks.

Every builder writes ``path`` and returns it as a ``Path``. The same arguments always give the same
bytes (seeded weights, fixed names, no timestamps), so committed models can be checked for
staleness.
Models use opset 17 and IR version 8, which every onnxruntime since 1.13 loads (1.31 included).
Only onnx and numpy are needed, except for the sklearn-based iris classifier.
"""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ML_OPSET = 3  # ai.onnx.ml version that goes with opset 17
IR_VERSION = 8  # lowest IR version that allows opset 17; loads in old and new onnxruntime
PRODUCER = "gateway-bench"

TINY_MLP = (32, 128, 128, 4)
HEAVY_MLP = (512, 2048, 2048, 2048, 10)

# KServe V2 datatype name -> ONNX element type.
DATATYPE_TO_ONNX = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path, ml: bool = False) -> Path:
    """Wrap a graph in a checked model with pinned opsets and IR version, and write it."""
    opsets = [helper.make_opsetid("", OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def _fp32(name: str, *dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])


def build_mlp(path, layer_sizes=TINY_MLP, seed=0, input_name="input", output_name="output") -> Path:
    """FP32 MLP: Gemm per layer, Relu between layers, He-initialised so outputs stay O(1)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], input_name
    layers = list(itertools.pairwise(layer_sizes))
    for i, (n_in, n_out) in enumerate(layers):
        w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(layers) - 1
        y = output_name if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], name=f"gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
            y = f"r{i}"
        x = y
    graph = helper.make_graph(
        nodes,
        "mlp",
        [_fp32(input_name, layer_sizes[0])],
        [_fp32(output_name, layer_sizes[-1])],
        initializer=inits,
    )
    return _save(graph, path)


def _iris_pipeline(zipmap: bool, name: str) -> onnx.ModelProto:
    """StandardScaler + LogisticRegression on sklearn's bundled iris data, converted by skl2onnx."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=1000)
    pipe = Pipeline([("scaler", StandardScaler()), ("clf", clf)]).fit(x.astype(np.float32), y)
    model = convert_sklearn(
        pipe,
        name=name,
        initial_types=[("input", FloatTensorType([None, 4]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options={id(clf): {"zipmap": zipmap}},
    )
    model.ir_version = IR_VERSION
    opsets = {o.domain: o.version for o in model.opset_import}  # skl2onnx may list a domain twice
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    for value in [*model.graph.input, *model.graph.output]:  # name the batch dim like our models
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(model)
    return model


def build_iris_classifier(path) -> Path:
    """Iris pipeline without ZipMap.

    input FP32 [batch,4] -> label INT64 [batch], probabilities FP32 [batch,3].
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(_iris_pipeline(zipmap=False, name="iris_classifier"), path)
    return path


def build_identity(path, datatype: str) -> Path:
    """INPUT0 -> Identity -> OUTPUT0 of one KServe datatype, shape [batch, n]: codec round trips."""
    elem = DATATYPE_TO_ONNX[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], name="identity")],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", elem, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", elem, ["batch", "n"])],
    )
    return _save(graph, path)


def build_add_sub(path) -> Path:
    """Triton's "simple" model, FP32: INPUT0, INPUT1 [batch,16] -> OUTPUT0 a+b, OUTPUT1 a-b."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
        ],
        "add_sub",
        [_fp32("INPUT0", 16), _fp32("INPUT1", 16)],
        [_fp32("OUTPUT0", 16), _fp32("OUTPUT1", 16)],
    )
    return _save(graph, path)


FAIL_THRESHOLD = 10.0


def build_failing_model(path, always: bool = False) -> Path:
    """Loads fine, fails in run(): tests check that a model error fails only its own batch.

    INPUT0 FP32 [batch,4] -> OUTPUT0 FP32 [batch,4] = floor(x) for x in [0, 10), computed by a
    Gather on a 10-entry table, so any value >= ``FAIL_THRESHOLD`` raises "indices out of bounds".
    With ``always=True`` a Reshape to [3,5] follows, which no [batch,4] input can satisfy
    (OUTPUT0 is then declared [3,5]).
    """
    table = numpy_helper.from_array(np.arange(10, dtype=np.float32), "table")
    nodes = [
        helper.make_node("Cast", ["INPUT0"], ["idx"], to=TensorProto.INT64, name="cast"),
        helper.make_node(
            "Gather", ["table", "idx"], ["gathered" if always else "OUTPUT0"], name="gather"
        ),
    ]
    inits = [table]
    if always:
        inits.append(numpy_helper.from_array(np.array([3, 5], dtype=np.int64), "bad_shape"))
        nodes.append(
            helper.make_node("Reshape", ["gathered", "bad_shape"], ["OUTPUT0"], name="reshape")
        )
    graph = helper.make_graph(
        nodes,
        "failing",
        [_fp32("INPUT0", 4)],
        [
            helper.make_tensor_value_info(
                "OUTPUT0", TensorProto.FLOAT, [3, 5] if always else ["batch", 4]
            )
        ],
        initializer=inits,
    )
    return _save(graph, path)


def build_sequence_output_model(path) -> Path:
    """A non-tensor output next to a tensor one, as skl2onnx classifiers with ZipMap produce.

    INPUT0 FP32 [batch,3] -> OUTPUT0 FP32 [batch,3] (copy) and OUTPUT1 sequence<map<int64, float>>
    (ZipMap over class labels 0..2). The gateway must reject or skip OUTPUT1 cleanly.
    """
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], name="identity"),
            helper.make_node(
                "ZipMap",
                ["INPUT0"],
                ["OUTPUT1"],
                domain="ai.onnx.ml",
                classlabels_int64s=[0, 1, 2],
                name="zipmap",
            ),
        ],
        "sequence_output",
        [_fp32("INPUT0", 3)],
        [_fp32("OUTPUT0", 3), helper.make_value_info("OUTPUT1", seq_map)],
    )
    return _save(graph, path, ml=True)


def build_busy_model(path, width: int = 256, seed: int = 0) -> Path:
    """Runs as long as the caller asks, so tests can hold a model instance busy on purpose.

    ITERATIONS INT64 [batch,1] and INPUT0 FP32 [batch,4] -> OUTPUT0 FP32 [batch,4] = INPUT0.
    A Loop multiplies a [width,width] matrix max(ITERATIONS) times (each pass costs about
    width**3 multiply-adds) and adds zero times its sum to the output. A warm-up with zeros costs
    nothing; a request with ITERATIONS=n keeps one instance busy for n passes.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    s0 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["s_in", "w"], ["prod"], name="matmul"),
            helper.make_node("Tanh", ["prod"], ["s_out"], name="tanh"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"),
        ],
        "busy_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [width, width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [width, width]),
        ],
    )
    nodes = [
        helper.make_node("ReduceMax", ["ITERATIONS"], ["trips"], keepdims=0, name="trips"),
        helper.make_node("Loop", ["trips", "true", "s0"], ["s_final"], body=body, name="loop"),
        helper.make_node("ReduceSum", ["s_final"], ["total"], keepdims=0, name="total"),
        helper.make_node("Mul", ["total", "zero"], ["nothing"], name="nothing"),
        helper.make_node("Add", ["INPUT0", "nothing"], ["OUTPUT0"], name="output"),
    ]
    graph = helper.make_graph(
        nodes,
        "busy",
        [helper.make_tensor_value_info("ITERATIONS", TensorProto.INT64, ["batch", 1]),
         _fp32("INPUT0", 4)],
        [_fp32("OUTPUT0", 4)],
        initializer=[
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(s0, "s0"),
            numpy_helper.from_array(np.array(True), "true"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    return _save(graph, path)


def write_config(model_dir, text: str) -> Path:
    """Write ``<model_dir>/config.pbtxt`` (dedented, one trailing newline)."""
    path = Path(model_dir) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).strip() + "\n")
    return path


def make_version(repo, model: str, version, builder: Callable[..., Path], *args, **kwargs) -> Path:
    """Build ``<repo>/<model>/<version>/model.onnx`` with ``builder(path, *args, **kwargs)``."""
    return builder(Path(repo) / model / str(version) / "model.onnx", *args, **kwargs)
