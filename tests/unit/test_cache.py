"""The response cache: exact-input keys per model version, LRU within a byte bound."""

from __future__ import annotations

import numpy as np

from gateway.cache import ResponseCache


def arrays(value: float, rows: int = 1) -> list[np.ndarray]:
    return [np.full((rows, 4), value, np.float32)]


def test_the_key_covers_model_version_and_exact_input_bytes():
    key = ResponseCache.key
    base = key("m", "1", arrays(1.0))
    assert base == key("m", "1", arrays(1.0))
    assert base != key("m", "2", arrays(1.0))  # never another version's answer
    assert base != key("n", "1", arrays(1.0))
    assert base != key("m", "1", arrays(1.0 + 1e-7))
    assert base != key("m", "1", [np.full((2, 2), 1.0, np.float32)])  # same bytes, other shape
    assert base != key("m", "1", [np.full((1, 4), 1.0, np.float64)[:, :2]])
    text = [np.array(["ab", "c"], dtype=object)]
    assert key("m", "1", text) != key("m", "1", [np.array(["a", "bc"], dtype=object)])


def test_hits_return_read_only_copies_and_misses_are_counted():
    cache = ResponseCache(1 << 20)
    out = np.arange(4, dtype=np.float32)
    assert cache.get(b"k") is None
    assert cache.put(b"k", [out])
    out[0] = 99  # the caller's array changes later: the cached copy does not
    (got,) = cache.get(b"k")
    assert got[0] == 0 and not got.flags.writeable
    assert (cache.hits, cache.misses) == (1, 1)


def test_least_recently_used_entries_go_first_and_the_bound_holds():
    entry = 1000 * 4 + 20  # 1000 float32 plus the key
    cache = ResponseCache(3 * entry)
    for name in (b"a" * 20, b"b" * 20, b"c" * 20):
        cache.put(name, [np.zeros(1000, np.float32)])
    cache.get(b"a" * 20)  # a is now the most recent
    cache.put(b"d" * 20, [np.zeros(1000, np.float32)])
    assert cache.get(b"b" * 20) is None  # b was the least recently used
    assert cache.get(b"a" * 20) is not None and cache.get(b"d" * 20) is not None
    assert cache.used <= cache.capacity and len(cache) == 3 and cache.evictions == 1
    assert not cache.put(b"big", [np.zeros(10_000, np.float32)])  # larger than the whole cache
    assert len(cache) == 3
