"""Drift across processes without a server: the baseline learned from served samples is persisted
beside the version (first writer wins, the others take its file, a restart reads it), and a drift
hook is called once per fleet through a claim in the state store (a fake at this seam, and the
real file store on an event loop of its own, as the server runs it)."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import sys
import threading

import numpy as np
import pytest
from test_monitoring_drift import engine_for, fake_repository, feed, monitor_of

from gateway.control.filestore import FileStore
from gateway.monitoring import drift as drift_module
from gateway.monitoring.drift import SERVED_BASELINE_FILE, fleet_claim
from gateway.monitoring.stats import build_baseline, create_baseline_file, read_baseline

SETTINGS = "drift: {baseline_samples: 200, min_samples: 100, window: 3, for: 0}\n"


def served_file(root, version="1"):
    return root / "m" / version / SERVED_BASELINE_FILE


# ---- the served baseline, persisted ---------------------------------------------------------


def test_a_learned_baseline_is_written_and_a_restart_reads_it_instead_of_learning(tmp_path,
                                                                                 caplog):
    repo = fake_repository(tmp_path)
    (tmp_path / "m" / "gateway.yaml").write_text(SETTINGS)
    engine = engine_for(repo)
    x = monitor_of(engine, repo).inputs[0]
    assert not served_file(tmp_path).exists()
    rng = np.random.default_rng(0)
    feed(monitor_of(engine, repo), rng, 300)
    engine.tick(now=1.0)
    assert x.source == "served"
    on_disk = read_baseline(served_file(tmp_path))["x"]
    assert np.array_equal(on_disk.edges, x.baseline.edges)
    assert np.array_equal(on_disk.features, [0, 1, 2]) and on_disk.samples == 300
    engine.tick(now=100.0)  # its own file is no change to rebuild the monitor for
    assert monitor_of(engine, repo).inputs[0] is x

    # Restart while the traffic has drifted: the persisted baseline is used, not the drift.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = engine_for(repo)
    y = monitor_of(again, repo).inputs[0]
    assert y.source == "served" and np.array_equal(y.baseline.edges, x.baseline.edges)
    assert f"baseline from {SERVED_BASELINE_FILE}" in caplog.text
    for t in range(1, 4):
        feed(monitor_of(again, repo), rng, 300, shift=3.0)
        again.tick(now=float(t))
    assert y.score > 1.0 and y.alert.active  # scored against the old baseline at once
    assert y.baseline.samples == 300


def test_the_first_worker_to_learn_wins_and_the_others_take_its_file(tmp_path, caplog):
    repo = fake_repository(tmp_path)
    (tmp_path / "m" / "gateway.yaml").write_text(SETTINGS)
    workers = [engine_for(repo) for _ in range(3)]
    monitors = [monitor_of(w, repo) for w in workers]
    rng = np.random.default_rng(1)
    feed(monitors[0], rng, 300)  # worker 0 learns from its own traffic
    feed(monitors[1], rng, 300, shift=0.5)  # worker 1 too, from different samples
    feed(monitors[2], rng, 50)  # worker 2 has seen too few to learn yet
    workers[0].tick(now=1.0)
    with caplog.at_level(logging.INFO):
        workers[1].tick(now=1.0)  # learned, found the file there: takes the winner's
        workers[2].tick(now=1.0)  # still learning: takes the file and stops learning
    winner = read_baseline(served_file(tmp_path))["x"].edges
    for monitor in monitors:
        x = monitor.inputs[0]
        assert x.source == "served" and np.array_equal(x.baseline.edges, winner)
        assert not x.learning
    assert "learned from served samples by another process" in caplog.text
    # The race itself: both learned, neither saw the other's file before writing.
    (tmp_path / "m" / "1" / SERVED_BASELINE_FILE).unlink()
    racers = [engine_for(repo) for _ in range(2)]
    for engine in racers:
        feed(monitor_of(engine, repo), rng, 300, shift=float(len(racers)))
    real = drift_module.create_baseline_file
    calls = []

    def late_look(path, learned):  # the other one writes between our look and our write
        calls.append(path)
        if len(calls) == 1:
            real(path, {"x": build_baseline(rng.standard_normal((500, 3)) + 7,
                                            np.arange(3), 500)})
        return real(path, learned)

    drift_module.create_baseline_file, saved = late_look, real
    try:
        racers[0].tick(now=1.0)
    finally:
        drift_module.create_baseline_file = saved
    x = monitor_of(racers[0], repo).inputs[0]
    assert x.baseline.edges[0, 1] > 5  # the other writer's baseline (shifted by 7)
    assert np.array_equal(x.baseline.edges, read_baseline(served_file(tmp_path))["x"].edges)


def test_concurrent_writers_create_the_file_once(tmp_path):
    path = tmp_path / SERVED_BASELINE_FILE
    rng = np.random.default_rng(2)
    candidates = [{"x": build_baseline(rng.standard_normal((100, 2)) + i, np.arange(2), 100)}
                  for i in range(8)]
    barrier = threading.Barrier(len(candidates))
    results = [None] * len(candidates)

    def write(i):
        barrier.wait()
        results[i] = create_baseline_file(path, candidates[i])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(candidates))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    winner = candidates[results.index(True)]["x"]
    assert np.array_equal(read_baseline(path)["x"].edges, winner.edges)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SERVED_BASELINE_FILE]  # no temporaries


def test_a_read_only_repository_keeps_the_baseline_in_memory_and_says_so_once(
        tmp_path, caplog, monkeypatch):
    repo = fake_repository(tmp_path)
    (tmp_path / "m" / "gateway.yaml").write_text(SETTINGS)
    attempts = []

    def read_only(path, learned):
        attempts.append(path)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(drift_module, "create_baseline_file", read_only)
    engine = engine_for(repo)
    rng = np.random.default_rng(3)
    with caplog.at_level(logging.WARNING):
        for t in range(1, 5):
            feed(monitor_of(engine, repo), rng, 300)
            engine.tick(now=float(t))
    x = monitor_of(engine, repo).inputs[0]
    assert x.source == "served" and x.score is not None
    assert len(attempts) == 1
    assert caplog.text.count("kept in memory") == 1 and "Read-only file system" in caplog.text


def test_an_unusable_served_file_is_logged_and_the_baseline_learned_in_memory(tmp_path, caplog):
    repo = fake_repository(tmp_path)
    served_file(tmp_path).write_bytes(b"half a file")
    with caplog.at_level(logging.ERROR):
        engine = engine_for(repo)
    assert f"{SERVED_BASELINE_FILE} is unusable" in caplog.text
    monitor = monitor_of(engine, repo)
    feed(monitor, np.random.default_rng(4), 1000)
    engine.tick(now=1.0)
    assert monitor.inputs[0].source == "served"
    assert served_file(tmp_path).read_bytes() == b"half a file"  # never overwritten


def test_deleting_the_file_has_the_baseline_learned_again(tmp_path):
    repo = fake_repository(tmp_path)
    (tmp_path / "m" / "gateway.yaml").write_text(SETTINGS)
    engine = engine_for(repo)
    rng = np.random.default_rng(5)
    feed(monitor_of(engine, repo), rng, 300)
    engine.tick(now=1.0)
    served_file(tmp_path).unlink()
    engine.tick(now=100.0)  # the next file check
    assert monitor_of(engine, repo).inputs[0].source == "pending"
    feed(monitor_of(engine, repo), rng, 300, shift=2.0)
    engine.tick(now=101.0)
    assert read_baseline(served_file(tmp_path))["x"].mean[0] > 1.5


def test_a_file_baseline_wins_over_the_served_one(tmp_path):
    from gateway.monitoring.stats import write_baseline

    repo = fake_repository(tmp_path)
    rng = np.random.default_rng(6)
    create_baseline_file(served_file(tmp_path),
                         {"x": build_baseline(rng.standard_normal((100, 3)), np.arange(3), 100)})
    write_baseline(tmp_path / "m" / "1" / "baseline.npz", {"x": rng.standard_normal((100, 3))})
    assert monitor_of(engine_for(repo), repo).inputs[0].source == "file"


# ---- the hook, once per fleet ---------------------------------------------------------------


class FakeClaims:
    """The store's claim at this seam: one holder per key until its ttl passes (fake clock)."""

    def __init__(self):
        self.now = 0.0
        self.held: dict[str, tuple[str, float]] = {}
        self.asked: list[tuple[str, str, float]] = []
        self.down = False

    def for_holder(self, holder):
        def claim(key, ttl_s):
            self.asked.append((holder, key, ttl_s))
            if self.down:
                raise ConnectionError("store down")
            current = self.held.get(key)
            if current is not None and current[1] > self.now:
                return False
            self.held[key] = (holder, self.now + ttl_s)
            return True
        return claim


