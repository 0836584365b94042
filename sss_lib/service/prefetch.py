"""Embeddings ahead of need: after a run, the session's slices that are not embedded yet are
embedded in the background, nearest to the prompts' extent first, so the next correction (a prompt
moved or added a few slices away) finds them ready.

Background work runs on the device's worker at a lower priority than runs, one slice per work
item, so a run that arrives waits at most one slice. It never evicts: it stops when the memory
budget has no room for another slice. It also stops when the session closes, the service stops,
or a newer run of the session planned again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .memory import MemoryBudget
from .runs import PRIORITY_BACKGROUND, RunManager

if TYPE_CHECKING:
    from .sessions import Session

log = logging.getLogger(__name__)


def slice_order(n_slices: int, extent: tuple[int, int] | None) -> list[int]:
    """Slice indices by distance from ``extent`` (``(first, last)`` key slice, inclusive), inside
    first, lower index first on ties; None: from the middle out."""
    if extent is None:
        mid = (n_slices - 1) // 2
        extent = (mid, mid)
    lo, hi = extent

    def distance(s: int) -> int:
        return lo - s if s < lo else (s - hi if s > hi else 0)

    return sorted(range(n_slices), key=lambda s: (distance(s), s))


def schedule(session: "Session", extent: tuple[int, int] | None, runs: RunManager, memory: MemoryBudget) -> None:
    """Plan the session's missing embeddings (replacing any earlier plan) on its device's worker."""
    session.prefetch_plan += 1
    plan = session.prefetch_plan
    order = slice_order(session.stack_shape[0], extent)
    worker = runs.worker(session.device)

    def step(position: int) -> None:
        if session.closed or runs.closing or plan != session.prefetch_plan:
            return
        cached = session.store.cached_slices(session.engine.key)
        while position < len(order) and order[position] in cached:
            position += 1
        if position >= len(order) or not memory.has_room_for_one():
            return
        session.engine.embedding(order[position])
        session.prefetched += 1
        worker.submit(PRIORITY_BACKGROUND, lambda: step(position + 1))

    worker.submit(PRIORITY_BACKGROUND, lambda: step(0))
