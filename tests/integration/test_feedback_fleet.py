"""Feedback across processes: a label sent to any process joins the prediction any other made,
and every process reports the same accuracy, with `--workers 2` (one host, the file store's
SQLite table) and with two replicas on one real Redis."""

from __future__ import annotations

from contextlib import ExitStack

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_iris
from support import TIMEOUT, free_port, start_gateway, wait_for

from bench import models
from gateway.protocol.pb import gateway_admin_pb2 as apb
from gateway.protocol.pb import gateway_admin_pb2_grpc as apb_grpc


@pytest.fixture
def repo(tmp_path):
    for version in (1, 2):
        models.make_version(tmp_path, "iris", version, models.build_iris_classifier)
    models.write_config(tmp_path / "iris", "version_policy { all { } }")
    (tmp_path / "iris" / "gateway.yaml").write_text("feedback: {}\n")
    return tmp_path


def predict_and_label(urls: list[str]) -> dict:
    """Requests with ids through fresh connections (spread over processes), labels the same
    way but starting at the other end; what the answers said."""
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    served = {}
    for i in range(60):
        with grpcclient.InferenceServerClient(urls[i % len(urls)]) as client:
            inp = grpcclient.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(x[i:i + 1])
            served[f"id-{i}"] = client.infer("iris", [inp], request_id=f"id-{i}",
                                             client_timeout=TIMEOUT).get_response().model_version
    matched = 0
    for i in range(60):
        with grpc.insecure_channel(urls[(i + 1) % len(urls)]) as channel:
            answer = apb_grpc.GatewayAdminStub(channel).SendFeedback(apb.FeedbackRequest(
                model="iris", labels=[apb.FeedbackLabel(id=f"id-{i}", labels=[str(y[i])])]),
                timeout=TIMEOUT)
            matched += answer.matched
    return {"matched": matched, "served": served}


def accuracy_seen(url: str) -> dict:
    with grpc.insecure_channel(url) as channel:
        status = apb_grpc.GatewayAdminStub(channel).GetFeedback(
            apb.GetFeedbackRequest(model="iris"), timeout=TIMEOUT)
    return {v.version: (v.labelled, round(v.accuracy, 6)) for v in status.versions}


def test_workers_share_predictions_and_report_the_same_accuracy(repo):
    port = free_port()
    with start_gateway(repo, "--grpc-port", str(port), "--workers", "2") as gw:
        wait_for(lambda: gw.log().count("gateway ready") == 2, what="both workers")
        with grpc.insecure_channel(gw.url) as channel:
            apb_grpc.GatewayAdminStub(channel).SetTraffic(apb.SetTrafficRequest(
                model="iris", split=[apb.VersionWeight(version="1", percent=50),
                                     apb.VersionWeight(version="2", percent=50)]))
        result = predict_and_label([gw.url])
        assert result["matched"] == 60  # none lost to "the other worker served it"
        seen = {str(accuracy_seen(gw.url)) for _ in range(12)}  # fresh connections: both
        assert len(seen) == 1, seen
        totals = accuracy_seen(gw.url)
        assert sum(n for n, _ in totals.values()) == 60


def test_replicas_on_one_redis_share_predictions(repo, redis_server):
    args = ["--state-url", redis_server.url]
    with ExitStack() as stack:
        gateways = [stack.enter_context(start_gateway(repo, *args)) for _ in range(2)]
        urls = [gw.url for gw in gateways]
        result = predict_and_label(urls)
        assert result["matched"] == 60
        assert accuracy_seen(urls[0]) == accuracy_seen(urls[1])
        assert sum(n for n, _ in accuracy_seen(urls[1]).values()) == 60
