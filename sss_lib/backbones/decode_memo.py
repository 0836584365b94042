"""A bounded memo of mask-decoder outputs, so a re-run does not decode the same thing twice.

A 2D carried propagation decodes slice ``s`` from (the embedding of ``s``, the box carried from
the previous slice). When a correction adds a key slice inside a span, the runs from the key slices
it did not change go through the same slices with the same boxes as in the last run: their decodes
are the same computation with the same inputs. Measured on brain1 (LiteMedSAM): 40-50 % of a
correction's decodes were such repeats. The memo returns the earlier output for them, so the result
is bit-identical to decoding again.

Entries are keyed by the embedding *object* (a weak reference, so an embedding dropped from the
embedding store cannot be matched by a new object that reuses its ``id``) and by the prompt; the
whole memo belongs to one version of the decoder's weights (:func:`weights_version`). It keeps the
:data:`MAX_ENTRIES` most recently used outputs (a LiteMedSAM output is a ``(1, 1, 256, 256)``
float32 tensor: 256 KiB, so 32 MiB at most).
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from typing import Any, Hashable

#: Outputs kept, least recently used dropped first.
MAX_ENTRIES = 128


def weights_version(*modules: Any) -> tuple:
    """Changes whenever a parameter or buffer of ``modules`` (torch modules) is replaced or
    modified in place (``load_state_dict``, an optimiser step): their identities and the sum of
    their tensors' version counters."""
    return WeightsWatch(*modules).version()


class WeightsWatch:
    """:func:`weights_version` of fixed ``modules``, cheap to ask again (asked once per decode): their
    tensors are listed once, so it sees in-place changes (``load_state_dict``, optimiser steps) but
    not a parameter object replaced by another; a new watch is needed for new modules."""

    def __init__(self, *modules: Any) -> None:
        self.ids = tuple(id(m) for m in modules)
        self.tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]

    def version(self) -> tuple:
        return (self.ids, sum(t._version for t in self.tensors))


class DecodeMemo:
    """Decoder outputs by (embedding object, prompt key), for one weights ``version``. Thread-safe.

    Args:
        version: the :func:`weights_version` the outputs were computed with.
        max_entries: how many outputs to keep.
    """

    def __init__(self, version: Hashable, max_entries: int = MAX_ENTRIES) -> None:
        self.version = version
        self.max_entries = max_entries
        self._items: "collections.OrderedDict[tuple[int, Hashable], tuple[weakref.ref, Any]]" = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, embedding: Any, key: Hashable) -> Any | None:
        """The output stored for ``embedding`` (this very object) and ``key``, or None."""
        with self._lock:
            item = self._items.get((id(embedding), key))
            if item is None or item[0]() is not embedding:
                self.misses += 1
                return None
            self._items.move_to_end((id(embedding), key))
            self.hits += 1
            return item[1]

    def put(self, embedding: Any, key: Hashable, value: Any) -> None:
        """Keep ``value`` as the output for ``embedding`` and ``key``."""
        with self._lock:
            self._items[(id(embedding), key)] = (weakref.ref(embedding), value)
            self._items.move_to_end((id(embedding), key))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
