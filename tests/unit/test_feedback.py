"""Feedback: settings, which output is the prediction, the bounded store, the join and the
metrics; and the data plane's hook (requests with an id, enabled models only)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from gateway.control.predictions import SqlitePredictions, shared_predictions
from gateway.control.store import StoreUnavailable
from gateway.dataplane import DataPlane
from gateway.errors import NotFound
from gateway.events import Events
from gateway.feedback import (
    ARGMAX,
    MAX_ID_LENGTH,
    VALUE,
    FeedbackCollector,
    FeedbackSettings,
    FeedbackStore,
    ModelFeedback,
    SettingsError,
    entry_bytes,
    parse_settings,
    plan_output,
)
from gateway.modelconfig import ModelConfig, VersionPolicy
from gateway.statistics import ModelStats
from gateway.tensors import InferRequest, Tensor, TensorSpec


def config(outputs, name="m") -> ModelConfig:
    specs = tuple(TensorSpec(n, dt, dims) for n, dt, dims in outputs)
    return ModelConfig(name, "onnxruntime_onnx", 8, (TensorSpec("x", "FP32", (4,)),), specs,
                       VersionPolicy(), None, (), {}, "model.onnx", {}, {"x": 0},
                       {s.name: i for i, s in enumerate(specs)}, None)


IRIS = [("label", "INT64", ()), ("probabilities", "FP32", (3,))]


def served(version="1", outputs=IRIS, model="m"):
    return SimpleNamespace(model=model, version=version, config=config(outputs, model),
                           stats=ModelStats())


def test_settings():
    assert parse_settings({"drift": {}}) is None
    assert parse_settings(None) is None
    assert parse_settings({"feedback": {}}) == FeedbackSettings()
    assert parse_settings({"feedback": None}) == FeedbackSettings()
    assert parse_settings({"feedback": True}) == FeedbackSettings()
    assert parse_settings({"feedback": False}) is None
    assert parse_settings({"feedback": {"enabled": False}}) is None
    assert parse_settings({"feedback": {"output": "y", "kind": "regression",
                                        "max_requests": 10}}) == \
        FeedbackSettings("y", "regression", 10)
    assert parse_settings({"feedback": {"max_bytes": 1000}}) == FeedbackSettings(max_bytes=1000)
    for bad in ({"max_bytes": 0}, {"max_bytes": "1MB"}, {"max_bytes": False}):
        with pytest.raises(SettingsError, match="feedback.max_bytes must be a positive"):
            parse_settings({"feedback": bad})
    for bad in ({"kind": "ranking"}, {"max_requests": 0}, {"max_requests": True},
                {"output": 3}, [1, 2]):
        with pytest.raises(SettingsError):
            parse_settings({"feedback": bad})


@pytest.mark.parametrize("outputs, settings, expected", [
    (IRIS, FeedbackSettings(), (0, VALUE, "classification", "label")),
    (IRIS, FeedbackSettings(output="probabilities"),
     (1, ARGMAX, "classification", "probabilities")),
    ([("scores", "FP32", (10,))], FeedbackSettings(), (0, ARGMAX, "classification", "scores")),
    ([("price", "FP32", (1,))], FeedbackSettings(), (0, VALUE, "regression", "price")),
    ([("price", "FP64", ())], FeedbackSettings(), (0, VALUE, "regression", "price")),
    ([("name", "BYTES", (1,)), ("p", "FP32", (2,))], FeedbackSettings(),
     (0, VALUE, "classification", "name")),
    ([("y", "FP32", (3,))], FeedbackSettings(kind="regression"), (0, VALUE, "regression", "y")),
])
def test_the_prediction_output_is_inferred(outputs, settings, expected):
    assert plan_output(config(outputs), settings) == expected


def test_no_fitting_output_is_an_error():
    with pytest.raises(ValueError, match="'nope' is not an output"):
        plan_output(config(IRIS), FeedbackSettings(output="nope"))
    with pytest.raises(ValueError, match="no output holds a regression"):
        plan_output(config([("label", "INT64", ())]), FeedbackSettings(kind="regression"))


def test_classification_join_per_version():
    feedback = ModelFeedback("m", FeedbackSettings())
    v1, v2 = served("1"), served("2")
    feedback.record("a", v1, [np.array([2]), np.array([[0.1, 0.2, 0.7]], np.float32)], 1)
    feedback.record("b", v1, [np.array([1]), np.zeros((1, 3), np.float32)], 1)
    feedback.record("c", v2, [np.array([0, 2]), np.zeros((2, 3), np.float32)], 2)
    assert feedback.label("a", ["2"]) == ""
    assert feedback.label("b", ["0"]) == ""
    assert feedback.label("a", ["2"]) is None  # labelled already
    assert feedback.label("zz", ["1"]) is None
    assert feedback.label("c", ["0"]) == "request 'c' had 2 row(s); 1 label(s) given"
    assert feedback.label("c", ["0", "2.0"]) == ""
    assert feedback.snapshot() == [("1", 2, 1, 0.0), ("2", 2, 2, 0.0)]
    assert feedback.unmatched == 2
    assert not feedback.kept


def test_argmax_of_class_scores():
    feedback = ModelFeedback("m", FeedbackSettings(output="probabilities"))
    feedback.record("a", served(), [np.array([0]), np.array([[0.1, 0.7, 0.2]], np.float32)], 1)
    assert feedback.kept["a"] == ("1", [1])


def test_regression_mean_absolute_error():
    feedback = ModelFeedback("m", FeedbackSettings())
    version = served(outputs=[("y", "FP32", (1,))])
    feedback.record("a", version, [np.array([[1.5]], np.float32)], 1)
    feedback.record("b", version, [np.array([[3.0], [4.0]], np.float32)], 2)
    assert feedback.label("a", ["2.5"]) == ""
    assert feedback.label("b", ["x", "1"]) == "request 'b': regression labels must be numbers"
    assert feedback.label("b", ["3", "5"]) == ""
    (version_, n, _correct, abs_error), = feedback.snapshot()
    assert (version_, n) == ("1", 3) and abs_error == pytest.approx(2.0)


def test_the_store_is_bounded_oldest_first():
    feedback = ModelFeedback("m", FeedbackSettings(capacity=3))
    for i in range(5):
        feedback.record(f"r{i}", served(), [np.array([i]), np.zeros((1, 3))], 1)
    assert list(feedback.kept) == ["r2", "r3", "r4"]


def test_long_request_ids_are_not_kept(caplog):
    feedback = ModelFeedback("m", FeedbackSettings())
    for i in range(3):
        feedback.record("x" * (MAX_ID_LENGTH + 1) + str(i), served(),
                        [np.array([1]), np.zeros((1, 3))], 1)
    feedback.record("y" * MAX_ID_LENGTH, served(), [np.array([1]), np.zeros((1, 3))], 1)
    assert list(feedback.kept) == ["y" * MAX_ID_LENGTH]
    assert feedback.long_ids == 3
    assert sum("longer than 1024 characters" in r.message for r in caplog.records) == 1
    assert feedback.label("x" * (MAX_ID_LENGTH + 1) + "0", ["1"]) is None


def test_the_store_is_bounded_by_bytes_too_oldest_first():
    # 1 MB ids used to be kept whole: 500 of them held 490 MB.
    feedback = ModelFeedback("m", FeedbackSettings(max_bytes=10_000))
    for i in range(100):
        feedback.record(f"{i:04d}" + "z" * 996, served(), [np.array([i]), np.zeros((1, 3))], 1)
    assert 0 < len(feedback.kept) < 10
    assert feedback.kept_bytes <= 10_000
    assert feedback.kept_bytes == sum(entry_bytes(k, v) for k, (_, v) in feedback.kept.items())
    assert next(reversed(feedback.kept)).startswith("0099")  # the newest stay
    # Text predictions count with their length; a label frees what it joined.
    text = ModelFeedback("m", FeedbackSettings(max_bytes=100_000))
    version = served(outputs=[("name", "BYTES", (1,))])
    text.record("a", version, [np.array([[b"w" * 5000]], dtype=object)], 1)
    text.record("a", version, [np.array([[b"w" * 6000]], dtype=object)], 1)  # replaces
    assert text.kept_bytes == entry_bytes("a", [b"w" * 6000]) > 6000
    assert text.label("a", ["w" * 6000]) == ""
    assert text.kept_bytes == 0 and not text.kept


def test_a_version_without_a_usable_output_records_nothing(caplog):
    feedback = ModelFeedback("m", FeedbackSettings(output="nope"))
    version = served()
    for i in range(3):
        feedback.record(f"r{i}", version, [np.array([1]), np.zeros((1, 3))], 1)
    assert not feedback.kept
    assert sum("feedback cannot record" in r.message for r in caplog.records) == 1


class Repo:
    def __init__(self, root, entries):
        self.root = root
        self.models = entries
        self.events = Events()


@pytest.mark.parametrize("shared", [False, True], ids=["local", "shared"])
async def test_the_store_follows_gateway_yaml(tmp_path, shared):
    (tmp_path / "m").mkdir()
    entry = SimpleNamespace(serving={"1": served()})
    repo = Repo(tmp_path, {"m": entry})
    plane = SimpleNamespace(feedback={})
    store = FeedbackStore(repo, plane, SqlitePredictions(tmp_path / "state") if shared else None)
    store.model_changed("m")
    assert plane.feedback == {}
    with pytest.raises(NotFound, match="add 'feedback: {}' to its gateway.yaml"):
        store.status("m")
    with pytest.raises(NotFound, match="unknown model 'x'"):
        store.status("x")
    (tmp_path / "m" / "gateway.yaml").write_text("drift: {}\nfeedback:\n  max_requests: 5\n")
    store.model_changed("m")
    assert plane.feedback["m"] == store.models["m"].record
    assert store.models["m"].kind == "classification" and store.models["m"].output == "label"
    plane.feedback["m"]("req", entry.serving["1"], [np.array([2]), np.zeros((1, 3))], 1)
    matched, unknown, errors = await store.label("m", [("req", ["2"]), ("other", ["1"]),
                                                       ("", ["1"]), ("x", [])])
    assert (matched, unknown) == (1, ["other"])
    assert errors == ["a label without a request id", "request 'x': no label given"]
    assert store.quality("m", "1") == ("classification", 1, 1.0)
    assert store.quality("m", "2") is None
    # Settings change: totals are kept; feedback off removes the hook.
    (tmp_path / "m" / "gateway.yaml").write_text("feedback:\n  max_requests: 9\n")
    store.model_changed("m")
    assert store.models["m"].settings.capacity == 9 and store.quality("m", "1")[1] == 1
    (tmp_path / "m" / "gateway.yaml").write_text("feedback: {enabled: false}\n")
    store.model_changed("m")
    assert "m" not in plane.feedback


def test_a_broken_gateway_yaml_turns_feedback_off(tmp_path, caplog):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "gateway.yaml").write_text("feedback: {kind: ranking}\n")
    repo = Repo(tmp_path, {"m": SimpleNamespace(serving={"1": served()})})
    plane = SimpleNamespace(feedback={})
    FeedbackStore(repo, plane).model_changed("m")
    assert plane.feedback == {}
    assert any("feedback is off: feedback.kind must be one of" in r.message
               for r in caplog.records)


async def test_the_collector_exports_per_version_scores(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "r").mkdir()
    for name in ("c", "r"):
        (tmp_path / name / "gateway.yaml").write_text("feedback: {}\n")
    classifier, regressor = served(model="c"), served(model="r", outputs=[("y", "FP32", (1,))])
    repo = Repo(tmp_path, {"c": SimpleNamespace(serving={"1": classifier}),
                           "r": SimpleNamespace(serving={"1": regressor})})
    store = FeedbackStore(repo, SimpleNamespace(feedback={}))
    store.model_changed("c")
    store.model_changed("r")
    store.models["c"].record("a", classifier, [np.array([1]), np.zeros((1, 3))], 1)
    store.models["c"].record("b", classifier, [np.array([1]), np.zeros((1, 3))], 1)
    store.models["r"].record("a", regressor, [np.array([[2.0]])], 1)
    await store.label("c", [("a", ["1"]), ("b", ["0"]), ("nope", ["1"])])
    await store.label("r", [("a", ["2.5"])])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in FeedbackCollector(store).collect() for s in family.samples}
    assert samples[("gateway_feedback_accuracy_ratio", (("model", "c"), ("version", "1")))] \
        == 0.5
    assert samples[("gateway_feedback_labelled_total", (("model", "c"), ("version", "1")))] == 2
    assert samples[("gateway_feedback_mean_absolute_error",
                    (("model", "r"), ("version", "1")))] == 0.5
    assert samples[("gateway_feedback_unmatched_labels_total", (("model", "c"),))] == 1
    assert samples[("gateway_feedback_predictions_kept", (("model", "c"),))] == 0
    assert ("gateway_feedback_accuracy_ratio", (("model", "r"), ("version", "1"))) not in samples


# ---- the data plane hook ------------------------------------------------------------------------

class Batcher:
    async def run_now(self, arrays, size):
        return None

    async def submit(self, arrays, size, key, *args):
        x = arrays[0]
        return [x.argmax(axis=1).astype(np.int64), x]


def test_the_data_plane_keeps_predictions_of_requests_with_an_id_only():
    version = SimpleNamespace(model="m", version="1", batcher=Batcher(), stats=ModelStats(),
                              config=config([("label", "INT64", ()), ("scores", "FP32", (4,))]))
    other = SimpleNamespace(**{**vars(version), "model": "n"})
    versions = {"m": version, "n": other}
    router = SimpleNamespace(policies={}, route=lambda model, v, key: versions[model],
                             events=Events())
    plane = DataPlane(router)
    feedback = ModelFeedback("m", FeedbackSettings())
    plane.feedback["m"] = feedback.record
    x = np.array([[0, 0, 3, 1]], np.float32)

    async def run():
        for request_id, model in (("r1", "m"), ("", "m"), ("r2", "n")):
            await plane.infer(InferRequest(model, "", request_id, [Tensor("x", "FP32", x)]))

    asyncio.run(run())
    assert dict(feedback.kept) == {"r1": ("1", [2])}


@pytest.fixture(params=["sqlite", "redis"])
def shared_table(request, tmp_path):
    """A factory of clients of one shared prediction table (one per process)."""
    if request.param == "sqlite":
        return lambda: SqlitePredictions(tmp_path / "state")
    from gateway.control.redisstore import RedisStore

    server = request.getfixturevalue("redis_server")
    return lambda: shared_predictions(RedisStore(server.url))


async def test_a_label_sent_to_any_process_joins_the_prediction_of_another(tmp_path,
                                                                          shared_table):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "gateway.yaml").write_text("feedback: {}\n")
    entry = SimpleNamespace(serving={"1": served(), "2": served(version="2")})
    stores = []
    for _ in range(2):
        store = FeedbackStore(Repo(tmp_path, {"m": entry}), SimpleNamespace(feedback={}),
                              shared_table())
        store.model_changed("m")
        stores.append(store)
    first, second = stores
    for i in range(10):  # first serves the requests...
        first.models["m"].record(f"r{i}", entry.serving["1" if i < 6 else "2"],
                                 [np.array([i % 3]), np.zeros((1, 3))], 1)
    await first.flush()
    # ... second gets their labels: every one joins, once.
    labels = [(f"r{i}", [str(i % 3 if i % 2 == 0 else 5)]) for i in range(10)]
    assert (await second.label("m", labels))[:2] == (10, [])
    assert (await first.label("m", labels[:3]))[:2] == (0, ["r0", "r1", "r2"])
    # Both report the fleet's totals, whichever is asked.
    await first.label("m", [])
    for store in stores:
        assert store.quality("m", "1") == ("classification", 6, 0.5)
        assert store.quality("m", "2") == ("classification", 4, 0.5)
    for store in stores:
        await store.shared.close()


async def test_predictions_wait_for_a_store_that_is_down(tmp_path):
    class Down(SqlitePredictions):
        async def put(self, model, items):
            raise StoreUnavailable("down")

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "gateway.yaml").write_text("feedback: {}\n")
    entry = SimpleNamespace(serving={"1": served()})
    store = FeedbackStore(Repo(tmp_path, {"m": entry}), SimpleNamespace(feedback={}),
                          Down(tmp_path / "state"))
    store.model_changed("m")
    store.models["m"].record("a", entry.serving["1"], [np.array([1]), np.zeros((1, 3))], 1)
    with pytest.raises(StoreUnavailable):
        await store.flush()
    assert len(store.outbox) == 1  # kept for the next flush


async def test_the_sqlite_table_keeps_at_most_its_row_cap_oldest_out(tmp_path):
    table = SqlitePredictions(tmp_path, max_rows=50)
    for batch in range(3):
        await table.put("m", [(f"{batch}-{i}", "1", [i]) for i in range(40)])
    await table.put("m", [("last", "1", [0])])  # the 101st put... and a cleanup pass
    table._puts = 100
    await table.put("m", [("after", "1", [0])])
    assert await table.count("m") == 50
    assert await table.take("m", ["0-0", "2-39", "after"]) == {"2-39": ("1", [39]),
                                                                "after": ("1", [0])}
