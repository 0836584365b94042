"""The volume engine: prompts in, a label volume on the input's exact grid out.

A :class:`SegmentationSession` belongs to one volume and one backbone. It preprocesses the slice
stack once, keeps every slice embedding in an :class:`~sss_lib.embedding_cache.EmbeddingStore`, and
keeps each class's logits from the last run. A run recomputes only the classes whose prompts
changed (compared by :meth:`ClassPrompts.fingerprint`), then gives each voxel to the class with the
highest logit; background wins where every logit is below 0.

:meth:`SegmentationSession.run` is a generator of :class:`EngineEvent`, so the caller owns progress
and cancel: stop iterating (or ``close()`` it) and the session is left exactly as before the run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterator, Literal

import numpy as np

from .backbones.base import ABSENT_LOGIT, Backbone
from .embedding_cache import EmbeddingKey, EmbeddingStore
from .errors import Cancelled, PromptError
from .preprocess import Preprocessing, intensity_range, normalise_stack
from .prompts import PromptSet
from .volume import SliceAxis, Volume

log = logging.getLogger(__name__)

Stage = Literal["embed", "propagate", "done"]


@dataclasses.dataclass
class SegmentationResult:
    """What a run produced.

    Attributes:
        labels: label volume on the input's grid (uint8, or uint16 above 255 classes); 0 = background.
        recomputed: class labels propagated in this run.
        reused: class labels whose previous logits were reused unchanged.
        slices_per_class: label -> slice indices (along the session's axis) where it is present.
        seconds: wall time of the run.
        embeddings_computed: slice embeddings computed in this run (0 on a pure re-run).
    """

    labels: Volume
    recomputed: list[int]
    reused: list[int]
    slices_per_class: dict[int, list[int]]
    seconds: float
    embeddings_computed: int


@dataclasses.dataclass
class EngineEvent:
    """Progress of a run: ``done`` of ``total`` steps of ``stage``; ``result`` is set on "done"."""

    stage: Stage
    done: int
    total: int
    message: str
    result: SegmentationResult | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class SegmentationSession:
    """Segments one volume with one backbone, caching embeddings and per-class logits.

    Args:
        volume: the input volume (its grid is the output's grid).
        backbone: a built :class:`~sss_lib.backbones.base.Backbone`.
        slice_axis: the stack axis; default: the axis of largest spacing.
        preprocessing: the intensity rule (see :mod:`sss_lib.preprocess`).
        store: an embedding store to share between sessions; a private one by default.
    """

    def __init__(
        self,
        volume: Volume,
        backbone: Backbone,
        *,
        slice_axis: SliceAxis | None = None,
        preprocessing: Preprocessing | None = None,
        store: EmbeddingStore | None = None,
    ) -> None:
        self.volume = volume
        self.backbone = backbone
        self.slice_axis = slice_axis or volume.default_slice_axis()
        self.preprocessing = preprocessing or Preprocessing()
        low, high = intensity_range(volume.voxels, self.preprocessing)
        self.slices = normalise_stack(self.slice_axis.to_stack(volume.voxels), low, high)
        self.store = store or EmbeddingStore()
        self.key = EmbeddingKey(
            volume.content_hash(), backbone.cache_key(), self.preprocessing.key(), self.slice_axis.axis
        )
        self._logits: dict[int, np.ndarray] = {}  # label -> (S, H, W) float16
        self._fingerprints: dict[int, str] = {}

    @property
    def stack_shape(self) -> tuple[int, int, int]:
        return tuple(self.slices.shape)  # type: ignore[return-value]

    def embedding(self, slice_index: int) -> object:
        """The embedding of one slice, from the store or computed now."""
        return self.store.get_or_compute(
            self.key, slice_index, lambda: self.backbone.embed_slice(self.slices[slice_index])
        )

    def class_logits(self, label: int) -> np.ndarray:
        """The ``(S, H, W)`` float16 logits of a class from the last completed run."""
        return self._logits[label]

    def run(self, prompts: PromptSet) -> Iterator[EngineEvent]:
        """Segment with ``prompts``; yields progress, the last event carries the result.

        Only classes whose prompts changed since the last completed run are propagated; classes no
        longer in ``prompts`` are dropped. The session's state changes only when the generator
        reaches its "done" event.
        """
        t0 = time.perf_counter()
        computed_before = self.store.computed
        if prompts.slice_axis != self.slice_axis:
            raise PromptError(
                f"the prompts are for slice axis {prompts.slice_axis.axis} but this session slices along "
                f"{self.slice_axis.axis}; convert them or open a session on that axis"
            )
        prompts.check_inside(self.stack_shape)
        by_label = prompts.by_label()
        changed = prompts.changed_labels(self._fingerprints)
        reused = [lbl for lbl in by_label if lbl not in changed]

        n_slices = self.stack_shape[0]
        if changed and self.backbone.eager_embedding:
            missing = sorted(set(range(n_slices)) - self.store.cached_slices(self.key))
            for n, s in enumerate(missing, start=1):
                self.embedding(s)
                yield EngineEvent("embed", n, len(missing), f"embedded slice {s + 1}/{n_slices}")

        new_logits = {lbl: np.full(self.stack_shape, ABSENT_LOGIT, dtype=np.float16) for lbl in changed}
        if changed:
            objects = {lbl: by_label[lbl].prompts for lbl in changed}
            steps = self.backbone.propagate(self.slices, self.embedding, objects)
            visited: set[int] = set()
            try:
                for step in steps:
                    for lbl, logits in step.logits.items():
                        new_logits[lbl][step.slice_index] = logits
                    visited.add(step.slice_index)
                    yield EngineEvent(
                        "propagate", len(visited), n_slices,
                        f"propagated {len(changed)} class(es) through slice {step.slice_index + 1}/{n_slices}",
                    )
            finally:
                steps.close()

        # Commit: from here on the run has completed.
        for lbl in list(self._logits):
            if lbl not in by_label:
                del self._logits[lbl]
                self._fingerprints.pop(lbl, None)
        for lbl in changed:
            self._logits[lbl] = new_logits[lbl]
            self._fingerprints[lbl] = by_label[lbl].fingerprint()
        labels_stack = self._compose()
        present = {
            lbl: np.flatnonzero((labels_stack == lbl).reshape(n_slices, -1).any(axis=1)).tolist()
            for lbl in by_label
        }
        dtype = np.uint8 if max(by_label, default=0) < 256 else np.uint16
        labels = self.volume.with_voxels(self.slice_axis.from_stack(labels_stack.astype(dtype)))
        result = SegmentationResult(
            labels=labels,
            recomputed=sorted(changed),
            reused=sorted(reused),
            slices_per_class=present,
            seconds=time.perf_counter() - t0,
            embeddings_computed=self.store.computed - computed_before,
        )
        log.info("segmented %d class(es) (%d recomputed) in %.2f s", len(by_label), len(changed), result.seconds)
        yield EngineEvent("done", 1, 1, f"done in {result.seconds:.1f} s", result)

    def segment(
        self,
        prompts: PromptSet,
        *,
        progress: Callable[[EngineEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> SegmentationResult:
        """Run to completion, reporting to ``progress``; raises :class:`Cancelled` if asked to stop."""
        events = self.run(prompts)
        try:
            for event in events:
                if progress is not None:
                    progress(event)
                if event.result is not None:
                    return event.result
                if should_cancel is not None and should_cancel():
                    raise Cancelled("segmentation cancelled; nothing was changed")
        finally:
            events.close()
        raise AssertionError("engine finished without a result")

    def _compose(self) -> np.ndarray:
        """Argmax over classes; background where every logit is below 0. ``(S, H, W)`` int."""
        if not self._logits:
            return np.zeros(self.stack_shape, dtype=np.int32)
        labels = np.array(sorted(self._logits), dtype=np.int32)
        best = np.full(self.stack_shape, -np.inf, dtype=np.float32)
        out = np.zeros(self.stack_shape, dtype=np.int32)
        for lbl in labels:
            logits = self._logits[int(lbl)].astype(np.float32)
            win = (logits > best) & (logits > 0)
            out[win] = lbl
            np.maximum(best, logits, out=best)
        return out
