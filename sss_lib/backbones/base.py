"""The interface every backbone implements, and the data that crosses it.

The engine (:mod:`sss_lib.engine`) owns the volume, the preprocessing, the embedding cache, the
class bookkeeping and the output grid. A backbone owns a network: it embeds one preprocessed slice
and propagates a set of objects (classes) through a stack of slices from their key-slice prompts.

Shapes and coordinates:
    * a preprocessed slice is ``float32 (H, W)`` in ``[0, 1]`` at the volume's own slice resolution;
      the backbone resizes it to its ``image_size`` and normalises it itself;
    * prompts are :class:`sss_lib.prompts.SlicePrompt` in slice pixels: XY points, XYXY boxes;
    * logits come back at the slice resolution ``(H, W)``, float32; > 0 means inside.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..prompts import SlicePrompt

# Logit written where a propagation never reached (the object ended before this slice).
ABSENT_LOGIT = -32.0


@dataclasses.dataclass
class PropagationStep:
    """One slice's result for the objects that are still present on it.

    ``logits`` maps a class label to its ``(H, W)`` float32 logits. A label missing from the dict
    means the object has ended (or not begun) on this slice.
    """

    slice_index: int
    logits: dict[int, np.ndarray]


# Returns the embedding of slice ``s``, computing and caching it on first use.
EmbeddingLookup = Callable[[int], Any]


class Backbone(abc.ABC):
    """A promptable 2D/video segmentation network."""

    #: registry name, e.g. ``"sam2.1_hiera_tiny"`` or ``"litemedsam"``.
    name: str
    #: side of the square network input in pixels.
    image_size: int
    #: SHA-256 of the weights file (``"random-init"`` for untrained test models).
    weights_sha256: str
    #: True: the engine embeds every slice before propagating (SAM-2's memory may visit any slice).
    #: False: slices are embedded lazily, only where propagation goes (LiteMedSAM on a CPU).
    eager_embedding: bool = True

    def cache_key(self) -> str:
        """Identifies everything about the backbone that changes an embedding."""
        return f"{self.name}@{self.image_size}#{self.weights_sha256[:16]}"

    @abc.abstractmethod
    def embed_slice(self, image: np.ndarray) -> Any:
        """Embed one preprocessed slice ``(H, W)`` float32 in ``[0, 1]``.

        Returns an opaque object the same backbone's :meth:`propagate` understands. It should hold
        tensors detached from autograd; the engine keeps it in its cache.
        """

    @abc.abstractmethod
    def propagate(
        self,
        slices: np.ndarray,
        embedding: EmbeddingLookup,
        objects: Mapping[int, Sequence[SlicePrompt]],
    ) -> Iterator[PropagationStep]:
        """Segment ``objects`` (label -> its key-slice prompts) through ``slices`` ``(S, H, W)``.

        Propagates forward and backward from each object's key slices and stops, per object and
        direction, where the object has ended. Yields one :class:`PropagationStep` per slice it
        visits, in any order; a slice may be yielded twice (once per direction), in which case the
        later logits win. Must fetch embeddings only through ``embedding`` so the cache is used.
        Closing the generator early (cancel) must leave no state behind.
        """
