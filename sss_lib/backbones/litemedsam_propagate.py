"""Carried 2D propagation of one class through a slice stack (the MedSAM 3D recipe, with a stop).

From each key slice the class is decoded from its prompts; then, forward and backward, each next
slice is prompted with the (slightly enlarged) box of the previous slice's mask, until the
:class:`~.litemedsam_stop.StopRule` says the object has ended, the stack ends, or the next key
slice of the same class is reached (that key slice's own prompt takes over from there).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..prompts import SlicePrompt
from .base import EmbeddingLookup, PropagationStep
from .litemedsam_stop import SliceObservation, StopRule, observe

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


def _key_prompts(prompts: list[SlicePrompt]) -> dict[int, list[SlicePrompt]]:
    """Key slice -> its prompts; where a slice has user prompts, auto ones there are ignored."""
    by_slice: dict[int, list[SlicePrompt]] = {}
    for p in prompts:
        by_slice.setdefault(p.key_slice, []).append(p)
    for k, ps in by_slice.items():
        users = [p for p in ps if p.source == "user"]
        by_slice[k] = users or ps
    return dict(sorted(by_slice.items()))


def propagate_class(
    decode: Decoder,
    slices: np.ndarray,
    embedding: EmbeddingLookup,
    label: int,
    prompts: list[SlicePrompt],
    rule: StopRule,
    carry_points: bool = False,
) -> Iterator[PropagationStep]:
    """Yield one :class:`PropagationStep` (this ``label`` only) per slice the class reaches.

    ``slices`` is the preprocessed ``(S, H, W)`` stack (for the rule's intensity statistics).
    ``carry_points``: carried prompts hold :func:`carried_points` as well as the box.
    Several prompts on one key slice (e.g. two boxes around two parts) are decoded separately and
    united (max of logits). Between two key slices both runs go on; a slice's logits come from the
    nearer key slice (a slice is yielded again only when a nearer run reaches it).
    """
    n = slices.shape[0]
    by_slice = _key_prompts(prompts)
    keys = list(by_slice)
    distance: dict[int, int] = {}  # slice -> distance to the key slice of its yielded logits

    start: dict[int, tuple[np.ndarray, SliceObservation]] = {}
    for k, ps in by_slice.items():
        decoded = [decode(embedding(k), p.box, p.positive_points, p.negative_points) for p in ps]
        logits = np.max([d.logits for d in decoded], axis=0)
        score = min(d.iou_pred for d in decoded)
        obs = observe(logits > 0, score, slices[k], None, None)
        start[k] = (logits > 0, obs)
        distance[k] = 0
        log.debug("class %d key slice %d: area %d px, IoU score %.2f", label, k, obs.area, obs.iou_pred)
        yield PropagationStep(k, {label: logits})

    for direction in (+1, -1):
        for idx, k in enumerate(keys):
            nxt = idx + direction
            limit = keys[nxt] if 0 <= nxt < len(keys) else (n if direction > 0 else -1)
            prev_mask, key_obs = start[k]
            prev_obs = key_obs
            if key_obs.area == 0:
                log.info("class %d: empty mask on key slice %d, nothing to carry", label, k)
                continue
            for s in range(k + direction, limit, direction):
                box = carried_box(prev_mask, rule.box_margin_fraction, rule.box_margin_px)
                pos, neg = carried_points(prev_mask) if carry_points else ([], [])
                cur = decode(embedding(s), box, pos, neg)
                mask = cur.logits > 0
                obs = observe(mask, cur.iou_pred, slices[s], prev_mask, box)
                reason = rule.stop_reason(key_obs, prev_obs, obs)
                if reason is not None:
                    log.debug("class %d stops at slice %d (going %+d): %s", label, s, direction, reason)
                    break
                if abs(s - k) < distance.get(s, n + 1):
                    distance[s] = abs(s - k)
                    yield PropagationStep(s, {label: cur.logits})
                prev_mask, prev_obs = mask, obs
