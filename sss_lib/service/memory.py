"""The service's memory budget: one embedding store shared by every session.

All sessions' slice embeddings live in one :class:`~sss_lib.embedding_cache.EmbeddingStore` with a
byte budget (``--memory-budget``); the least recently used slices are dropped first and computed
again when a later run needs them, so a full budget slows a run down but never fails it. Two
sessions on the same volume, backbone and preprocessing share their embeddings (same key).

Each session sees the store through a :class:`SessionStore`, which counts the embeddings *that
session* computed, so a run's ``embeddings_computed`` is exact even when other sessions compute
embeddings on other devices at the same time.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..embedding_cache import EmbeddingKey, EmbeddingStore


class SessionStore:
    """One session's view of the shared store (the interface the engine uses)."""

    def __init__(self, shared: EmbeddingStore) -> None:
        self.shared = shared
        self.computed = 0
        self._lock = threading.Lock()

    def get_or_compute(self, key: EmbeddingKey, slice_index: int, compute: Callable[[], Any]) -> Any:
        """The embedding from the shared store, or ``compute()`` counted against this session."""
        value = self.shared.get(key, slice_index)
        if value is not None:
            return value
        value = compute()
        self.shared.put(key, slice_index, value, computed=True)
        with self._lock:
            self.computed += 1
        return value

    def cached_slices(self, key: EmbeddingKey) -> set[int]:
        return self.shared.cached_slices(key)


class MemoryBudget:
    """The shared embedding store under a byte budget.

    Args:
        budget_bytes: the most bytes of embeddings kept at once (all sessions together).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = int(budget_bytes)
        self.store = EmbeddingStore(max_volumes=None, max_bytes=self.budget_bytes)

    def session_store(self) -> SessionStore:
        return SessionStore(self.store)

    def has_room_for_one(self) -> bool:
        """Whether one more slice embedding (of the average size held) fits without evicting."""
        store = self.store
        count = store.slice_count
        average = store.bytes_used / count if count else 0
        return store.bytes_used + average <= self.budget_bytes

    def stats(self) -> dict[str, int]:
        """``{budget_bytes, used_bytes, slices, evicted}`` for ``/v1/info``."""
        return {"budget_bytes": self.budget_bytes, "used_bytes": int(self.store.bytes_used),
                "slices": self.store.slice_count, "evicted": int(self.store.evicted)}
