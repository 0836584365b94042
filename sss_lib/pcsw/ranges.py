"""Physical volume ranges of each class, measured on labeled cases (PCSW constraint, step 4)."""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import numpy as np
from scipy import ndimage

Measure = Literal["largest_component", "class"]


def measure_class_ranges(
    label_volumes: Sequence[np.ndarray],
    spacings: Sequence[Sequence[float]],
    *,
    labels: Iterable[int] | None = None,
    measure: Measure = "largest_component",
    connectivity: int = 26,
) -> dict[int, tuple[float, float]]:
    """``label -> (min_mm3, max_mm3)`` over the labeled cases where the label occurs.

    Args:
        label_volumes: integer label arrays (any axis order, e.g. ``[k, j, i]``).
        spacings: voxel size in mm of each volume, three values in any order (only their
            product, the voxel volume, is used).
        labels: labels to measure; None measures every nonzero label found.
        measure: ``"largest_component"`` (default) measures each case's largest 3D connected
            component of the label, what PCSW compares against (the whole structure a window's
            component belongs to); ``"class"`` measures all voxels of the label.
        connectivity: 6, 18 or 26, the component connectivity (PCSW uses 26).

    A label missing from a case is left out of that case's measurement; a requested label that no
    case holds is left out of the result.
    """
    if len(label_volumes) != len(spacings):
        raise ValueError(f"{len(label_volumes)} label volumes but {len(spacings)} spacings")
    if measure not in ("largest_component", "class"):
        raise ValueError(f"measure must be 'largest_component' or 'class', got {measure!r}")
    rank = {6: 1, 18: 2, 26: 3}.get(connectivity)
    if rank is None:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    structure = ndimage.generate_binary_structure(3, rank)
    wanted = None if labels is None else {int(v) for v in labels}
    seen: dict[int, list[float]] = {}
    for vol, sp in zip(label_volumes, spacings):
        vol = np.asarray(vol)
        if vol.ndim != 3:
            raise ValueError(f"label volumes must be 3D, got shape {vol.shape}")
        voxel_mm3 = float(np.prod(np.asarray(sp, dtype=float)))
        if not np.issubdtype(vol.dtype, np.integer) or (vol.size and vol.min() < 0):
            raise ValueError("label volumes must hold non-negative integers")
        # Each label's bounding box, so that many labels cost one pass each over their own box.
        boxes = ndimage.find_objects(vol.astype(np.int64, copy=False))
        for index, box in enumerate(boxes):
            label = index + 1
            if box is None or (wanted is not None and label not in wanted):
                continue
            mask = vol[box] == label
            if measure == "class":
                count = int(np.count_nonzero(mask))
            else:
                comps, n = ndimage.label(mask, structure=structure)
                count = int(np.bincount(comps.ravel(), minlength=n + 1)[1:].max())
            seen.setdefault(label, []).append(count * voxel_mm3)
    return {label: (min(v), max(v)) for label, v in sorted(seen.items())}
