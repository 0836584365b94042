"""The teacher's prompts on every slice of an unlabeled volume (SSS_METHOD.md section 4).

PCSW (section 2) picks one key slice per class; training works on single slices, so the teacher
needs a prompt on whichever slice it pseudo-labels. **(ours)** With PCSW on, the structure PCSW
accepted (the whole-stack 26-connected component of ``P_c > threshold`` that holds PCSW's positive
point) is prompted on each slice it covers the way PCSW prompts its key slice (steps 6-7: tight
box plus margin, the deepest pixel as positive point, one negative point per other class inside
the box). A class PCSW did not accept ("fallback") gets no prompt.

**(ours)** Pixels the prompts cannot vouch for are *untrusted* (left out of the consistency
loss): a class without a prompt on a slice decodes to nothing, so without this rule every pixel
of a structure the teacher missed would be a confident "background" and the student would be
taught to miss it too. A pixel is untrusted where the teacher's coarse head gives a class at least
``untrusted_floor`` (default 0.05 = 1 - the default confidence) and that class has no prompt on
the slice, or the pixel lies outside the class's prompt box.

With PCSW off (the ``--no-pcsw`` ablation), each class gets, on each slice where the coarse mask
holds it, the box of that slice's coarse mask (plus the margin) and no points; the same
untrusted rule applies.

Pure numpy/scipy. Probability stacks are ``(S, H, W)`` along the slice axis; boxes are XYXY with
inclusive corners and points XY, in slice pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage

from ..pcsw import PcswConfig, run_pcsw
from ..pcsw.geometry import deepest_point, tight_box

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclasses.dataclass
class ClassPrompt:
    """One class's prompt on one slice."""

    box: Box
    positive: list[Point]
    negative: list[Point]


@dataclasses.dataclass
class SlicePlan:
    """The teacher's decision for one slice.

    Attributes:
        prompts: class label -> prompt (classes without a prompt are absent on this slice).
        untrusted: ``(H, W)`` bool, pixels the teacher cannot vouch for (see the module docstring).
    """

    prompts: dict[int, ClassPrompt]
    untrusted: np.ndarray


def _structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])


def _box_mask(box: tuple[int, int, int, int] | tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside = np.zeros(shape, bool)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    return inside


def _negatives(box: tuple[int, int, int, int], own: np.ndarray, others: Iterable[np.ndarray],
               min_pixels: int, spacing_xy: tuple[float, float]) -> list[Point]:
    x0, y0, x1, y1 = box
    points: list[Point] = []
    for other in others:
        inside = other[y0:y1 + 1, x0:x1 + 1] & ~own[y0:y1 + 1, x0:x1 + 1]
        if np.count_nonzero(inside) >= min_pixels:
            x, y = deepest_point(inside, spacing_xy)
            points.append((float(x + x0), float(y + y0)))
    return points


def pcsw_slice_plans(
    probabilities: Mapping[int, np.ndarray],
    slices: Iterable[int],
    *,
    in_plane_spacing: tuple[float, float],
    slice_spacing: float,
    class_ranges: Mapping[int, tuple[float, float]] | None = None,
    config: PcswConfig | None = None,
    untrusted_floor: float = 0.05,
) -> dict[int, SlicePlan]:
    """Teacher prompts with PCSW on the requested ``slices`` of one volume.

    Args:
        probabilities: class label -> ``(S, H, W)`` coarse probabilities of the whole volume.
        slices: the slice indices to plan.
        in_plane_spacing: ``(sx, sy)`` mm; ``slice_spacing``: mm between slices.
        class_ranges: label -> ``(min_mm3, max_mm3)`` for PCSW's volume check.
        config: PCSW settings.
        untrusted_floor: see the module docstring.

    Returns:
        slice index -> :class:`SlicePlan`.
    """
    cfg = config or PcswConfig()
    labels = sorted(int(k) for k in probabilities)
    wanted = sorted({int(s) for s in slices})
    fg = {lbl: np.asarray(probabilities[lbl]) > cfg.threshold for lbl in labels}
    shape = next(iter(fg.values())).shape
    results = run_pcsw(probabilities, in_plane_spacing=in_plane_spacing, slice_spacing=slice_spacing,
                       class_ranges=class_ranges, config=cfg)
    structures: dict[int, np.ndarray] = {}
    for lbl in labels:
        res = results[lbl]
        if res.status != "ok" or res.prompt is None or not res.prompt.positive_points:
            continue
        comps, _ = ndimage.label(fg[lbl], structure=_structure(cfg.connectivity))
        x, y = res.prompt.positive_points[0]
        which = comps[res.prompt.key_slice, int(round(y)), int(round(x))]
        if which:
            structures[lbl] = comps == which

    plans: dict[int, SlicePlan] = {}
    for s in wanted:
        untrusted = np.zeros(shape[1:], bool)
        prompts: dict[int, ClassPrompt] = {}
        for lbl in labels:
            some = np.asarray(probabilities[lbl])[s] >= untrusted_floor
            structure = structures.get(lbl)
            own = structure[s] if structure is not None else None
            if own is None or not own.any():
                untrusted |= some
                continue
            box = tight_box(own, cfg.box_margin_px)
            untrusted |= some & ~_box_mask(box, own.shape)
            others = [fg[o][s] for o in labels if o != lbl]
            prompts[lbl] = ClassPrompt(
                tuple(float(v) for v in box),  # type: ignore[arg-type]
                [tuple(float(v) for v in deepest_point(own, in_plane_spacing))],  # type: ignore[list-item]
                _negatives(box, own, others, cfg.negative_min_pixels, in_plane_spacing),
            )
        plans[s] = SlicePlan(prompts, untrusted)
    return plans


def box_slice_plans(probabilities: Mapping[int, np.ndarray], slices: Iterable[int], *,
                    config: PcswConfig | None = None, untrusted_floor: float = 0.05) -> dict[int, SlicePlan]:
    """Teacher prompts without PCSW: per slice and class, the coarse mask's box (plus PCSW's
    margin) and no points. Same arguments and result as :func:`pcsw_slice_plans`."""
    cfg = config or PcswConfig()
    plans: dict[int, SlicePlan] = {}
    for s in sorted({int(v) for v in slices}):
        prompts: dict[int, ClassPrompt] = {}
        untrusted: np.ndarray | None = None
        for lbl in sorted(int(k) for k in probabilities):
            prob = np.asarray(probabilities[lbl])[s]
            if untrusted is None:
                untrusted = np.zeros(prob.shape, bool)
            own = prob > cfg.threshold
            some = prob >= untrusted_floor
            if not own.any():
                untrusted |= some
                continue
            box = tight_box(own, cfg.box_margin_px)
            untrusted |= some & ~_box_mask(box, own.shape)
            prompts[lbl] = ClassPrompt(tuple(float(v) for v in box), [], [])  # type: ignore[arg-type]
        assert untrusted is not None
        plans[s] = SlicePlan(prompts, untrusted)
    return plans
