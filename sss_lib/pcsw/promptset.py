"""A :class:`sss_lib.prompts.PromptSet` from PCSW that keeps the prompts a person made."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import PromptError
from ..prompts import ClassPrompts, PromptSet
from ..volume import SliceAxis
from .config import PcswConfig
from .generator import PcswResult, run_pcsw

_AXES = "ijk"
# Distinct, saturated colours for classes without one (RGB 0-255).
_PALETTE = [(230, 80, 60), (60, 160, 230), (250, 200, 40), (120, 200, 90), (180, 100, 220),
            (240, 140, 40), (60, 200, 190), (230, 90, 160), (150, 150, 60), (100, 110, 240)]


def default_color(label: int) -> tuple[int, int, int]:
    """A colour for a class that has none, stable per label."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def pcsw_prompt_set(
    probabilities: Mapping[int, np.ndarray],
    *,
    slice_axis: SliceAxis,
    in_plane_spacing: tuple[float, float],
    slice_spacing: float,
    names: Mapping[int, str] | None = None,
    colors: Mapping[int, tuple[int, int, int]] | None = None,
    class_ranges: Mapping[int, tuple[float, float]] | None = None,
    config: PcswConfig | None = None,
    previous: PromptSet | None = None,
) -> tuple[PromptSet, dict[int, PcswResult]]:
    """PCSW prompts of every class as a prompt set, keeping the user's classes from ``previous``.

    Args:
        probabilities: label -> ``(S, H, W)`` probabilities along ``slice_axis``.
        slice_axis: the axis the stacks were taken along (the prompt set's axis).
        in_plane_spacing, slice_spacing: for a volume ``v``, ``v.in_plane_spacing(slice_axis)``
            and ``v.spacing[slice_axis.axis]``.
        names, colors: per label; missing ones come from ``previous``, then a default.
        class_ranges: label -> ``(min_mm3, max_mm3)`` (see :func:`measure_class_ranges`).
        previous: the prompt set of an earlier run. A class holding any prompt with
            ``source == "user"`` is kept exactly as it was (all its prompts) and PCSW does not
            run for it; other classes are regenerated.

    Returns:
        ``(prompt_set, results)``: the set holds the kept user classes and every class PCSW
        prompted (``"ok"`` or ``"fallback"``), sorted by label; absent classes are left out.
        ``results`` holds a :class:`PcswResult` for each class PCSW ran on (not the kept ones).

    Raises:
        PromptError: ``previous`` lies on another slice axis (its points would not fit).
    """
    kept: dict[int, ClassPrompts] = {}
    old: dict[int, ClassPrompts] = {}
    if previous is not None:
        if previous.slice_axis.axis != slice_axis.axis:
            raise PromptError(
                f"the previous prompts lie on slice axis {_AXES[previous.slice_axis.axis]}, these on "
                f"{_AXES[slice_axis.axis]}; run PCSW along {_AXES[previous.slice_axis.axis]} or drop the old prompts"
            )
        old = previous.by_label()
        kept = {lbl: c for lbl, c in old.items() if any(p.source == "user" for p in c.prompts)}
    names = names or {}
    colors = colors or {}

    todo = [int(k) for k in probabilities if int(k) not in kept]
    # Every map, kept classes' included, still gives negative points to the classes prompted.
    results = run_pcsw(probabilities, in_plane_spacing=in_plane_spacing, slice_spacing=slice_spacing,
                       class_ranges=class_ranges, config=config, only=todo) if todo else {}

    classes = dict(kept)
    for label, res in results.items():
        if res.prompt is None:
            continue
        before = old.get(label)
        name = names.get(label) or (before.name if before else f"class {label}")
        color = colors.get(label) or (before.color if before else default_color(label))
        classes[label] = ClassPrompts(label, name, [res.prompt], tuple(int(c) for c in color))
    return PromptSet(slice_axis, [classes[k] for k in sorted(classes)]), results