def hook_repository(tmp_path, out, cooldown=100, versions=("1",)):
    repo = fake_repository(tmp_path, versions=versions)
    script = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')"
    (tmp_path / "m" / "gateway.yaml").write_text(f"""
drift:
  baseline_samples: 200
  min_samples: 100
  window: 3
  for: 1
  hook:
    command: [{json.dumps(sys.executable)}, "-c", {json.dumps(script)}]
    cooldown: {cooldown}
""")
    return repo


def run_fleet(engines, repo, rng, start, seconds, shift, clock=None, versions=("1",)):
    now = start
    for _ in range(seconds):
        now += 1
        if clock is not None:
            clock.now = now
        for engine in engines:
            for v in versions:
                feed(monitor_of(engine, repo, v), rng, 300, shift)
            engine.tick(now=now)
        for engine in engines:  # let the hook thread answer before the next tick
            flush(engine)
    return now


def flush(engine):
    from gateway.monitoring.settings import HookSettings

    engine.hooks.submit(HookSettings(), "flush", None, {}).result(30)


def test_one_drift_episode_calls_the_hook_once_in_a_fleet(tmp_path):
    out = tmp_path / "calls.jsonl"
    repo = hook_repository(tmp_path, out, versions=("1", "2"))
    claims = FakeClaims()
    engines = [engine_for(repo, claim=claims.for_holder(f"w{i}")) for i in range(3)]
    rng = np.random.default_rng(7)
    versions = ("1", "2")
    now = run_fleet(engines, repo, rng, 0, 4, 0.0, claims, versions)
    assert not out.exists()
    now = run_fleet(engines, repo, rng, now, 10, 3.0, claims, versions)
    calls = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["model"] == "m"
    assert {key for _, key, _ in claims.asked} == {"drift-hook/m"}
    assert {ttl for _, _, ttl in claims.asked} == {100}
    assert len(claims.asked) == 3  # one per process: the losers wait for the cooldown too
    assert sum(e.hooks.calls.get(("m", "ok"), 0) for e in engines) == 1
    suppressed = sum(e.hook_suppressed.get("m", 0) for e in engines)
    assert suppressed >= 2  # the two losers (and the second version's alert in the winner)
    # Past the cooldown, still drifting: once more for the whole fleet.
    run_fleet(engines, repo, rng, now, 100, 3.0, claims, versions)
    assert len(out.read_text().splitlines()) == 2
    for engine in engines:
        engine.hooks.close()


