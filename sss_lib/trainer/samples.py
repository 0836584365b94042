"""Prompts made from a label map, the way PCSW and the engine will make them at run time.

Two kinds, both in slice pixels (XYXY boxes with inclusive corners, ``(x, y)`` points):

* **key** prompts, as PCSW makes them on a key slice (SSS_METHOD.md section 2, step 7): the
  class's tight box plus PCSW's margin, each side jittered; a positive point deep inside the class
  (a random pixel at least ``point_depth_fraction`` of the maximum depth from the border, so the
  myocardium's point lies in its wall); one negative point deep inside each other class that shows
  inside the box. Negatives are dropped now and then, as a user may not give any.
* **carried** prompts, as a 2D backbone makes them while propagating (LiteMedSAM): the box of the
  class's mask on the adjacent slice, enlarged like the propagation's carried box; the target is
  this slice's mask, which is empty where the structure has ended, so the decoder learns to answer
  "nothing" and the stop rule sees the object vanish.

Pure numpy/scipy. Label maps are ``(H, W)`` integer arrays indexed ``[y, x]``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..pcsw.geometry import tight_box

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class PromptJitter:
    """How prompts are drawn from labels.

    Attributes:
        box_margin_px: margin of a key box (PCSW's ``box_margin_px``).
        box_jitter_fraction: each side of a key box moves by a normal draw with this standard
            deviation, as a fraction of the box side (coarse-head boxes are a few pixels off).
        point_depth_fraction: points are drawn among the pixels at least this fraction of the
            region's maximum depth (1.0 = always the deepest pixel, as PCSW picks it).
        drop_negatives: probability of a key prompt without negative points.
        carry_margin_fraction / carry_margin_px: margin of a carried box, ``max(px, fraction * side)``
            per side (the LiteMedSAM propagation's :class:`~sss_lib.backbones.litemedsam_stop.StopRule`
            defaults).
        carry_jitter_px: standard deviation of each carried-box side's shift, in pixels.
    """

    box_margin_px: int = 3
    box_jitter_fraction: float = 0.08
    point_depth_fraction: float = 0.6
    drop_negatives: float = 0.2
    carry_margin_fraction: float = 0.1
    carry_margin_px: float = 2.0
    carry_jitter_px: float = 1.0


@dataclasses.dataclass
class PromptSample:
    """One decoder training sample: a prompt on ``slice_index`` and the target mask there."""

    case_index: int
    slice_index: int
    label: int
    box: Box | None
    positive: list[Point]
    negative: list[Point]
    target: np.ndarray  # (H, W) bool
    kind: str  # "key" or "carried"


def _clip_box(box: Sequence[float], shape_hw: tuple[int, int]) -> Box:
    h, w = shape_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), w - 1.0), min(max(x1, 0.0), w - 1.0)))
    y0, y1 = sorted((min(max(y0, 0.0), h - 1.0), min(max(y1, 0.0), h - 1.0)))
    return (x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0))


def deep_point(mask: np.ndarray, rng: np.random.Generator, depth_fraction: float,
               spacing_xy: tuple[float, float] = (1.0, 1.0)) -> Point:
    """A random ``(x, y)`` pixel of a non-empty mask at least ``depth_fraction`` of its maximum
    depth (distance to the border, in mm) from the border."""
    sx, sy = spacing_xy
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=(sy, sx))[1:-1, 1:-1]
    ys, xs = np.nonzero(depth >= depth.max() * min(max(depth_fraction, 0.0), 1.0) - 1e-9)
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def key_prompt(labels: np.ndarray, label: int, rng: np.random.Generator, jitter: PromptJitter,
               spacing_xy: tuple[float, float] = (1.0, 1.0)) -> tuple[Box, list[Point], list[Point]]:
    """A PCSW-like prompt for ``label`` on a label slice ``(H, W)`` where it is present."""
    own = labels == label
    x0, y0, x1, y1 = tight_box(own, jitter.box_margin_px)
    sw, sh = x1 - x0 + 1, y1 - y0 + 1
    shift = rng.normal(0.0, jitter.box_jitter_fraction, 4) * np.array([sw, sh, sw, sh])
    box = _clip_box((x0 + shift[0], y0 + shift[1], x1 + shift[2], y1 + shift[3]), labels.shape)
    positive = [deep_point(own, rng, jitter.point_depth_fraction, spacing_xy)]
    negative: list[Point] = []
    if rng.random() >= jitter.drop_negatives:
        bx0, by0, bx1, by1 = (int(round(v)) for v in box)
        window = labels[by0:by1 + 1, bx0:bx1 + 1]
        for other in np.unique(window):
            if other <= 0 or other == label:  # background, or voxels nobody labeled
                continue
            region = window == other
            px, py = deep_point(region, rng, jitter.point_depth_fraction, spacing_xy)
            negative.append((px + bx0, py + by0))
    return box, positive, negative


def carried_box(previous: np.ndarray, rng: np.random.Generator, jitter: PromptJitter) -> Box:
    """The box a 2D propagation carries from the previous slice's non-empty ``(H, W)`` mask."""
    x0, y0, x1, y1 = (float(v) for v in tight_box(previous, 0))
    mx = max(jitter.carry_margin_px, jitter.carry_margin_fraction * (x1 - x0 + 1))
    my = max(jitter.carry_margin_px, jitter.carry_margin_fraction * (y1 - y0 + 1))
    shift = rng.normal(0.0, jitter.carry_jitter_px, 4)
    return _clip_box((x0 - mx + shift[0], y0 - my + shift[1], x1 + mx + shift[2], y1 + my + shift[3]),
                     previous.shape)


def carried_points(previous: np.ndarray, rng: np.random.Generator,
                   depth_fraction: float) -> tuple[list[Point], list[Point]]:
    """The points a 2D propagation carries with the box
    (:func:`sss_lib.backbones.litemedsam_propagate.carried_points`), each drawn among the region's
    deep pixels instead of taken at the deepest one: at run time they come from a predicted mask."""
    from ..backbones.litemedsam_propagate import carried_points as carry

    return carry(previous, pick=lambda region: deep_point(region, rng, depth_fraction))


@dataclasses.dataclass
class ClassIndex:
    """Where each class is present in the training stacks: ``(case, slice)`` pairs per label."""

    present: dict[int, list[tuple[int, int]]]
    #: label -> ``(case, slice, next slice)`` where the class is on ``slice`` but not on ``next slice``.
    ends: dict[int, list[tuple[int, int, int]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, stacks: Sequence[np.ndarray], labels: Sequence[int]) -> "ClassIndex":
        present: dict[int, list[tuple[int, int]]] = {int(lbl): [] for lbl in labels}
        ends: dict[int, list[tuple[int, int, int]]] = {int(lbl): [] for lbl in labels}
        for c, stack in enumerate(stacks):
            on = {lbl: [bool((stack[s] == lbl).any()) for s in range(stack.shape[0])] for lbl in present}
            for lbl, flags in on.items():
                for s, here in enumerate(flags):
                    if not here:
                        continue
                    present[lbl].append((c, s))
                    ends[lbl] += [(c, s, t) for t in (s - 1, s + 1) if 0 <= t < len(flags) and not flags[t]]
        return cls(present, ends)


def draw_samples(stacks: Sequence[np.ndarray], index: ClassIndex, n: int, rng: np.random.Generator,
                 jitter: PromptJitter, *, carry_fraction: float, carry_points: bool = False,
                 ended_fraction: float = 0.0,
                 spacings_xy: Sequence[tuple[float, float]]) -> list[PromptSample]:
    """``n`` decoder samples, classes drawn uniformly, then a slice where the class is present.

    With probability ``carry_fraction`` a sample is a carried prompt from that slice onto a
    neighbour inside the stack (with :func:`carried_points` when ``carry_points``); a share
    ``ended_fraction`` of those starts from a slice next to the end of the structure and steps
    past it, so the decoder sees enough slices where the right answer is "nothing". Otherwise the
    sample is a key prompt.
    """
    labels = [lbl for lbl, where in index.present.items() if where]
    if not labels:
        raise ValueError("no class is present in any training slice")
    out: list[PromptSample] = []
    for _ in range(n):
        label = labels[int(rng.integers(len(labels)))]
        c, s = index.present[label][int(rng.integers(len(index.present[label])))]
        if rng.random() < carry_fraction:
            if index.ends[label] and rng.random() < ended_fraction:
                c, s, t = index.ends[label][int(rng.integers(len(index.ends[label])))]
            else:
                stack = stacks[c]
                neighbours = [t for t in (s - 1, s + 1) if 0 <= t < stack.shape[0]]
                t = neighbours[int(rng.integers(len(neighbours)))] if neighbours else -1
            if t >= 0:
                stack = stacks[c]
                previous = stack[s] == label
                box = carried_box(previous, rng, jitter)
                pos, neg = carried_points(previous, rng, jitter.point_depth_fraction) if carry_points else ([], [])
                out.append(PromptSample(c, t, label, box, pos, neg, stack[t] == label, "carried"))
                continue
        stack = stacks[c]
        box, pos, neg = key_prompt(stack[s], label, rng, jitter, spacings_xy[c])
        out.append(PromptSample(c, s, label, box, pos, neg, stack[s] == label, "key"))
    return out
