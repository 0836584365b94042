"""Prompt geometry on a key slice: the tight box and the deepest pixel of a 2D mask.

Coordinates: masks are ``(H, W)`` arrays indexed ``[y, x]``; points are returned as ``(x, y)``
pixels and boxes as ``(x0, y0, x1, y1)`` with inclusive corners, as :mod:`sss_lib.prompts` uses.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def tight_box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of a non-empty ``(H, W)`` mask, grown by ``margin`` and clipped."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        max(int(cols[0]) - margin, 0),
        max(int(rows[0]) - margin, 0),
        min(int(cols[-1]) + margin, w - 1),
        min(int(rows[-1]) + margin, h - 1),
    )


def deepest_point(mask: np.ndarray, spacing_xy: tuple[float, float]) -> tuple[int, int]:
    """The ``(x, y)`` pixel of a non-empty ``(H, W)`` mask farthest (in mm) from its border.

    Everything outside the array counts as background, so a mask cut by the image edge is not
    deepest at the edge. Ties (a ridge of equal distance) go to the tied pixel nearest the
    mask's centroid, so a symmetric shape gets its centre. The pixel always belongs to the mask,
    which is why it lies inside the wall of a ring, where a box centre would fall in the hole.
    """
    x0, y0, x1, y1 = tight_box(mask, 0)
    crop = np.pad(mask[y0:y1 + 1, x0:x1 + 1], 1)
    sx, sy = spacing_xy
    depth = ndimage.distance_transform_edt(crop, sampling=(sy, sx))
    best = np.argwhere(depth >= depth.max() * (1 - 1e-9))
    if len(best) > 1:
        cy, cx = np.argwhere(crop).mean(axis=0)
        d2 = ((best[:, 0] - cy) * sy) ** 2 + ((best[:, 1] - cx) * sx) ** 2
        best = best[[int(np.argmin(d2))]]
    y, x = best[0]
    return int(x) - 1 + x0, int(y) - 1 + y0
