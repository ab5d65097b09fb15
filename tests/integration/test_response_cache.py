"""Response cache with tritonclient: `response_cache { enable: true }` plus `--cache-size`.

Hits and misses show in ModelStatistics (cache_hit / cache_miss) as Triton shows them; a hit
runs nothing; the key is the version that serves, so a split never answers from another
version's entry; a model that does not enable the cache is never cached.
"""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from support import TIMEOUT, model_stats, start_gateway, wait_for

from bench import models

CACHED = 'max_batch_size: 8\ndynamic_batching { }\nresponse_cache { enable: true }\n'


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repo = tmp_path_factory.mktemp("cache")
    for version, seed in ((1, 0), (2, 1)):
        (repo / "cached" / str(version)).mkdir(parents=True)
        models.build_mlp(repo / "cached" / str(version) / "model.onnx", (8, 16, 4), seed=seed)
    models.write_config(repo / "cached", CACHED + "version_policy { all { } }\n")
    (repo / "plain" / "1").mkdir(parents=True)
    models.build_mlp(repo / "plain" / "1" / "model.onnx", (8, 16, 4))
    models.write_config(repo / "plain", "max_batch_size: 8\ndynamic_batching { }\n")
    with start_gateway(repo, "--cache-size", str(1 << 20)) as gw:
        yield gw


@pytest.fixture(scope="module")
def served(gateway):
    with grpcclient.InferenceServerClient(gateway.url) as client:
        yield client


def reference_output(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def infer(client, model, x, version=""):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], model_version=version, client_timeout=TIMEOUT)
    return result.as_numpy("output"), result.get_response().model_version


def cache_counts(client, model, version):
    stats = client.get_inference_statistics(model, version).model_stats[0]
    return (stats.inference_stats.cache_hit.count, stats.inference_stats.cache_miss.count,
            stats.execution_count)


def test_a_repeat_is_answered_from_the_cache_per_version(served):
    x = np.full((2, 8), 0.5, np.float32)
    one, _ = infer(served, "cached", x, "1")
    again, _ = infer(served, "cached", x, "1")
    np.testing.assert_array_equal(one, again)
    assert cache_counts(served, "cached", "1") == (1, 1, 1)  # one run, one hit, one miss
    two, version = infer(served, "cached", x, "2")  # the same input to another version
    assert version == "2" and not np.allclose(two, one)  # its own answer, not version 1's
    assert cache_counts(served, "cached", "2") == (0, 1, 1)
    other, _ = infer(served, "cached", x + 1, "1")  # other input bytes: a miss
    assert cache_counts(served, "cached", "1") == (1, 2, 2)
    assert not np.allclose(other, one)


def test_a_model_without_response_cache_is_not_cached(served):
    x = np.full((1, 8), 0.25, np.float32)
    infer(served, "plain", x)
    infer(served, "plain", x)
    assert cache_counts(served, "plain", "1") == (0, 0, 2)
    assert model_stats(served, "plain").inference_stats.success.count == 2


def test_hits_and_misses_show_in_prometheus_and_rest_statistics(gateway, served):
    x = np.full((1, 8), 0.75, np.float32)
    for _ in range(3):
        infer(served, "cached", x, "1")
    hits, misses, _ = cache_counts(served, "cached", "1")
    assert hits >= 2 and misses >= 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                  timeout=TIMEOUT).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    labels = (("model", "cached"), ("version", "1"))
    assert samples[("gateway_response_cache_hits_total", labels)] == hits
    assert samples[("gateway_response_cache_misses_total", labels)] == misses
    assert ("gateway_response_cache_hits_total", (("model", "plain"), ("version", "1"))) \
        not in samples  # a model that does not use the cache has no series
    assert samples[("gateway_response_cache_entries", ())] >= 3
    assert 0 < samples[("gateway_response_cache_bytes", ())] <= 1 << 20
    with httpclient.InferenceServerClient(gateway.http_url) as http:
        stats = http.get_inference_statistics("cached", "1")["model_stats"][0]["inference_stats"]
    assert (stats["cache_hit"]["count"], stats["cache_miss"]["count"]) == (hits, misses)


def test_a_version_reloaded_with_a_new_file_is_not_answered_from_the_old_files_entries(
        tmp_path):
    """Poll mode: version 1's file is replaced in place (same version number, new weights).
    The cache must not answer with what the old file computed."""
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    models.build_mlp(repo / "m" / "1" / "model.onnx", (8, 16, 4), seed=0)
    models.write_config(repo / "m", CACHED)
    x = np.full((1, 8), 0.5, np.float32)
    with (start_gateway(repo, "--cache-size", str(1 << 20), "--control-mode", "poll",
                        "--poll-interval", "0.2") as gw,
          grpcclient.InferenceServerClient(gw.url) as client):
        old, _ = infer(client, "m", x)
        assert np.allclose(infer(client, "m", x)[0], old)  # a hit
        staging = tmp_path / "new.onnx"
        models.build_mlp(staging, (8, 16, 4), seed=5)
        staging.replace(repo / "m" / "1" / "model.onnx")
        expected = reference_output(repo / "m" / "1" / "model.onnx", x)
        wait_for(lambda: np.allclose(infer(client, "m", x)[0], expected), timeout=20,
                 what="the reloaded file's answer")
        assert not np.allclose(expected, old)
