"""The volume engine: prompts in, a label volume on the input's exact grid out.

A :class:`SegmentationSession` belongs to one volume and one backbone. It preprocesses the slice
stack once, keeps every slice embedding in an :class:`~sss_lib.embedding_cache.EmbeddingStore`, and
keeps each class's logits from the last run. Each voxel goes to the class with the highest logit;
background wins where every logit is below 0.

How a class's slices are resolved (:mod:`sss_lib.backbones.spans`): its key slices (box/point
prompts) and its "not on this slice" markers cut the stack into spans.

* A **key slice** takes its own prompt's segmentation (the backbone's ``segment_key``), never a
  propagated one: a correct box gives that box's result on its slice, whatever else is prompted.
* A **"not on this slice"** slice is empty, and no propagation crosses it.
* A **span** (the slices strictly between two neighbouring markers, or between a marker and the
  stack's end) with a key slice on at least one side is filled by runs from its bounding key
  slices, each going into the span until the backbone says the object ended or the span ends.
  A slice both runs reached takes the **distance-weighted mean of their logits** (the nearer key
  slice weighs more); a slice one run reached takes that run's result; a slice no run reached is
  empty.
* A span with no key slice on either side (between two absent markers, or an absent marker and
  the stack's end) is empty; a class with only absent markers is empty everywhere.

A span's result depends only on its two bounding markers, so a re-run recomputes only what an edit
changed: classes whose prompts are unchanged (:meth:`ClassPrompts.fingerprint`) are reused whole;
in a changed class, key slices whose prompts are unchanged and spans whose bounding markers are
unchanged keep their previous logits exactly, and only the new or changed key slices and the spans
they bound (up to the neighbouring key slices or markers) are decoded and propagated. Adding a key
slice between two others therefore changes nothing outside those two.

A backbone without span support (one that only implements ``propagate``) gets whole changed classes
propagated from their key slices, with absent slices and key-less spans blanked afterwards.

:meth:`SegmentationSession.run` is a generator of :class:`EngineEvent`, so the caller owns progress
and cancel: stop iterating (or ``close()`` it) and the session is left exactly as before the run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Generator, Iterator, Literal

import numpy as np

from .backbones.base import ABSENT_LOGIT, Backbone
from .backbones.spans import ClassPlan, Span, plan_class
from .embedding_cache import EmbeddingKey, EmbeddingStore, default_ram_bytes
from .errors import Cancelled, PromptError
from .preprocess import Preprocessing, intensity_range, normalise_stack
from .prompts import PromptSet
from .volume import SliceAxis, Volume

log = logging.getLogger(__name__)

Stage = Literal["embed", "propagate", "done"]
#: Voxels the label map is composed in at a time (see SegmentationSession._compose).
_COMPOSE_VOXELS = 1 << 22


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
        recomputed_slices: label -> slices decoded or propagated in this run (key slices whose
            prompts changed and every slice of the spans they bound); every other slice of a
            recomputed class kept its previous logits.
    """

    labels: Volume
    recomputed: list[int]
    reused: list[int]
    slices_per_class: dict[int, list[int]]
    seconds: float
    embeddings_computed: int
    recomputed_slices: dict[int, list[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _ClassRun:
    """What the last completed run kept of one class.

    Attributes:
        fingerprint: :meth:`ClassPrompts.fingerprint` of the prompts it ran with.
        logits: ``(S, H, W)`` float16, :data:`ABSENT_LOGIT` where the class is absent.
        keys: key slice -> (fingerprint of its prompts, its own ``(H, W)`` float32 logits).
        spans: identities (:meth:`Span.identity`) of the spans it propagated.
    """

    fingerprint: str
    logits: np.ndarray
    keys: dict[int, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    spans: set = dataclasses.field(default_factory=set)


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


@dataclasses.dataclass
class _Work:
    """What a run computes for one changed class.

    Attributes:
        plan: the class's key slices, absent slices and spans.
        fingerprint: the class's prompts' fingerprint.
        kept: key slice -> its logits, reused from the last run (prompts unchanged there).
        decode: key slices to decode.
        spans: spans to propagate.
        copied: spans whose logits are copied from the last run.
    """

    plan: ClassPlan
    fingerprint: str
    kept: dict[int, np.ndarray]
    decode: list[int]
    spans: list[Span]
    copied: list[Span]

    def recomputed_slices(self) -> list[int]:
        return sorted(set(self.decode).union(*(span.slices() for span in self.spans)))


class SegmentationSession:
    """Segments one volume with one backbone, caching embeddings and per-class logits.

    Args:
        volume: the input volume (its grid is the output's grid).
        backbone: a built :class:`~sss_lib.backbones.base.Backbone`.
        slice_axis: the stack axis; default: the axis of largest spacing.
        preprocessing: the intensity rule (see :mod:`sss_lib.preprocess`).
        store: an embedding store to share between sessions; a private one by default, with a disk
            tier past :func:`~sss_lib.embedding_cache.default_ram_bytes` on a CPU.
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
        # A private store keeps at most default_ram_bytes() of a CPU backbone's embeddings in RAM and
        # the rest in a spool file (a 300-slice CT at 1024 px holds 2.3 GB of SAM-2 embeddings).
        device = getattr(backbone, "device", "cpu")
        device_type = str(getattr(device, "type", device)).split(":")[0]
        self.store = store or EmbeddingStore(ram_bytes=default_ram_bytes(device_type))
        self.key = EmbeddingKey(
            volume.content_hash(), backbone.cache_key(), self.preprocessing.key(), self.slice_axis.axis
        )
        self._runs: dict[int, _ClassRun] = {}

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
        return self._runs[label].logits

    def run(self, prompts: PromptSet) -> Iterator[EngineEvent]:
        """Segment with ``prompts``; yields progress, the last event carries the result.

        Only classes whose prompts changed since the last completed run are recomputed, and in
        them only the key slices and spans the change touches (see the module docstring); classes
        no longer in ``prompts`` are dropped. The session's state changes only when the generator
        reaches its "done" event.

        Raises:
            PromptError: prompts on another slice axis or outside the stack, contradicting prompts
                on one slice, or prompts the backbone cannot use (checked before any embedding).
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
        changed = prompts.changed_labels({lbl: r.fingerprint for lbl, r in self._runs.items()})
        reused = [lbl for lbl in by_label if lbl not in changed]
        n_slices = self.stack_shape[0]
        plans = {lbl: plan_class(by_label[lbl].by_slice(), n_slices) for lbl in changed}
        for lbl, plan in plans.items():
            self.backbone.check_prompts(lbl, {k: key.prompts for k, key in plan.keys.items()}, self.stack_shape)

        if self.backbone.propagates_spans():
            work = {lbl: self._span_work(lbl, plan, by_label[lbl].fingerprint()) for lbl, plan in plans.items()}
        else:
            work = {lbl: _Work(plan, by_label[lbl].fingerprint(), {}, list(plan.keys), plan.spans(), [])
                    for lbl, plan in plans.items()}
        needs_network = any(w.decode or w.spans for w in work.values())
        if needs_network and self.backbone.eager_embedding:
            missing = sorted(set(range(n_slices)) - self.store.cached_slices(self.key))
            for n, s in enumerate(missing, start=1):
                self.embedding(s)
                yield EngineEvent("embed", n, len(missing), f"embedded slice {s + 1}/{n_slices}")

        if self.backbone.propagates_spans():
            runs = {}
            for lbl, w in work.items():
                runs[lbl] = yield from self._run_spans(lbl, w)
        else:
            runs = yield from self._run_whole_classes(by_label, work)

        # Commit: from here on the run has completed.
        self._runs = {lbl: (runs[lbl] if lbl in runs else self._runs[lbl]) for lbl in by_label}
        dtype = np.uint8 if max(by_label, default=0) < 256 else np.uint16
        labels_stack = self._compose(dtype)
        present = {
            lbl: np.flatnonzero((labels_stack == lbl).reshape(n_slices, -1).any(axis=1)).tolist()
            for lbl in by_label
        }
        labels = self.volume.with_voxels(self.slice_axis.from_stack(labels_stack))
        result = SegmentationResult(
            labels=labels,
            recomputed=sorted(changed),
            reused=sorted(reused),
            slices_per_class=present,
            seconds=time.perf_counter() - t0,
            embeddings_computed=self.store.computed - computed_before,
            recomputed_slices={lbl: w.recomputed_slices() for lbl, w in work.items()},
        )
        log.info("segmented %d class(es) (%d recomputed, %d slices) in %.2f s", len(by_label), len(changed),
                 sum(len(v) for v in result.recomputed_slices.values()), result.seconds)
        yield EngineEvent("done", 1, 1, f"done in {result.seconds:.1f} s", result)

    def _span_work(self, label: int, plan: ClassPlan, fingerprint: str) -> "_Work":
        """What of ``plan`` must be computed, given the class's previous run."""
        old = self._runs.get(label)
        kept: dict[int, np.ndarray] = {}
        decode: list[int] = []
        for k, key in plan.keys.items():
            before = old.keys.get(k) if old is not None else None
            if before is not None and before[0] == key.fingerprint(label):
                kept[k] = before[1]
            else:
                decode.append(k)
        spans, copied = [], []
        for span in plan.spans():
            if old is not None and span.identity(label) in old.spans:
                copied.append(span)
            else:
                spans.append(span)
        return _Work(plan, fingerprint, kept, decode, spans, copied)

    def _run_spans(self, label: int, w: "_Work") -> Generator[EngineEvent, None, _ClassRun]:
        """Decode ``w``'s key slices and propagate its spans; everything else from the last run."""
        old = self._runs.get(label)
        logits = np.full(self.stack_shape, ABSENT_LOGIT, dtype=np.float16)
        total = len(w.decode) + sum(len(span.slices()) for span in w.spans)
        done = 0
        key_logits = dict(w.kept)
        for k in w.decode:
            key_logits[k] = self.backbone.segment_key(self.slices, self.embedding, label, k, w.plan.keys[k].prompts)
            done += 1
            yield EngineEvent("propagate", done, total, f"class {label}: key slice {k + 1}")
        for k, kl in key_logits.items():
            logits[k] = kl
        for span in w.copied:
            assert old is not None
            logits[span.lo:span.hi + 1] = old.logits[span.lo:span.hi + 1]
        plan = w.plan.with_key_logits(key_logits)
        resolved = {span.identity(label): span for span in plan.spans()}
        for span in w.spans:
            span = resolved[span.identity(label)]
            steps = self.backbone.propagate_span(self.slices, self.embedding, label, span)
            try:
                for step in steps:
                    logits[step.slice_index] = step.logits[label]
                    done += 1
                    yield EngineEvent("propagate", done, total,
                                      f"class {label}: slice {step.slice_index + 1}/{self.stack_shape[0]}")
            finally:
                steps.close()
        keys = {k: (plan.keys[k].fingerprint(label), key_logits[k]) for k in plan.keys}
        spans = {span.identity(label) for span in plan.spans()}
        return _ClassRun(w.fingerprint, logits, keys, spans)

    def _run_whole_classes(self, by_label: dict, work: dict[int, "_Work"]) -> Generator[EngineEvent, None, dict]:
        """Backbones without span support: propagate whole changed classes, then blank the slices
        the span rule leaves empty (absent slices, key-less spans)."""
        n_slices = self.stack_shape[0]
        new_logits = {lbl: np.full(self.stack_shape, ABSENT_LOGIT, dtype=np.float16) for lbl in work}
        objects = {lbl: [p for key in w.plan.keys.values() for p in key.prompts] for lbl, w in work.items()}
        objects = {lbl: ps for lbl, ps in objects.items() if ps}
        if objects:
            steps = self.backbone.propagate(self.slices, self.embedding, objects)
            visited: set[int] = set()
            try:
                for step in steps:
                    for lbl, lg in step.logits.items():
                        new_logits[lbl][step.slice_index] = lg
                    visited.add(step.slice_index)
                    yield EngineEvent("propagate", len(visited), n_slices,
                                      f"propagated {len(objects)} class(es) through slice {step.slice_index + 1}/{n_slices}")
            finally:
                steps.close()
        runs = {}
        for lbl, w in work.items():
            allowed = np.zeros(n_slices, dtype=bool)
            allowed[list(w.plan.keys)] = True
            for span in w.plan.spans():
                allowed[span.lo:span.hi + 1] = True
            new_logits[lbl][~allowed] = ABSENT_LOGIT
            runs[lbl] = _ClassRun(w.fingerprint, new_logits[lbl])
        return runs

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

    def _compose(self, dtype: type = np.int32) -> np.ndarray:
        """Argmax over classes; background where every logit is below 0. ``(S, H, W)`` of ``dtype``.

        A few slices at a time: whole-stack float32 temporaries would cost 4 bytes per voxel each
        (over 1 GB together for a 512x512x300 CT)."""
        out = np.zeros(self.stack_shape, dtype=dtype)
        slice_voxels = max(1, int(np.prod(self.stack_shape[1:])))
        step = max(1, _COMPOSE_VOXELS // slice_voxels)
        for lo in range(0, self.stack_shape[0], step):
            best = np.full((min(step, self.stack_shape[0] - lo),) + self.stack_shape[1:], -np.inf, dtype=np.float32)
            chunk = out[lo:lo + step]
            for lbl in sorted(self._runs):
                logits = self._runs[lbl].logits[lo:lo + step].astype(np.float32)
                chunk[(logits > best) & (logits > 0)] = lbl
                np.maximum(best, logits, out=best)
        return out
