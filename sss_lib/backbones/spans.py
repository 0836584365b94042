"""How one class's key slices and "not on this slice" markers cut a stack into spans.

This is the one place that says which propagation a slice's result comes from; every backbone
(:meth:`~.base.Backbone.propagate`) and the engine (:mod:`sss_lib.engine`) follow it.

A class's *markers* are its key slices (box/point prompts) and its "absent" slices ("not on this
slice"). Sorted along the stack they cut it into gaps: the slices strictly between two neighbouring
markers, or between a marker and an end of the stack.

* A key slice's result is its own prompt's segmentation (:meth:`~.base.Backbone.segment_key`),
  never a propagated one.
* An absent slice is empty.
* A gap with a key slice on at least one side is a :class:`Span`. A *run* starts at each bounding
  key slice and goes into the span (forward from the key below, backward from the key above) until
  the backbone says the object has ended or the span ends: a run never leaves its span, so it never
  crosses a marker. A slice that **both runs reached takes the distance-weighted mean of their
  logits** (weight ``(b - s) / (b - a)`` for the run from key ``a`` below, ``(s - a) / (b - a)``
  for the run from key ``b`` above); a slice one run reached takes that run's result; a slice no
  run reached is empty (the ``"blend"`` rule, :data:`DEFAULT_SPAN_RULE`).
* Why blend rather than "nearest run wins" (the ``"nearest"`` rule, kept for comparison): with
  nearest-wins, a new key slice between two others hands every slice nearer to it over to its own
  run outright, so one correct box can replace a good propagated slice from the far key slice by a
  worse one from the new key and lower 3D Dice (brain1, round 2). Blending lets both neighbours
  vote on every slice between them, each in proportion to its nearness, so a new key slice shifts
  the slices near it towards its own segmentation and those far from it only a little; on held-out
  cases (``benchmarks/bench_correction_validation.py``) it lowered 3D Dice in fewer correction
  rounds than nearest-wins. Neither rule can promise that a correct box never lowers 3D Dice: the
  new key slice's run may still be worse than the runs it replaces (brain1 round 3 under blend),
  and a run into an outer span (no key slice beyond it) is as long as the stop rule lets it be.
* ``"blend_agree"`` (for comparison, not the default): as blend, but each run of a span with key
  slices on both sides also decodes the far bounding key slice (one slice past the span, never
  yielded), and its blend weight is multiplied by its agreement there (IoU with that key slice's
  own segmentation, plus :data:`AGREE_FLOOR`) and renormalised, so a run that cannot even reproduce
  the other user box counts less on the slices between them.
* A gap with no key slice on either side (between two absent markers, or between an absent marker
  and the stack's end, or a class with no key slice at all) is empty.

Under every rule a span's result depends only on the span's two bounding markers (their slices
and prompts): editing one marker changes only the spans it bounds (the slices up to its
neighbouring markers), which is what lets the engine recompute only those.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator, Literal, Sequence

import numpy as np

from ..prompts import SlicePrompt, prompts_fingerprint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KeySlice:
    """A key slice of one class: its effective prompts and (once decoded) its own segmentation.

    Attributes:
        index: slice index.
        prompts: the prompts that count there (see :meth:`sss_lib.prompts.ClassPrompts.by_slice`).
        logits: ``(H, W)`` float32 logits of :meth:`~.base.Backbone.segment_key`, or None until decoded.
    """

    index: int
    prompts: tuple[SlicePrompt, ...]
    logits: np.ndarray | None = None

    def fingerprint(self, label: int) -> str:
        return prompts_fingerprint(label, self.prompts)


@dataclasses.dataclass(frozen=True)
class Span:
    """Slices ``lo..hi`` (inclusive) between two markers, with the key slices that bound it.

    ``below`` is the key slice at ``lo - 1`` (None: an absent marker or the stack's start is there);
    ``above`` the key slice at ``hi + 1`` (None: an absent marker or the stack's end). At least one
    of them is set.
    """

    lo: int
    hi: int
    below: KeySlice | None
    above: KeySlice | None

    def slices(self) -> range:
        return range(self.lo, self.hi + 1)

    def identity(self, label: int) -> tuple:
        """Equal for two spans whose results are equal: same slices, same bounding prompts."""
        return (self.lo, self.hi,
                self.below.fingerprint(label) if self.below is not None else None,
                self.above.fingerprint(label) if self.above is not None else None)

    def owner(self, s: int) -> int:
        """+1 if slice ``s`` is nearer the key below (or equally near), -1 if nearer the key above."""
        if self.above is None:
            return +1
        if self.below is None:
            return -1
        return +1 if s - self.below.index <= self.above.index - s else -1


@dataclasses.dataclass(frozen=True)
class ClassPlan:
    """One class's key slices, absent slices and spans on a stack of ``n_slices``."""

    keys: dict[int, KeySlice]
    absent: tuple[int, ...]
    n_slices: int

    def spans(self) -> list[Span]:
        """The spans (gaps with a key slice on at least one side), in stack order; uses the
        :class:`KeySlice` objects of :attr:`keys` (with their logits, if set)."""
        markers: list[tuple[int, KeySlice | None]] = sorted(
            [(k, key) for k, key in self.keys.items()] + [(a, None) for a in self.absent], key=lambda m: m[0])
        bounds = [(-1, None)] + markers + [(self.n_slices, None)]
        out = []
        for (a, key_a), (b, key_b) in zip(bounds, bounds[1:]):
            if b - a > 1 and (key_a is not None or key_b is not None):
                out.append(Span(a + 1, b - 1, key_a, key_b))
        return out

    def with_key_logits(self, logits: dict[int, np.ndarray]) -> "ClassPlan":
        keys = {k: dataclasses.replace(key, logits=logits[k]) for k, key in self.keys.items()}
        return dataclasses.replace(self, keys=keys)


def plan_class(by_slice: dict[int, list[SlicePrompt]], n_slices: int) -> ClassPlan:
    """The plan of a class from :meth:`~sss_lib.prompts.ClassPrompts.by_slice` (slice -> its
    effective prompts, all prompts or all "absent" markers)."""
    keys = {k: KeySlice(k, tuple(ps)) for k, ps in sorted(by_slice.items()) if not ps[0].absent}
    absent = tuple(sorted(k for k, ps in by_slice.items() if ps[0].absent))
    return ClassPlan(keys, absent, int(n_slices))


def effective_prompts(prompts: Sequence[SlicePrompt], label: int = 0) -> dict[int, list[SlicePrompt]]:
    """Slice -> effective prompts of a bare prompt list (as :meth:`ClassPrompts.by_slice`)."""
    from ..prompts import ClassPrompts

    return ClassPrompts(int(label), f"class {label}", list(prompts)).by_slice()


# A run: (slice, (H, W) float32 logits) pairs, from its key slice outwards, one slice at a time,
# ending where the backbone decides the object has ended (or at the span's edge). Before it decodes
# slice s a run asks its Gate; while the gate says no it yields (s, None) instead ("waiting at s").
Run = Iterator[tuple[int, "np.ndarray | None"]]


class Gate:
    """Tells a run whether it may decode a slice yet (set by :func:`resolve_span`)."""

    def __init__(self) -> None:
        self.allow: Callable[[int], bool] = lambda s: True

    def wait(self, s: int) -> Iterator[tuple[int, None]]:
        """``yield from gate.wait(s)`` in a run before decoding slice ``s``."""
        while not self.allow(s):
            yield s, None


SpanRule = Literal["blend", "nearest", "blend_prob", "blend_agree", "interp_box", "interp_blend"]
#: The rule :func:`resolve_span` uses unless told otherwise (see the module docstring; chosen on
#: held-out cases by ``benchmarks/bench_correction_validation.py``).
DEFAULT_SPAN_RULE: SpanRule = "blend"
SPAN_RULES: tuple[str, ...] = ("blend", "nearest", "blend_prob", "blend_agree", "interp_box", "interp_blend")
#: ``"blend_agree"``: the least agreement factor a run gets (so no run is ever weighted zero).
AGREE_FLOOR = 0.05


def run_stop(span: Span, direction: int, rule: str = DEFAULT_SPAN_RULE) -> int:
    """The ``stop`` (first slice not decoded) of the run into ``span`` going ``direction`` (+1: from
    ``span.below`` up, -1: from ``span.above`` down). Every rule stops a run at the span's far end,
    except ``"blend_agree"`` in a span with key slices on both sides: there each run may decode one
    slice more, the far bounding key slice, to measure its agreement with that key's own
    segmentation (never yielded as a result)."""
    far = span.hi + 1 if direction > 0 else span.lo - 1
    if rule == "blend_agree" and span.below is not None and span.above is not None:
        return far + direction
    return far


def resolve_span(span: Span, forward: Run | None, backward: Run | None,
                 gates: dict[int, Gate] | None = None,
                 rule: str = DEFAULT_SPAN_RULE, interpolated: Run | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The span's result from its two runs (module docstring).

    ``forward`` starts at ``span.lo`` going up (None without a key below), ``backward`` at
    ``span.hi`` going down; ``gates`` (direction +1/-1 -> :class:`Gate`) are the gates those runs
    ask before decoding a slice, so nothing is decoded (or embedded) that cannot count. ``rule``:

    * ``"blend"`` (default): a slice both runs reached takes the distance-weighted mean of their
      logits; a slice one run reached takes that run's. Each run goes as far into the span as it
      reaches.
    * ``"nearest"``: a slice takes the result of the nearest key slice whose run reached it (equal
      distance: the key below); a run is let decode a slice only while it may still be its own.
    * ``"blend_prob"``: as ``"blend"``, but the weighted mean of the two probabilities (sigmoid),
      returned as logits (for comparison only).
    * ``"blend_agree"``: as ``"blend"``, but in a span with key slices on both sides each run's
      weight is also multiplied by its agreement on the far bounding key slice (see
      :func:`agreement`) and the two weights renormalised. For that the runs must be made with
      :func:`run_stop` (one slice past the span, onto the far key slice); that slice's decode is
      only compared, never yielded. A run that ended before the far key slice counts as empty there.
      The key slices' ``logits`` must be set (they are whenever a span is propagated).
    * ``"interp_box"`` (2D backbones): where ``interpolated`` is given (a run over every slice of a
      span with key boxes on both sides, decoded from boxes interpolated between them), the span is
      that run; elsewhere ``"blend"``.
    * ``"interp_blend"``: as ``"interp_box"``, but each slice takes the mean of the interpolated
      decode's logits and the ``"blend"`` result (a slice no run reached: the interpolated decode).

    Yields each slice of the span at most once, each as ``(slice, (H, W) float32 logits)``.
    """
    if rule not in SPAN_RULES:
        raise ValueError(f"unknown span rule {rule!r}; use one of {', '.join(SPAN_RULES)}")
    gates = gates or {}
    runs = {+1: forward, -1: backward}
    try:
        if rule == "interp_box" and interpolated is not None:
            for gate in gates.values():
                gate.allow = lambda s: False  # the carried runs decode nothing
            yield from interpolated
        elif rule == "interp_blend" and interpolated is not None:
            blended = dict(_blend(span, runs, gates, probabilities=False))
            for s, logits in interpolated:
                other = blended.get(s)
                yield s, logits if other is None else _mix(logits, other, 0.5, False)
        elif rule == "nearest":
            yield from _resolve(span, runs, gates)
        elif rule == "blend_agree" and forward is not None and backward is not None:
            yield from _blend_agree(span, runs, gates)
        else:
            yield from _blend(span, runs, gates, probabilities=rule == "blend_prob")
    finally:
        for run in runs.values():
            if run is not None and hasattr(run, "close"):
                run.close()  # type: ignore[union-attr]


def blend_weight(span: Span, s: int) -> float:
    """The weight of the run from below on slice ``s`` of a span with keys on both sides: its
    distance to the key above over the keys' distance (1 next to the key below, 0 next to the key
    above)."""
    assert span.below is not None and span.above is not None
    return (span.above.index - s) / (span.above.index - span.below.index)


def _blend(span: Span, runs: dict[int, Run | None], gates: dict[int, Gate],
           probabilities: bool) -> Iterator[tuple[int, np.ndarray]]:
    def inside(s: int) -> bool:
        return span.lo <= s <= span.hi

    for gate in gates.values():
        gate.allow = inside  # each run may decode every slice of its span

    def reach(direction: int) -> Iterator[tuple[int, np.ndarray]]:
        run = runs[direction]
        if run is None:
            return
        for s, logits in run:
            if not inside(s):
                return
            if logits is not None:  # never None: the gate lets every slice of the span through
                yield s, logits

    if runs[-1] is None or runs[+1] is None:
        yield from reach(+1 if runs[-1] is None else -1)
        return
    from_below = dict(reach(+1))  # only a span with keys on both sides is held in memory
    for s, above in reach(-1):
        below = from_below.pop(s, None)
        yield s, (above if below is None else _mix(below, above, blend_weight(span, s), probabilities))
    yield from sorted(from_below.items())


def agreement(run_logits: np.ndarray | None, key_logits: np.ndarray) -> float:
    """IoU of a run's mask on a key slice (None: the run never got there, an empty mask) with the
    key slice's own segmentation, both ``(H, W)`` logits thresholded at 0; 1 when both are empty."""
    key = key_logits > 0
    if run_logits is None:
        return 0.0 if key.any() else 1.0
    run = run_logits > 0
    union = int((run | key).sum())
    return 1.0 if union == 0 else int((run & key).sum()) / union


def agree_weight(span: Span, s: int, agree_below: float, agree_above: float,
                 floor: float = AGREE_FLOOR) -> float:
    """``"blend_agree"``: the weight of the run from below on slice ``s``: :func:`blend_weight`
    times ``agree_below + floor``, over that plus the run from above's ``(1 - blend_weight) *
    (agree_above + floor)``. Equal agreements give :func:`blend_weight` itself."""
    wb = blend_weight(span, s) * (agree_below + floor)
    wa = (1.0 - blend_weight(span, s)) * (agree_above + floor)
    return wb / (wb + wa)


def _blend_agree(span: Span, runs: dict[int, Run | None], gates: dict[int, Gate]) -> Iterator[tuple[int, np.ndarray]]:
    assert span.below is not None and span.above is not None
    assert span.below.logits is not None and span.above.logits is not None, "decode the key slices first"
    far = {+1: span.above.index, -1: span.below.index}

    def allowed(s: int) -> bool:  # the span, and the far key slice of either run
        return span.lo - 1 <= s <= span.hi + 1

    for gate in gates.values():
        gate.allow = allowed
    reached: dict[int, dict[int, np.ndarray]] = {+1: {}, -1: {}}
    at_far: dict[int, np.ndarray | None] = {+1: None, -1: None}
    for direction in (+1, -1):  # both runs in full first: the weights need both agreements
        for s, logits in runs[direction] or ():
            if logits is None:
                break  # cannot happen: the gate lets every allowed slice through
            if s == far[direction]:
                at_far[direction] = logits
                break
            if not span.lo <= s <= span.hi:
                break
            reached[direction][s] = logits
    agree_below = agreement(at_far[+1], span.above.logits)
    agree_above = agreement(at_far[-1], span.below.logits)
    log.debug("span %d..%d: agreement of the run from below %.3f, from above %.3f",
              span.lo, span.hi, agree_below, agree_above)
    for s in span.slices():
        below, above = reached[+1].get(s), reached[-1].get(s)
        if below is None and above is None:
            continue
        if below is None or above is None:
            yield s, below if above is None else above  # type: ignore[misc]
        else:
            yield s, _mix(below, above, agree_weight(span, s, agree_below, agree_above), False)


def _mix(below: np.ndarray, above: np.ndarray, w: float, probabilities: bool) -> np.ndarray:
    """``w`` of ``below`` and ``1 - w`` of ``above``: of the logits, or of the probabilities."""
    if not probabilities:
        return (w * below.astype(np.float32) + (1.0 - w) * above.astype(np.float32)).astype(np.float32)
    p = w / (1.0 + np.exp(-below.astype(np.float64))) + (1.0 - w) / (1.0 + np.exp(-above.astype(np.float64)))
    p = np.clip(p, 1e-14, 1.0 - 1e-14)
    return np.log(p / (1.0 - p)).astype(np.float32)


def _resolve(span: Span, runs: dict[int, Run | None], gates: dict[int, Gate]) -> Iterator[tuple[int, np.ndarray]]:
    taken: dict[int, int] = {}  # direction -> the last slice it yielded (its reach so far)
    held: dict[int, tuple[int, np.ndarray]] = {}  # an ungated run's item decoded before its turn

    def advance(direction: int, while_ok: Callable[[int], bool]) -> Iterator[tuple[int, np.ndarray]]:
        run = runs[direction]
        if run is None:
            return

        def ok(s: int) -> bool:
            return span.lo <= s <= span.hi and while_ok(s)

        if direction in gates:
            gates[direction].allow = ok
        while True:
            item = held.pop(direction, None) or next(run, None)
            if item is None:
                runs[direction] = None  # ended
                return
            s, logits = item
            if logits is None:
                return  # waiting at its gate
            if not ok(s):
                held[direction] = (s, logits)
                return
            taken[direction] = s
            yield s, logits

    # 1. Each run over the slices nearer its own key slice.
    yield from advance(+1, lambda s: span.owner(s) > 0)
    yield from advance(-1, lambda s: span.owner(s) < 0)
    # 2. A run that ended early leaves its slices to the other run, as far as that one reaches.
    f_end = taken.get(+1, span.lo - 1)
    b_end = taken.get(-1, span.hi + 1)
    yield from advance(+1, lambda s: s < b_end)
    yield from advance(-1, lambda s: s > f_end)
