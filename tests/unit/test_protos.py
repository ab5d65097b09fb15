"""The committed KServe V2 protos are fresh and wire-compatible with tritonclient.

tritonclient registers the same `inference.*` symbols in protobuf's default
descriptor pool, so anything that imports tritonclient runs in a subprocess;
this process only ever imports gateway.protocol.pb.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Prints {proto_file: {messages, enums, methods, serialized}} for the modules in argv.
DUMP = textwrap.dedent(
    """
    import base64, importlib, json, sys
    from google.protobuf import descriptor_pb2
    LABEL = {1: "optional", 2: "required", 3: "repeated"}
    out = {}
    for name in sys.argv[1:]:
        fdp = descriptor_pb2.FileDescriptorProto()
        importlib.import_module(name).DESCRIPTOR.CopyToProto(fdp)
        messages, enums, methods = {}, {}, {}
        def enum(e, prefix):
            enums[prefix + e.name] = {v.name: v.number for v in e.value}
        def walk(m, prefix):
            full = prefix + m.name
            messages[full] = {
                f.name: [f.number, f.type_name.lstrip(".") or descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                         LABEL[f.label], m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None]
                for f in m.field}
            for e in m.enum_type: enum(e, full + ".")
            for n in m.nested_type: walk(n, full + ".")
        pkg = fdp.package + "."
        for m in fdp.message_type: walk(m, pkg)
        for e in fdp.enum_type: enum(e, pkg)
        for s in fdp.service:
            for r in s.method:
                methods[pkg + s.name + "/" + r.name] = [r.input_type.lstrip("."), r.output_type.lstrip("."),
                                                        r.client_streaming, r.server_streaming]
        out[fdp.name] = {"messages": messages, "enums": enums, "methods": methods,
                         "serialized": base64.b64encode(fdp.SerializeToString()).decode()}
    print(json.dumps(out))
    """
)

TRITON_MODULES = ["tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2"]
OUR_MODULES = [
    "gateway.protocol.pb.grpc_service_pb2",
    "gateway.modelconfig_pb.model_config_pb2",
]


def _python(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _require_tritonclient() -> None:
    if importlib.util.find_spec("tritonclient") is None:  # find_spec does not import it
        pytest.skip("tritonclient is not installed")


@pytest.fixture(scope="module")
def dumps() -> tuple[dict, dict]:
    _require_tritonclient()
    return json.loads(_python(DUMP, *TRITON_MODULES)), json.loads(
        _python(DUMP, *OUR_MODULES)
    )


def _mismatches(theirs: dict, ours: dict, *, both_ways: bool) -> list[str]:
    """Every symbol of theirs must exist in ours unchanged (and vice versa if both_ways)."""
    problems = []
    pairs = [(theirs, ours, "tritonclient", "ours")]
    pairs += [(ours, theirs, "ours", "tritonclient")] if both_ways else []
    for a, b, a_name, b_name in pairs:
        for kind in ("messages", "enums", "methods"):
            for name, spec in a[kind].items():
                other = b[kind].get(name)
                if other is None:
                    problems.append(
                        f"{kind[:-1]} {name} of {a_name} is missing in {b_name}"
                    )
                elif kind == "methods":
                    if spec != other:
                        problems.append(
                            f"method {name}: {a_name} {spec} != {b_name} {other}"
                        )
                else:
                    problems += [
                        f"{name}.{key}: {a_name} {value} != {b_name} {other.get(key)}"
                        for key, value in spec.items()
                        if other.get(key) != value
                    ]
    return problems


def test_generated_modules_are_fresh() -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed; cannot regenerate to compare")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "file, both_ways", [("grpc_service.proto", True), ("model_config.proto", False)]
)
def test_wire_compatible_with_tritonclient(
    dumps: tuple[dict, dict], file: str, both_ways: bool
) -> None:
    theirs, ours = dumps
    assert theirs[file]["messages"], "dump of tritonclient found no messages"
    assert _mismatches(theirs[file], ours[file], both_ways=both_ways) == []


def test_mismatch_detector_catches_a_renumbered_field(dumps: tuple[dict, dict]) -> None:
    """Guards the guard: a changed field number must be reported."""
    theirs, ours = dumps
    broken = json.loads(json.dumps(ours["grpc_service.proto"]))
    broken["messages"]["inference.ModelInferRequest"]["raw_input_contents"][0] = 8
    problems = _mismatches(theirs["grpc_service.proto"], broken, both_ways=True)
    assert any("ModelInferRequest.raw_input_contents" in p for p in problems)


def test_descriptors_identical_to_tritonclient(dumps: tuple[dict, dict]) -> None:
    """Byte-identical file descriptors let tritonclient and the gateway share one process:
    protobuf accepts re-registering an identical file but rejects a different one."""
    theirs, ours = dumps
    for file in ("grpc_service.proto", "model_config.proto"):
        assert theirs[file]["serialized"] == ours[file]["serialized"], file


TRITON_REQUEST = textwrap.dedent(
    """
    import base64, numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2
    from tritonclient.grpc._utils import _get_inference_request

    x = grpcclient.InferInput("x", [2, 3], "FP32")
    x.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    s = grpcclient.InferInput("s", [2], "BYTES")
    s.set_data_from_numpy(np.array([b"ab", b"cde"], dtype=np.object_))
    raw = _get_inference_request(
        model_name="m", inputs=[x, s], model_version="2", request_id="r1",
        outputs=[grpcclient.InferRequestedOutput("y")], sequence_id=0, sequence_start=False,
        sequence_end=False, priority=3, timeout=1000, parameters={"routing_key": "user-7", "ratio": 0.5},
    )

    typed = service_pb2.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="i", datatype="INT64", shape=[3])
    t.contents.int64_contents.extend([-1, 0, 2**40])
    t.parameters["flag"].bool_param = True
    b = typed.inputs.add(name="b", datatype="BYTES", shape=[2])
    b.contents.bytes_contents.extend([b"\\x00\\xff", b"z"])
    typed.outputs.add(name="y").parameters["classification"].int64_param = 2
    print(base64.b64encode(raw.SerializeToString()).decode())
    print(base64.b64encode(typed.SerializeToString()).decode())
    """
)


def test_tritonclient_request_parses_with_ours() -> None:
    _require_tritonclient()
    from gateway.protocol.pb import grpc_service_pb2 as pb

    raw_b64, typed_b64 = _python(TRITON_REQUEST).split()

    req = pb.ModelInferRequest.FromString(base64.b64decode(raw_b64))
    assert (req.model_name, req.model_version, req.id) == ("m", "2", "r1")
    assert [(i.name, i.datatype, list(i.shape)) for i in req.inputs] == [
        ("x", "FP32", [2, 3]),
        ("s", "BYTES", [2]),
    ]
    assert [o.name for o in req.outputs] == ["y"]
    assert req.raw_input_contents[0] == struct.pack("<6f", *range(6))
    assert req.raw_input_contents[1] == b"\x02\x00\x00\x00ab\x03\x00\x00\x00cde"
    params = req.parameters
    assert params["priority"].uint64_param == 3
    assert params["timeout"].int64_param == 1000
    assert params["routing_key"].string_param == "user-7"
    assert params["ratio"].double_param == 0.5
    assert params["routing_key"].WhichOneof("parameter_choice") == "string_param"

    typed = pb.ModelInferRequest.FromString(base64.b64decode(typed_b64))
    i, b = typed.inputs
    assert list(i.contents.int64_contents) == [-1, 0, 2**40]
    assert i.parameters["flag"].bool_param is True
    assert list(b.contents.bytes_contents) == [b"\x00\xff", b"z"]
    assert typed.outputs[0].parameters["classification"].int64_param == 2
    assert not typed.raw_input_contents