def test_without_an_answer_from_the_store_the_hook_waits_then_is_called_once(tmp_path, caplog):
    out = tmp_path / "calls.jsonl"
    repo = hook_repository(tmp_path, out)
    claims = FakeClaims()
    claims.down = True
    engines = [engine_for(repo, claim=claims.for_holder(f"w{i}")) for i in range(2)]
    rng = np.random.default_rng(8)
    now = run_fleet(engines, repo, rng, 0, 3, 0.0, claims)
    with caplog.at_level(logging.WARNING):
        now = run_fleet(engines, repo, rng, now, 5, 3.0, claims)
    assert not out.exists()  # not called rather than called by every process
    assert "state store did not say" in caplog.text
    asked = len(claims.asked)
    now = run_fleet(engines, repo, rng, now, 5, 3.0, claims)
    assert len(claims.asked) == asked  # asked again only after CLAIM_RETRY_S
    claims.down = False
    run_fleet(engines, repo, rng, now, int(drift_module.CLAIM_RETRY_S) + 2, 3.0, claims)
    assert len(out.read_text().splitlines()) == 1
    for engine in engines:
        engine.hooks.close()


@pytest.fixture
def store_loop():
    """An event loop on its own thread, as the server's loop is to the drift thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_workers_on_one_file_store_call_the_hook_once(tmp_path, store_loop):
    out = tmp_path / "calls.jsonl"
    repo = hook_repository(tmp_path / "repo", out)
    stores = [FileStore(tmp_path / "state") for _ in range(2)]  # one per worker, one directory
    engines = [engine_for(repo, claim=fleet_claim(store, f"w{i}", store_loop))
               for i, store in enumerate(stores)]
    rng = np.random.default_rng(9)
    now = run_fleet(engines, repo, rng, 0, 4, 0.0)
    run_fleet(engines, repo, rng, now, 8, 3.0)
    assert len(out.read_text().splitlines()) == 1
    assert sorted(e.hook_suppressed.get("m", 0) for e in engines) == [0, 1]
    for engine in engines:
        engine.hooks.close()


def test_fleet_claim_runs_on_the_loop_and_raises_when_the_loop_is_gone(tmp_path):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    claim = fleet_claim(FileStore(tmp_path), "me", loop)
    assert claim("k", 60) is True and claim("k", 60) is False
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    with pytest.raises(RuntimeError):
        claim("other", 60)


def test_the_bundled_demo_repository_is_never_written_to():
    from gateway.config import DEMO_REPOSITORY
    from gateway.monitoring.drift import _in_package

    assert _in_package(DEMO_REPOSITORY / "tiny_mlp")
    assert not _in_package(DEMO_REPOSITORY.parent / "elsewhere")
