"""Rings and nested classes (**ours**): a box around a ring segments the filled disc.

The myocardium is a ring around the LV cavity. Prompted with a box, SAM-2 and LiteMedSAM segment
what the box frames, the filled disc, and the LV's box frames nearly the same disc; where the two
masks overlap the highest logit wins, and the ring vanishes into the cavity or covers it. A box
cannot say "the ring, not its inside"; the coarse head, which labels every pixel, can.

* :func:`measure_nesting`, at training time: class ``o`` *encloses* class ``i`` when, over the
  labeled slices that hold both, at least ``min_share`` of ``i``'s pixels lie in the holes of
  ``o`` (inside ``o``'s ring, not on it). The result, ``{outer: (inner, ...)}``, is stored in the
  task model (:attr:`sss_lib.task_model.TaskModel.nesting`); for ACDC-like labels it is
  ``{Myo: (LV,)}``.
* :func:`apply_ring_rule`, in Auto-segment: on each slice, the union of an outer class and its
  inner classes in the propagated label map (the disc: the epicardium, which boxes find well) is
  kept, and split again by the coarse head (its argmax gives the inner classes; the rest of the
  disc is the ring), but only on slices where the boxes' answer has lost the ring: the outer
  class covers most of the coarse head's cavity (the disc filled) or an inner class covers most
  of the coarse head's ring (the cavity won the overlap). Elsewhere the decoders' finer boundaries
  stay as they are.

Shapes: label stacks and probabilities are ``(S, H, W)`` along the slice axis.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

Nesting = dict[int, tuple[int, ...]]


def measure_nesting(stacks: Sequence[np.ndarray], labels: Iterable[int], *, min_share: float = 0.9,
                    min_pixels: int = 20) -> Nesting:
    """``{outer: (inner, ...)}`` for the classes that enclose others in the labeled slices.

    Args:
        stacks: integer label stacks ``(S, H, W)`` (slices along the slice axis).
        labels: the classes to test (every ordered pair).
        min_share: the share of the inner class's pixels (on slices with both) that must lie in
            the outer class's holes.
        min_pixels: a pair needs at least this many inner pixels in total to be judged.
    """
    labels = [int(v) for v in labels]
    inside = {(o, i): 0 for o in labels for i in labels if o != i}
    total = dict.fromkeys(inside, 0)
    for stack in stacks:
        stack = np.asarray(stack)
        if stack.ndim != 3:
            raise ValueError(f"label stacks must be (S, H, W), got shape {stack.shape}")
        for s in range(stack.shape[0]):
            present = [lbl for lbl in labels if np.any(stack[s] == lbl)]
            holes = {o: ndimage.binary_fill_holes(stack[s] == o) & (stack[s] != o) for o in present}
            for o in present:
                for i in present:
                    if o == i:
                        continue
                    mask = stack[s] == i
                    total[(o, i)] += int(mask.sum())
                    inside[(o, i)] += int((mask & holes[o]).sum())
    nesting: dict[int, list[int]] = {}
    for (o, i), n in total.items():
        if n >= min_pixels and inside[(o, i)] >= min_share * n:
            nesting.setdefault(o, []).append(i)
    return {o: tuple(sorted(v)) for o, v in sorted(nesting.items())}


def coarse_argmax(probabilities: Mapping[int, np.ndarray], slice_index: int) -> np.ndarray:
    """The coarse head's label on one slice, ``(H, W)`` with class labels (0 = background, what
    the classes' probabilities leave)."""
    order = sorted(probabilities)
    stack = np.stack([probabilities[lbl][slice_index] for lbl in order])
    background = 1.0 - stack.sum(axis=0, keepdims=True)
    channel = np.concatenate([background, stack]).argmax(axis=0)
    return np.asarray([0] + order)[channel]


def apply_ring_rule(labels: np.ndarray, probabilities: Mapping[int, np.ndarray], nesting: Mapping[int, Sequence[int]],
                    classes: Iterable[int], *, lost_share: float = 0.5, min_pixels: int = 4) -> dict[int, list[int]]:
    """Restore rings the boxes filled, in place (see the module docstring).

    Args:
        labels: the propagated label stack ``(S, H, W)``, changed in place.
        probabilities: label -> coarse probabilities ``(S, H, W)``.
        nesting: ``{outer: inner classes}`` (:func:`measure_nesting`).
        classes: the classes the rule may change (the automatically prompted ones); a nest is
            handled only when its outer class and every inner class are among them.
        lost_share: the ring counts as lost on a slice when the outer class covers more than this
            share of the coarse head's inner pixels, or the inner classes more than this share of
            its ring pixels.
        min_pixels: slices where the coarse head has fewer inner pixels than this are left alone.

    Returns:
        outer label -> the slices rebuilt.
    """
    allowed = {int(c) for c in classes}
    changed: dict[int, list[int]] = {}
    for outer, inners in nesting.items():
        inners = tuple(int(i) for i in inners)
        if outer not in allowed or not inners or not set(inners) <= allowed:
            continue
        if outer not in probabilities or any(i not in probabilities for i in inners):
            continue
        for s in range(labels.shape[0]):
            here = labels[s]
            ring = here == outer
            inner = np.isin(here, inners)
            disc = ring | inner
            if not disc.any():
                continue
            coarse = coarse_argmax(probabilities, s)
            c_inner = np.isin(coarse, inners) & disc
            c_ring = (coarse == outer) & disc
            n_inner, n_ring = int(c_inner.sum()), int(c_ring.sum())
            if n_inner < min_pixels:
                continue
            filled = np.count_nonzero(ring & c_inner) > lost_share * n_inner
            eaten = n_ring > 0 and np.count_nonzero(inner & c_ring) > lost_share * n_ring
            if not (filled or eaten):
                continue
            here[disc] = outer
            here[c_inner] = coarse[c_inner]
            changed.setdefault(outer, []).append(s)
    for outer, slices in changed.items():
        log.info("class %d: ring rebuilt from the coarse head on slice(s) %s (the boxes filled it)", outer, slices)
    return changed
