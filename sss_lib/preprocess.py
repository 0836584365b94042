"""Intensity preprocessing of a slice stack (SSS_METHOD.md section 1).

CT is windowed (default [-1000, 1000] HU, or the task's window); MR (or anything that is not CT) is
clipped to its 0.5-99.5 percentiles over the whole volume. Both end scaled to ``[0, 1]`` float32.
Resizing to the network's input size and ImageNet normalisation belong to the backbone.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import numpy as np

Modality = Literal["auto", "CT", "MR", "other"]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How intensities become ``[0, 1]``.

    Attributes:
        modality: "CT" windows in HU; "MR"/"other" use percentiles; "auto" decides from the values
            (see :func:`guess_modality`).
        window: ``(low, high)`` HU for CT.
        percentiles: ``(low, high)`` for MR/other.
    """

    modality: Modality = "auto"
    window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    def key(self) -> str:
        """A stable string for cache keys."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def guess_modality(voxels: np.ndarray) -> Literal["CT", "MR"]:
    """CT if the values look like Hounsfield units (air near -1000 present), else MR."""
    lo = float(np.percentile(voxels, 1))
    return "CT" if lo < -500 and float(voxels.min()) >= -3100 else "MR"


def intensity_range(voxels: np.ndarray, prep: Preprocessing) -> tuple[float, float]:
    """The ``(low, high)`` intensities that map to 0 and 1 for this volume."""
    modality = guess_modality(voxels) if prep.modality == "auto" else prep.modality
    if modality == "CT":
        return float(prep.window[0]), float(prep.window[1])
    lo, hi = np.percentile(voxels, prep.percentiles)
    return float(lo), float(hi)


def normalise_stack(stack: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``(S, H, W)`` intensities to ``[0, 1]`` float32 (a constant volume maps to zeros)."""
    scale = high - low
    out = np.asarray(stack, dtype=np.float32) - np.float32(low)
    if scale <= 0:
        return np.zeros_like(out)
    out /= np.float32(scale)
    np.clip(out, 0.0, 1.0, out=out)
    return out
