"""Per-slice image embeddings, computed once and reused by every re-run.

Keys are :class:`EmbeddingKey`: the volume's content hash, the backbone's cache key (name, input
size, weights hash), the preprocessing and the slice axis. Anything that changes an embedding
changes the key, so a stale embedding can never be served.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbeddingKey:
    volume_hash: str
    backbone: str
    preprocessing: str
    slice_axis: int


class EmbeddingStore:
    """In-memory store of slice embeddings for the most recent volumes.

    Args:
        max_volumes: how many (volume, backbone, preprocessing) entries to keep; the least recently
            used is dropped first. Embeddings of one 48-slice volume at 1024 take about 0.5-1 GB.
    """

    def __init__(self, max_volumes: int = 2) -> None:
        self.max_volumes = max_volumes
        self._entries: "collections.OrderedDict[EmbeddingKey, dict[int, Any]]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0  # number of embeddings computed (not served from the store)

    def get_or_compute(self, key: EmbeddingKey, slice_index: int, compute: Callable[[], Any]) -> Any:
        """The embedding of ``slice_index`` under ``key``, computing it with ``compute()`` on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                if slice_index in entry:
                    return entry[slice_index]
        value = compute()
        with self._lock:
            entry = self._entries.setdefault(key, {})
            self._entries.move_to_end(key)
            entry[slice_index] = value
            self.computed += 1
            while len(self._entries) > self.max_volumes:
                dropped, _ = self._entries.popitem(last=False)
                log.debug("embedding store full: dropped %s", dropped)
        return value

    def cached_slices(self, key: EmbeddingKey) -> set[int]:
        with self._lock:
            return set(self._entries.get(key, {}))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
