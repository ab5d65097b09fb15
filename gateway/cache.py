"""Response cache (Triton's ``response_cache { enable: true }``), bounded in bytes, LRU.

One cache serves the whole server (``--cache-size BYTES``; 0 = none); a model uses it only if its
config.pbtxt enables it. The key is the model name, the version that serves the request (the
load of it: a version reloaded from a new file under the same number looks up afresh, and the
old load's entries age out) and the exact bytes of every input (with datatype and shape), so a
hit never answers with another version's outputs: routing picks the version first, the cache
is looked up in that version's batcher. Outputs are stored as read-only copies, whole (every output of the model); the
response still picks the outputs the caller asked for.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


class ResponseCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[bytes, tuple[list[np.ndarray], int]] = OrderedDict()
        self._lock = threading.Lock()  # the event loop only, today; cheap insurance
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(model: str, version: str, inputs: list[np.ndarray]) -> bytes:
        """A digest of the model, the version and the exact input bytes (in model order)."""
        h = hashlib.blake2b(digest_size=20)
        h.update(model.encode())
        h.update(b"\0")
        h.update(version.encode())
        for array in inputs:
            h.update(b"\0" + array.dtype.str.encode() + repr(array.shape).encode())
            if array.dtype.kind == "O":  # BYTES, decoded to str for ONNX Runtime
                for value in array.reshape(-1):
                    data = value.encode() if isinstance(value, str) else bytes(value)
                    h.update(len(data).to_bytes(8, "little"))
                    h.update(data)
            else:
                h.update(np.ascontiguousarray(array).data)
        return h.digest()

    def get(self, key: bytes) -> list[np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: bytes, outputs: list[np.ndarray]) -> bool:
        """Keep copies of ``outputs`` under ``key``, evicting the least recently used entries
        to stay within the capacity; False if they alone would not fit."""
        copies = []
        size = len(key)
        for out in outputs:
            copy = np.array(out, copy=True)
            copy.flags.writeable = False
            copies.append(copy)
            size += _nbytes(copy)
        if size > self.capacity:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old[1]
            while self._entries and self.used + size > self.capacity:
                _, (_, freed) = self._entries.popitem(last=False)
                self.used -= freed
                self.evictions += 1
            self._entries[key] = (copies, size)
            self.used += size
        return True


def _nbytes(array: np.ndarray) -> int:
    if array.dtype.kind != "O":
        return array.nbytes
    return array.nbytes + sum(len(v) for v in array.reshape(-1)
                              if isinstance(v, (bytes, str)))
