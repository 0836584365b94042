"""The interface every backbone implements, and the data that crosses it.

The engine (:mod:`sss_lib.engine`) owns the volume, the preprocessing, the embedding cache, the
class bookkeeping and the output grid. A backbone owns a network: it embeds one preprocessed slice
and propagates a set of objects (classes) through a stack of slices from their key-slice prompts.

Shapes and coordinates:
    * a preprocessed slice is ``float32 (H, W)`` in ``[0, 1]`` at the volume's own slice resolution;
      the backbone resizes it to its ``image_size`` and normalises it itself;
    * prompts are :class:`sss_lib.prompts.SlicePrompt` in slice pixels: XY points, XYXY boxes;
    * logits come back at the slice resolution ``(H, W)``, float32; > 0 means inside.

Propagation is cut into spans by each class's key slices and "not on this slice" markers
(:mod:`.spans` says how a slice's result is chosen). A backbone implements the two pieces,
:meth:`Backbone.segment_key` (a key slice from its own prompts) and :meth:`Backbone.propagate_span`
(one span from its bounding key slices); :meth:`Backbone.propagate` puts them together for whole
classes, and the engine calls them directly to recompute only the spans a prompt edit changed.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..prompts import SlicePrompt
from .spans import Gate, KeySlice, Run, Span, effective_prompts, plan_class, resolve_span

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

    def check_prompts(self, label: int, key_slices: Mapping[int, Sequence[SlicePrompt]],
                      shape_shw: tuple[int, int, int]) -> None:
        """Raise :class:`~sss_lib.errors.PromptError` for prompts this backbone cannot use.

        ``key_slices``: slice -> the effective box/point prompts there (no "absent" markers).
        Called before anything is embedded. The default accepts every prompt inside the stack.
        """
        for ps in key_slices.values():
            for p in ps:
                p.check_inside(shape_shw)

    def segment_key(self, slices: np.ndarray, embedding: EmbeddingLookup, label: int, index: int,
                    prompts: Sequence[SlicePrompt]) -> np.ndarray:
        """Key slice ``index`` of class ``label`` from its own ``prompts`` alone: ``(H, W)`` float32
        logits. Never depends on other slices' prompts (a user's box gives its own segmentation)."""
        raise NotImplementedError(f"{type(self).__name__} does not segment key slices on their own")

    def propagate_span(self, slices: np.ndarray, embedding: EmbeddingLookup, label: int,
                       span: Span) -> Iterator[PropagationStep]:
        """Class ``label`` on the slices of ``span`` from its bounding key slices (whose ``logits``
        are set), following :func:`.spans.resolve_span`: at most one step per slice, none outside
        the span. Must fetch embeddings only through ``embedding``; closing it early leaves no state.
        """
        raise NotImplementedError(f"{type(self).__name__} does not propagate spans")

    @classmethod
    def propagates_spans(cls) -> bool:
        """True when the backbone implements :meth:`segment_key` and :meth:`propagate_span`."""
        return cls.propagate_span is not Backbone.propagate_span and cls.segment_key is not Backbone.segment_key

    def propagate(
        self,
        slices: np.ndarray,
        embedding: EmbeddingLookup,
        objects: Mapping[int, Sequence[SlicePrompt]],
    ) -> Iterator[PropagationStep]:
        """Segment ``objects`` (label -> its prompts, "absent" markers included) through ``slices`` ``(S, H, W)``.

        Each class on its own: its key slices from their own prompts, then each span from its
        bounding key slices (see :mod:`.spans`). Never yields a class on an "absent" slice nor
        beyond one; a class with no key slice yields nothing. Yields one :class:`PropagationStep`
        per slice and class, key slices first. Prompts are checked (:meth:`check_prompts`) before
        anything is embedded. Closing the generator early (cancel) leaves no state behind.
        """
        shape = tuple(int(n) for n in slices.shape)
        plans = {}
        for label, prompts in objects.items():
            plan = plan_class(effective_prompts(list(prompts), int(label)), shape[0])
            self.check_prompts(int(label), {k: key.prompts for k, key in plan.keys.items()}, shape)  # type: ignore[arg-type]
            plans[int(label)] = plan
        for label, plan in plans.items():
            logits = {k: self.segment_key(slices, embedding, label, k, key.prompts) for k, key in plan.keys.items()}
            for k in plan.keys:
                yield PropagationStep(k, {label: logits[k]})
            for span in plan.with_key_logits(logits).spans():
                yield from self.propagate_span(slices, embedding, label, span)


def span_steps(label: int, span: Span, make_run: Callable[[KeySlice, int, int, Gate], Run]) -> Iterator[PropagationStep]:
    """:meth:`Backbone.propagate_span`'s usual body. ``make_run(key, direction, stop, gate)``
    makes the run of a bounding key slice: from ``key`` towards ``direction`` (+1 up from
    ``span.below``, -1 down from ``span.above``), never reaching slice ``stop``, asking ``gate``
    (``yield from gate.wait(s)``) before decoding slice ``s``. The runs are resolved by
    :func:`.spans.resolve_span` and yielded as steps of ``label``."""
    gates = {+1: Gate(), -1: Gate()}
    forward = make_run(span.below, +1, span.hi + 1, gates[+1]) if span.below is not None else None
    backward = make_run(span.above, -1, span.lo - 1, gates[-1]) if span.above is not None else None
    resolved = resolve_span(span, forward, backward, gates)
    try:
        for s, logits in resolved:
            yield PropagationStep(s, {label: logits})
    finally:
        resolved.close()
