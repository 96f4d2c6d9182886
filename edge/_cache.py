"""Opt-in LRU cache of results, keyed by model, plan digest and input digest."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["ResultCache", "input_digest"]


def input_digest(inputs: Mapping[str, np.ndarray]) -> str:
    """sha256 over each input's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        a = np.ascontiguousarray(inputs[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ResultCache:
    """A thread-safe LRU of ``(model, plan_digest, input_digest) -> outputs``."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[str, str, str], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str, str]) -> dict[str, np.ndarray] | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, str, str], outputs: dict[str, Any]) -> None:
        with self._lock:
            self._data[key] = {k: np.array(v, copy=True) for k, v in outputs.items()}
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
