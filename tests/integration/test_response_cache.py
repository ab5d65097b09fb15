"""Response cache with tritonclient: `response_cache { enable: true }` plus `--cache-size`.

Hits and misses show in ModelStatistics (cache_hit / cache_miss) as Triton shows them; a hit
runs nothing; the key is the version that serves, so a split never answers from another
version's entry; a model that does not enable the cache is never cached.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from support import TIMEOUT, model_stats, start_gateway

from bench import models

CACHED = 'max_batch_size: 8\ndynamic_batching { }\nresponse_cache { enable: true }\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("cache")
    for version, seed in ((1, 0), (2, 1)):
        (repo / "cached" / str(version)).mkdir(parents=True)
        models.build_mlp(repo / "cached" / str(version) / "model.onnx", (8, 16, 4), seed=seed)
    models.write_config(repo / "cached", CACHED + "version_policy { all { } }\n")
    (repo / "plain" / "1").mkdir(parents=True)
    models.build_mlp(repo / "plain" / "1" / "model.onnx", (8, 16, 4))
    models.write_config(repo / "plain", "max_batch_size: 8\ndynamic_batching { }\n")
    with (start_gateway(repo, "--cache-size", str(1 << 20)) as gw,
          grpcclient.InferenceServerClient(gw.url) as client):
        yield client


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
