"""The bench suite's pure parts: response parsing, windows, the stability rule, load splitting,
request building. No server, no timing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench import inputs, loadgen, measure, summary
from bench.plan import LoadPoint, Plan, parse_list, split
from gateway.protocol import codec
from gateway.protocol.pb import grpc_service_pb2 as pb


@pytest.mark.parametrize("name,version", [("m", "1"), ("", "7"), ("m", ""), ("x" * 300, "v2")])
def test_response_version_reads_only_the_version(name, version):
    out = np.arange(40000, dtype=np.float32)  # a long payload: sizes need multi-byte varints
    response = pb.ModelInferResponse(
        model_name=name, model_version=version, id="abc",
        parameters={"p": pb.InferParameter(int64_param=5)},
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="o", datatype="FP32",
                                                         shape=out.shape)],
        raw_output_contents=[out.tobytes()]).SerializeToString()
    assert loadgen.response_version(response) == version.encode()


def test_response_version_empty_message():
    assert loadgen.response_version(b"") == b""


def _window_msg(index, latencies, errors=None, versions=None, start=0.0, end=1.0, sent=0, cpu=0.1):
    lat = np.asarray(latencies, dtype=np.float64).tobytes()
    return ("window", index, start, end, lat, b"", errors or {}, versions or {}, sent, cpu)


def _window(index, rate, p99_ms):
    w = measure.Window(index)
    w.add(_window_msg(index, [p99_ms / 1e3] * int(rate), versions={b"1": int(rate)}), 0)
    return w


def test_stability_rule_needs_three_agreeing_windows():
    steady = [_window(i, 1000, 2.0) for i in range(3)]
    assert measure.stable(steady)
    assert not measure.stable(steady[:2])
    assert not measure.stable([*steady[:2], _window(2, 1300, 2.0)])  # throughput off by > 10%
    assert not measure.stable([*steady[:2], _window(2, 1000, 2.5)])  # p99 off by > 10%
    assert measure.stable([*steady[:2], _window(2, 1050, 2.1)])


def test_stability_rule_with_only_failures():
    windows = []
    for i in range(3):
        w = measure.Window(i)
        w.add(_window_msg(i, [], errors={"NOT_FOUND": 500}), 0)
        windows.append(w)
    assert measure.stable(windows)


def test_summarise_merges_processes_and_windows():
    windows = []
    for i in range(2):
        w = measure.Window(i)
        w.add(_window_msg(i, [0.001] * 90, {"UNAVAILABLE": 1}, {b"1": 60, b"2": 30},
                          start=i, end=i + 1, sent=95, cpu=0.2), 0)
        w.add(_window_msg(i, [0.003] * 10, {}, {b"2": 10}, start=i, end=i + 1, sent=10, cpu=0.4),
              1)
        windows.append(w)
    s = measure.summarise(windows, batch_size=4)
    assert s["requests"] == 200 and s["throughput_rps"] == 100 and s["inferences_per_s"] == 400
    assert s["errors"] == {"UNAVAILABLE": 2} and s["completed_rps"] == 101
    assert s["sent_rps"] == 105
    assert s["versions"] == {"1": 120, "2": 80}
    assert s["latency_ms"]["p50"] == pytest.approx(1.0) and s["latency_ms"]["max"] == 3.0
    assert s["client"] == {"processes": 2, "cpu_s": 1.2, "cores": 0.6, "busiest_process": 0.4}


def test_windows_roll_and_count_bound():
    async def scenario():
        sent = []
        done = asyncio.Event()
        w = loadgen.Windows(t_measure=10.0, window=1.0, emit=sent.append, done=done, quota=3)
        w.ok(0.5, 9.5, b"")  # warm-up: dropped
        w.ok(0.001, 10.2, b"\x12\x011")  # window 0
        w.fail("INTERNAL", 11.5)  # closes window 0, lands in window 1
        w.ok(0.002, 11.7, b"\x12\x012")  # third measured completion: quota reached
        w.ok(0.002, 11.8, b"")  # after the end: dropped
        return sent, done.is_set()

    sent, done = asyncio.run(scenario())
    assert done
    assert [m[1] for m in sent] == [0, 1]
    _, _, start0, end0, lat0, _, err0, ver0, _, _ = sent[0]
    assert (start0, end0, err0, ver0) == (10.0, 11.0, {}, {b"1": 1})
    assert np.frombuffer(lat0).tolist() == [0.001]
    _, _, start1, end1, lat1, _, err1, ver1, _, _ = sent[1]
    assert np.frombuffer(lat1).tolist() == [0.002]
    assert (start1, end1, err1, ver1) == (11.0, 11.7, {"INTERNAL": 1}, {b"2": 1})


def test_split_and_lists():
    assert split(10, 3) == [4, 3, 3] and sum(split(2, 4)) == 2
    assert split(100.0, 4) == [25.0] * 4
    assert parse_list("1,4,16,64") == (1, 4, 16, 64)
    assert parse_list("500,1000", float) == (500.0, 1000.0)
    with pytest.raises(ValueError):
        parse_list("0,4")
    assert LoadPoint(concurrency=4).label == "c=4" and LoadPoint(rate=250.0).label == "250/s"


def test_plan_windows_under_a_time_bound():
    assert Plan(points=(LoadPoint(1),), window_s=2.0, duration_s=5.0).windows() == (5 / 3, 3)
    assert Plan(points=(LoadPoint(1),), window_s=2.0, max_windows=10).windows() == (2.0, 10)


def _metadata(*tensors):
    return pb.ModelMetadataResponse(name="m", inputs=[
        pb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in tensors])


def test_requests_from_metadata_decode_on_the_gateway():
    meta = _metadata(("a", "FP32", [-1, 3]), ("b", "INT64", [-1, 2]), ("s", "BYTES", [-1, 1]),
                     ("f", "BOOL", [-1, 2]))
    data = inputs.from_metadata(meta, max_batch_size=8, batch_size=4, pool=3)
    assert len(data.pool) == 3 and data.shapes() == {"a": [4, 3], "b": [4, 2], "s": [4, 1],
                                                     "f": [4, 2]}
    raw = inputs.serialise(data, "m", "2")
    request = pb.ModelInferRequest.FromString(raw[0])
    assert request.model_name == "m" and request.model_version == "2"
    decoded = {t.name: t.data for t in codec.decode_request(request, None, 0).inputs}
    for name, array in data.pool[0].items():  # what the gateway decodes is what was built
        np.testing.assert_array_equal(np.asarray(decoded[name]).reshape(array.shape), array)
    assert 0 <= data.pool[0]["b"].min() and data.pool[0]["b"].max() < inputs.INT_HIGH


def test_variable_dims_need_a_shape():
    meta = _metadata(("a", "FP32", [-1, -1]))
    with pytest.raises(inputs.InputError, match="--shape a:"):
        inputs.from_metadata(meta, max_batch_size=8, batch_size=1)
    data = inputs.from_metadata(meta, max_batch_size=8, batch_size=2, shapes={"a": [5]})
    assert data.shapes() == {"a": [2, 5]}


def test_batch_size_checks():
    with pytest.raises(inputs.InputError, match="max_batch_size"):
        inputs.from_metadata(_metadata(("a", "FP32", [-1, 3])), max_batch_size=8, batch_size=9)
    with pytest.raises(inputs.InputError, match="no batch dimension"):
        inputs.from_metadata(_metadata(("a", "FP32", [3])), max_batch_size=0, batch_size=2)


def test_requests_from_a_file_take_consecutive_rows(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.arange(30, dtype=np.float64).reshape(10, 3))
    meta = _metadata(("a", "FP32", [-1, 3]))
    data = inputs.from_file(path, meta, max_batch_size=8, batch_size=4, pool=16)
    assert len(data.pool) == 2 and data.datatypes == {"a": "FP32"}
    assert data.pool[1]["a"].dtype == np.float32
    np.testing.assert_array_equal(data.pool[1]["a"][:, 0], [12, 15, 18, 21])
    npy = tmp_path / "d.npy"
    np.save(npy, np.zeros((3, 3), np.float32))
    assert inputs.from_file(npy, meta, 8, 1).shapes() == {"a": [1, 3]}
    with pytest.raises(inputs.InputError, match="npz"):
        inputs.from_file(npy, None, None, 1)


def test_ratios_against_peers_and_limit():
    def row(target, point, rps, p50, p99):
        return {"target": target, "point": point, "throughput_rps": rps,
                "latency_ms": {"p50": p50, "p99": p99}}

    rows = [row("gw", "c=1", 1000, 1.0, 2.0), row("ml", "c=1", 500, 2.0, 8.0)]
    out = summary.ratios(rows, "gw", {"throughput_rps": 4000})
    assert {"point": "c=1", "of": "gw", "over": "ml", "throughput": 2.0, "p50": 0.5,
            "p99": 0.25} in out
    assert {"point": "c=1", "of": "ml", "over": "limit", "throughput": 0.125, "p50": None,
            "p99": None} in out


def test_rounds_fold_into_the_median_round():
    steps = [{"target": "gw", "point": "c=1", "throughput_rps": rps, "errors": {"X": 1},
              "versions": {"1": 10}, "windows": [], "latency_ms": {"p99": rps}}
             for rps in (30, 10, 20)]
    (row,) = summary.combine(steps)
    assert row["throughput_rps"] == 20 and row["latency_ms"] == {"p99": 20}
    assert row["rounds"] == 3 and row["throughput_rounds"] == [30, 10, 20]
    assert row["errors_all_rounds"] == {"X": 3} and row["versions_all_rounds"] == {"1": 30}


def test_ratios_by_round_pair_the_targets_of_each_round():
    def row(target, rounds):
        return {"target": target, "point": "c=1", "throughput_rps": sorted(rounds)[1],
                "throughput_rounds": rounds, "latency_ms": None}

    (ratio,) = summary.ratios([row("gw", [300, 100, 200]), row("ml", [100, 50, 200])], "gw")
    assert ratio["throughput"] == 2.0  # the median rounds' ratio: 200 / 100
    assert ratio["throughput_rounds"] == [3.0, 2.0, 1.0]  # round by round
    from bench.report import _spread

    assert _spread(ratio["throughput_rounds"]) == "2.00 (1.00-3.00)"
    assert _spread([1.5]) == "" and _spread(None) == ""
