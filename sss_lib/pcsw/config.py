"""PCSW settings and the window-length rule (SSS_METHOD.md section 2, steps 2 and 4)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class PcswConfig:
    """Settings of the PCSW prompt generator.

    Attributes:
        threshold: a voxel is foreground when its probability is strictly above this (step 1;
            ``> 0.5`` is SAM-2's ``logit > 0``).
        tau: minimum continuity C of the chosen window (paper: 0.8). Must be >= 0.5 so that a
            confidence below 0.5 always means a fallback prompt.
        min_slices: the component must span at least this many consecutive slices.
        max_area_ratio: **(ours)** largest allowed ratio r between the areas of adjacent slices.
        max_centroid_shift_mm: **(ours)** largest allowed in-plane move d of the component's
            centroid between adjacent slices. Default 10 mm: the in-plane shift of a structure
            that runs at 45 degrees to 10 mm slices (ACDC's thickest), well above the few mm that
            organs and lesions move on 1-5 mm CT slices.
        volume_margin: **(ours)** the physical volume range ``[lo, hi]`` of a class is widened to
            ``[lo * (1 - m), hi * (1 + m)]`` (0.5 = +-50%).
        box_margin_px: pixels added on every side of the tight box on the key slice.
        window_min_fraction / window_max_fraction / min_window: window lengths run from
            ``ceil(S * min_fraction)`` to ``floor(S * max_fraction)``, at least ``min_window``
            (paper: S/3 to S/2, at least 2); see :func:`window_lengths`.
        connectivity: 3D connectivity of components (26 as specified; 18 and 6 for experiments).
        negative_min_pixels: **(ours)** another class needs at least this many pixels inside the
            box (outside this class's component) to give a negative point.
        fallback_confidence_scale: a fallback prompt's confidence is this times the share of its
            slice's foreground that the prompted 2D component holds; must be < 0.5.
    """

    threshold: float = 0.5
    tau: float = 0.8
    min_slices: int = 2
    max_area_ratio: float = 3.0
    max_centroid_shift_mm: float = 10.0
    volume_margin: float = 0.5
    box_margin_px: int = 3
    window_min_fraction: float = 1 / 3
    window_max_fraction: float = 1 / 2
    min_window: int = 2
    connectivity: int = 26
    negative_min_pixels: int = 1
    fallback_confidence_scale: float = 0.49

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.threshold < 1.0, "threshold must lie in [0, 1)"),
            (0.5 <= self.tau <= 1.0, "tau must lie in [0.5, 1]"),
            (self.min_slices >= 1, "min_slices must be >= 1"),
            (self.max_area_ratio >= 1.0, "max_area_ratio must be >= 1"),
            (self.max_centroid_shift_mm > 0, "max_centroid_shift_mm must be > 0"),
            (self.volume_margin >= 0, "volume_margin must be >= 0"),
            (self.box_margin_px >= 0, "box_margin_px must be >= 0"),
            (0 < self.window_min_fraction <= self.window_max_fraction <= 1,
             "window fractions must satisfy 0 < min <= max <= 1"),
            (self.min_window >= 1, "min_window must be >= 1"),
            (self.connectivity in (6, 18, 26), "connectivity must be 6, 18 or 26"),
            (self.negative_min_pixels >= 1, "negative_min_pixels must be >= 1"),
            (0 <= self.fallback_confidence_scale < 0.5, "fallback_confidence_scale must lie in [0, 0.5)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PcswConfig: {message}")


def window_lengths(n_slices: int, config: PcswConfig | None = None) -> list[int]:
    """Window lengths in the order PCSW tries them: the middle length first, then outwards.

    Lengths run from ``max(min_window, ceil(S/3))`` to ``max(that, floor(S/2))``, capped at ``S``.
    The middle is ``(lo + hi) // 2``; after it come ``mid + 1, mid - 1, mid + 2, ...`` (**ours**:
    on a tie the longer window goes first, as it sees more of the structure). Empty when
    ``S < min_window`` (no window fits).

    Example: ``S = 100`` gives lengths 34..50 tried as ``42, 43, 41, 44, 40, ...``.
    """
    cfg = config or PcswConfig()
    # The small epsilon keeps S * (1/3) from landing a hair above an integer (ceil would add 1).
    lo = max(cfg.min_window, math.ceil(n_slices * cfg.window_min_fraction - 1e-9))
    hi = min(n_slices, max(lo, math.floor(n_slices * cfg.window_max_fraction + 1e-9)))
    if lo > hi:
        return []
    mid = (lo + hi) // 2
    return sorted(range(lo, hi + 1), key=lambda n: (abs(n - mid), -n))
