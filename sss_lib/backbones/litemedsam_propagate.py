"""Carried 2D propagation of one class through a slice stack (the MedSAM 3D recipe, with a stop).

A key slice is decoded from its own prompts (:func:`segment_key_slice`). From it, a run
(:func:`carry_run`) prompts each next slice with the (slightly enlarged) box of the previous slice's
mask, until the :class:`~.litemedsam_stop.StopRule` says the object has ended or the run reaches
the edge of its span (the next key slice or "not on this slice" marker, or the stack's end). Which
run a slice's result comes from is decided by :func:`.spans.resolve_span`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from ..prompts import SlicePrompt
from .base import EmbeddingLookup
from .spans import Gate, KeySlice, Run, Span
from .litemedsam_stop import StopRule, observe

log = logging.getLogger(__name__)

# decode(embedding, box XYXY, positive XY points, negative XY points) -> object with
# ``logits`` ((H, W) float32) and ``iou_pred`` (float).
Decoder = Callable[[Any, Sequence[float], Sequence[tuple[float, float]], Sequence[tuple[float, float]]], Any]


def carried_box(mask: np.ndarray, margin_fraction: float, margin_px: float) -> tuple[float, float, float, float]:
    """The tight XYXY box of a non-empty ``(H, W)`` mask, enlarged by ``max(margin_px, fraction *
    side)`` on each side and clipped to the slice."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
    mx = max(margin_px, margin_fraction * (x1 - x0 + 1))
    my = max(margin_px, margin_fraction * (y1 - y0 + 1))
    h, w = mask.shape
    return (max(0.0, x0 - mx), max(0.0, y0 - my), min(w - 1.0, x1 + mx), min(h - 1.0, y1 + my))


def carried_points(
    mask: np.ndarray,
    pick: Callable[[np.ndarray], tuple[float, float]] | None = None,
    min_hole_px: int = 4,
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """XY points carried with the box from a non-empty ``(H, W)`` mask (opt-in, see
    :attr:`~.litemedsam.LiteMedSamBackbone.carry_points`).

    Positive: the mask's deepest pixel (farthest from its border). Negative: the deepest pixel of
    the largest hole the mask encloses, when that hole has at least ``min_hole_px`` pixels, so a
    ring (the myocardium around the blood pool) stays a ring on the next slice instead of filling
    in. ``pick`` chooses the point of a region (default: its deepest pixel; training draws a random
    deep pixel instead).
    """
    from scipy import ndimage

    from ..pcsw.geometry import deepest_point

    def deepest(region: np.ndarray) -> tuple[float, float]:
        x, y = deepest_point(region, (1.0, 1.0))
        return float(x), float(y)

    choose = pick or deepest
    negative: list[tuple[float, float]] = []
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if np.count_nonzero(holes) >= min_hole_px:
        parts, n = ndimage.label(holes)
        sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
        if sizes.max() >= min_hole_px:
            negative.append(choose(parts == int(np.argmax(sizes)) + 1))
    return [choose(mask)], negative


def segment_key_slice(decode: Decoder, embedding: EmbeddingLookup, index: int,
                      prompts: Sequence[SlicePrompt]) -> np.ndarray:
    """Key slice ``index`` from its own prompts: ``(H, W)`` float32 logits. Several prompts on one
    slice (e.g. two boxes around two parts) are decoded separately and united (max of logits)."""
    decoded = [decode(embedding(index), p.box, p.positive_points, p.negative_points) for p in prompts]
    return np.max([d.logits for d in decoded], axis=0).astype(np.float32, copy=False)


def carry_run(
    decode: Decoder,
    slices: np.ndarray,
    embedding: EmbeddingLookup,
    key: KeySlice,
    direction: int,
    stop: int,
    rule: StopRule,
    carry_points: bool = False,
    gate: Gate | None = None,
) -> Run:
    """The run from ``key`` (its ``logits`` set) towards ``direction`` (+1 up, -1 down), up to but
    not including slice ``stop``: yields ``(slice, (H, W) float32 logits)`` until the stop rule
    ends it. ``slices`` is the preprocessed ``(S, H, W)`` stack (for the rule's intensity
    statistics); ``carry_points``: carried prompts hold :func:`carried_points` as well as the box;
    ``gate`` is asked before each slice is decoded (see :func:`.spans.resolve_span`). An empty
    key mask carries nothing."""
    assert key.logits is not None, "decode the key slice first"
    k = key.index
    prev_mask = key.logits > 0
    key_obs = observe(prev_mask, 1.0, slices[k], None, None)
    prev_obs = key_obs
    if key_obs.area == 0:
        log.info("empty mask on key slice %d, nothing to carry", k)
        return
    for s in range(k + direction, stop, direction):
        if gate is not None:
            yield from gate.wait(s)
        box = carried_box(prev_mask, rule.box_margin_fraction, rule.box_margin_px)
        pos, neg = carried_points(prev_mask) if carry_points else ([], [])
        cur = decode(embedding(s), box, pos, neg)
        mask = cur.logits > 0
        obs = observe(mask, cur.iou_pred, slices[s], prev_mask, box)
        reason = rule.stop_reason(key_obs, prev_obs, obs)
        if reason is not None:
            log.debug("run from key slice %d stops at slice %d (going %+d): %s", k, s, direction, reason)
            return
        yield s, cur.logits
        prev_mask, prev_obs = mask, obs


def interpolated_boxes(span: "Span") -> dict[int, tuple[float, float, float, float]] | None:
    """XYXY boxes for the slices of ``span`` interpolated linearly between its two key slices' boxes
    (MedSAM's own recipe between annotated slices), or None where that does not apply: a span
    without a key slice on both sides, or a key slice whose prompt is not a single box."""
    if span.below is None or span.above is None:
        return None
    ends = []
    for key in (span.below, span.above):
        if len(key.prompts) != 1 or key.prompts[0].box is None:
            return None
        ends.append(np.asarray(key.prompts[0].box, dtype=np.float64))
    a, b = span.below.index, span.above.index
    return {s: tuple(float(v) for v in ends[0] + (ends[1] - ends[0]) * (s - a) / (b - a)) for s in span.slices()}


def interpolated_run(decode: Decoder, embedding: EmbeddingLookup,
                     boxes: dict[int, tuple[float, float, float, float]]) -> Run:
    """Each slice decoded from its interpolated box (:func:`interpolated_boxes`), in slice order."""
    for s in sorted(boxes):
        yield s, decode(embedding(s), boxes[s], [], []).logits
