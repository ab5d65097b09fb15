"""gateway.batch.Scorer on a real local Dask cluster (two worker processes): partitions scored
in-process in each worker and through a live gateway, compared with onnxruntime."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import ROOT, start_gateway

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

DEMO = ROOT / "gateway" / "demo_repository"
MLP_FILE = DEMO / "tiny_mlp" / "1" / "model.onnx"


def _worker_runtimes():
    from gateway.batch import cluster

    return os.getpid(), [key[0] for key in cluster._PROCESS]


def test_map_partitions_on_a_local_cluster(tmp_path):
    from gateway.batch import Scorer, score_dataframe
    from gateway.batch.cluster import close_all

    x = np.random.default_rng(2).standard_normal((4000, 32)).astype(np.float32)
    x[17, 3] = np.nan  # NaN features are values (the model answers NaN), not errors
    keys = [f"k{i}" for i in range(4000)]
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"key": keys, "input": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), 32)}), source, row_group_size=1000)
    [expected] = ort.InferenceSession(str(MLP_FILE), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": [[1.0] * 32, [1.0] * 3]}), bad)

    with start_gateway() as gw, distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
            silence_logs=40) as local, distributed.Client(local) as client:
        frame = dd.read_parquet(source).repartition(npartitions=4)
        for scorer in (Scorer("tiny_mlp", model_repository=DEMO),
                       Scorer("tiny_mlp", url=gw.url, batch_size=32)):
            scores = score_dataframe(frame, scorer)
            assert scores.npartitions == 4
            result = scores.compute()
            assert list(result.columns) == ["output", "model_version", "error"]
            assert result.index.tolist() == frame.index.compute().tolist()
            got = np.stack(result["output"].to_numpy())
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            assert set(result["model_version"]) == {"1"} and result["error"].isna().all()
            # the scores line up with the rows they came from, partition by partition
            both = score_dataframe(frame, scorer, keep_columns=True).compute()
            assert list(both.columns) == ["key", "input", "output", "model_version", "error"]
            assert both["key"].tolist() == keys
            np.testing.assert_allclose(np.stack(both["output"].to_numpy()), expected, rtol=1e-5,
                                       atol=1e-6)

            failed = score_dataframe(dd.read_parquet(bad), scorer).compute()
            assert failed["error"].tolist()[1] == "column 'input' holds 3 values where input " \
                                                  "'input' takes 32"
            assert failed["output"].isna().tolist() == [False, True]

        workers = client.run(_worker_runtimes)
        assert len(workers) == 2
        pids = {pid for pid, _ in workers.values()}
        assert os.getpid() not in pids
        assert any(models == ["tiny_mlp", "tiny_mlp"] for _, models in workers.values()), \
            workers  # the workers opened both engines themselves
        client.run(lambda: __import__("gateway.batch.cluster").batch.cluster.close_all())
    close_all()
