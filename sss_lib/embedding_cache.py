"""Per-slice image embeddings, computed once and reused by every re-run.

Keys are :class:`EmbeddingKey`: the volume's content hash, the backbone's cache key (name, input
size, weights hash), the preprocessing and the slice axis. Anything that changes an embedding
changes the key, so a stale embedding can never be served.

The store has two limits, both least-recently-used: ``max_volumes`` keys (whole volumes), and
optionally ``max_bytes`` of embeddings (single slices are dropped, oldest use first). A dropped
embedding is simply computed again when asked for, so a limit never makes a caller fail.
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


def nbytes_of(value: Any) -> int:
    """Bytes held by the arrays in ``value``: numpy arrays and torch tensors, also inside
    dataclasses, dicts, lists and tuples (other leaves count 0). torch is not imported."""
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return 0
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and hasattr(value, "dtype"):  # numpy array
        return nbytes
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch tensor
        return int(value.element_size()) * int(value.nelement())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes_of(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes_of(v) for v in value)
    return 0


class EmbeddingStore:
    """In-memory store of slice embeddings for the most recent volumes. Thread-safe.

    Args:
        max_volumes: how many (volume, backbone, preprocessing) entries to keep (None: no count
            limit); the least recently used is dropped first. Embeddings of one 48-slice volume at
            1024 take about 0.5-1 GB.
        max_bytes: a budget for all embeddings together, counted by :func:`nbytes_of` (None: no
            budget); the least recently used slices are dropped first. An embedding larger than
            the whole budget is returned but not kept.
    """

    def __init__(self, max_volumes: int | None = 2, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_volumes = max_volumes
        self.max_bytes = max_bytes
        self._entries: "collections.OrderedDict[EmbeddingKey, dict[int, Any]]" = collections.OrderedDict()
        # Slice-level use order and sizes, for the byte budget.
        self._order: "collections.OrderedDict[tuple[EmbeddingKey, int], int]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.computed = 0  # number of embeddings computed (not served from the store)
        self.evicted = 0  # number of slice embeddings dropped to respect a limit

    def get(self, key: EmbeddingKey, slice_index: int) -> Any | None:
        """The stored embedding (marking it used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            if slice_index not in entry:
                return None
            self._order.move_to_end((key, slice_index))
            return entry[slice_index]

    def get_or_compute(self, key: EmbeddingKey, slice_index: int, compute: Callable[[], Any]) -> Any:
        """The embedding of ``slice_index`` under ``key``, computing it with ``compute()`` on a miss."""
        value = self.get(key, slice_index)
        if value is not None:
            return value
        value = compute()
        self.put(key, slice_index, value, computed=True)
        return value

    def put(self, key: EmbeddingKey, slice_index: int, value: Any, *, computed: bool = False) -> None:
        """Store ``value``; ``computed`` counts it in :attr:`computed`. Applies both limits."""
        size = nbytes_of(value) if self.max_bytes is not None else 0
        with self._lock:
            if computed:
                self.computed += 1
            self._drop_slice(key, slice_index)
            entry = self._entries.setdefault(key, {})
            self._entries.move_to_end(key)
            entry[slice_index] = value
            self._order[(key, slice_index)] = size
            self.bytes_used += size
            while self.max_volumes is not None and len(self._entries) > self.max_volumes:
                dropped = next(iter(self._entries))
                for s in list(self._entries[dropped]):
                    self._drop_slice(dropped, s)
                self._entries.pop(dropped, None)
                log.debug("embedding store full: dropped %s", dropped)
            while self.max_bytes is not None and self.bytes_used > self.max_bytes and self._order:
                (old_key, old_slice), _ = next(iter(self._order.items()))
                self._drop_slice(old_key, old_slice)
                self.evicted += 1
                log.debug("embedding budget of %d bytes reached: dropped slice %d of %s",
                          self.max_bytes, old_slice, old_key)

    def _drop_slice(self, key: EmbeddingKey, slice_index: int) -> None:
        """Forget one slice (lock held)."""
        size = self._order.pop((key, slice_index), None)
        if size is None:
            return
        self.bytes_used -= size
        entry = self._entries.get(key)
        if entry is not None:
            entry.pop(slice_index, None)
            if not entry:
                del self._entries[key]

    def cached_slices(self, key: EmbeddingKey) -> set[int]:
        with self._lock:
            return set(self._entries.get(key, {}))

    @property
    def slice_count(self) -> int:
        """Number of slice embeddings held. (Not ``__len__``: callers write ``store or EmbeddingStore()``.)"""
        with self._lock:
            return len(self._order)

    def discard(self, key: EmbeddingKey) -> None:
        """Forget every embedding under ``key``."""
        with self._lock:
            for s in list(self._entries.get(key, {})):
                self._drop_slice(key, s)
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._order.clear()
            self.bytes_used = 0
