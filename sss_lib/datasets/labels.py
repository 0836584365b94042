"""Read every label map of a dataset once: check it against the class table and measure the classes.

The measured per-class volumes (mm^3) are what PCSW's physical range check needs
(SSS_METHOD.md section 2, step 4).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from ..errors import InputError
from .base import CaseList

log = logging.getLogger(__name__)

# Called as progress(done, total) after each label map.
ProgressCallback = Callable[[int, int], None]


@dataclasses.dataclass
class LabelReport:
    """What the label maps hold.

    Attributes:
        class_names: the declared classes, or (when none were declared) the values found, named
            ``"class N"``.
        inferred: True when ``class_names`` was inferred from the files.
        voxels: case id -> class label -> voxel count (classes absent from a case are omitted).
        volumes_mm3: case id -> class label -> physical volume in mm^3.
        missing: class label -> ids of labeled cases where the class does not occur.
    """

    class_names: dict[int, str]
    inferred: bool
    voxels: dict[str, dict[int, int]]
    volumes_mm3: dict[str, dict[int, float]]
    missing: dict[int, list[str]]

    def volume_ranges_mm3(self) -> dict[int, tuple[float, float]]:
        """Per class, ``(min, max)`` of its volume over the cases where it occurs."""
        out: dict[int, tuple[float, float]] = {}
        for label in self.class_names:
            values = [v[label] for v in self.volumes_mm3.values() if label in v]
            if values:
                out[label] = (float(min(values)), float(max(values)))
        return out


def check_labels(
    case_list: CaseList, *, check_grid: bool = True, progress: ProgressCallback | None = None
) -> LabelReport:
    """Read the label map of every labeled case and check it.

    Checks: the file reads as an integer label map; with ``check_grid``, it lies on its image's
    grid (the image is read too); every value is 0, the ignore label or a declared class.

    Raises:
        InputError: naming the file (or, when several files fail, the dataset and each file with
            its problem); also when no case is labeled.
    """
    from ..volume_io import read_label, read_volume

    labeled = case_list.labeled
    if not labeled:
        raise InputError(case_list.root, "has no labeled cases", "Add label maps (at least one case needs one).")
    declared = dict(case_list.class_names)
    allowed = set(declared) | {0} | ({case_list.ignore_label} if case_list.ignore_label is not None else set())
    problems: list[tuple[str, str]] = []
    voxels: dict[str, dict[int, int]] = {}
    volumes: dict[str, dict[int, float]] = {}
    skip = {0, case_list.ignore_label}
    for n, case in enumerate(labeled, 1):
        assert case.label_path is not None
        try:
            reference = read_volume(case.image_path) if check_grid else None
            label = read_label(case.label_path, reference)
            values, counts = np.unique(label.voxels, return_counts=True)
            bad = [int(v) for v in values if int(v) not in allowed] if declared else [int(v) for v in values if v < 0]
            if bad:
                what = f"declared: {_declared_text(declared)}" if declared else "labels must be >= 0"
                raise InputError(case.label_path, f"holds label value(s) {', '.join(map(str, bad))} that the "
                                 f"dataset does not declare ({what})")
            voxel_mm3 = float(np.prod(label.spacing))
            voxels[case.case_id] = {int(v): int(c) for v, c in zip(values, counts) if int(v) not in skip}
            volumes[case.case_id] = {v: c * voxel_mm3 for v, c in voxels[case.case_id].items()}
        except InputError as err:
            problems.append((err.path or str(case.label_path), err.problem))
        if progress is not None:
            progress(n, len(labeled))

    if problems:
        fix = ("Fix the label maps, or declare the missing classes "
               "(dataset.json labels, classes.json) if they are real classes.")
        if len(problems) == 1:
            raise InputError(problems[0][0], problems[0][1], fix)
        listing = "; ".join(f"{path}: {problem}" for path, problem in problems)
        raise InputError(case_list.root, f"{len(problems)} label files have problems: {listing}", fix)

    inferred = not declared
    names = declared or {v: f"class {v}" for v in sorted({v for d in voxels.values() for v in d})}
    missing = {label: [cid for cid, d in voxels.items() if label not in d] for label in names}
    missing = {label: ids for label, ids in missing.items() if ids}
    for label, ids in missing.items():
        log.info("%s: class %d (%s) is absent from %d of %d labeled cases", case_list.root, label,
                 names[label], len(ids), len(voxels))
    return LabelReport(names, inferred, voxels, volumes, missing)


def _declared_text(names: dict[int, str]) -> str:
    return ", ".join(f"{v} {n}" for v, n in sorted(names.items()))
