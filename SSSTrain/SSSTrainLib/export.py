"""Write the scene's cases out for training: labeled cases as an nnU-Net v2 raw dataset
(``RUN/dataset``: ``dataset.json``, ``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``) and
unlabeled volumes as plain image files (``RUN/unlabeled/CASE.nii.gz``).

Geometry: each image is written in world coordinates, its parent transform (linear) applied, and
its label map on exactly the same voxel grid, as nnU-Net requires. A segmentation must therefore
sit under the same transform as its volume (as SSS Segment and the Segment Editor place it);
otherwise the export stops and says so. Class names and values come from the segments
(:func:`SSSTrainLib.scene_cases.class_table`). Where segments overlap, the one listed later in the
segmentation wins; the report counts such voxels.

Main thread only (MRML). Needs sss_lib (Python 3.10+), imported inside the functions.
"""

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import constants as C
from .errors import SceneDataError
from .scene_cases import SceneCase, class_table

EXPORT_MARKER = ".sss_scene_export"  # in every folder this module writes, so only those are ever replaced
FILE_ENDING = ".nii.gz"

Progress = Callable[[str, Optional[float]], None]


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_scene_cases` wrote.

    Attributes:
        dataset_dir: the nnU-Net dataset folder, or "" when no labeled case was written.
        labeled: case ids written to ``imagesTr``/``labelsTr``.
        unlabeled_dir: the folder of unlabeled images, or "".
        unlabeled: case ids written there.
        classes: label value -> class name (``dataset.json`` labels, background left out).
        notes: things the user should know (overlapping segments, classes absent from a case).
    """

    dataset_dir: str = ""
    labeled: List[str] = dataclasses.field(default_factory=list)
    unlabeled_dir: str = ""
    unlabeled: List[str] = dataclasses.field(default_factory=list)
    classes: Dict[int, str] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.dataset_dir:
            classes = ", ".join(f"{v} {n}" for v, n in sorted(self.classes.items()))
            parts.append(f"{len(self.labeled)} labeled case(s) -> {self.dataset_dir} (classes: {classes})")
        if self.unlabeled_dir:
            parts.append(f"{len(self.unlabeled)} unlabeled volume(s) -> {self.unlabeled_dir}")
        return "\n".join(parts + self.notes)


def _fresh_folder(path: str) -> None:
    """Empty ``path`` for a new export; refuse to touch a folder this module did not write."""
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, EXPORT_MARKER)):
            raise SceneDataError(
                f"{path} exists and was not written by SSS Train; it is left alone. "
                "Choose another run folder, or move that folder away."
            )
        shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, EXPORT_MARKER), "w") as f:
        f.write("Written by the SSS Train module of 3D Slicer; replaced at every Start.\n")


def _same_transform(a: Any, b: Any) -> bool:
    ta, tb = a.GetParentTransformNode(), b.GetParentTransformNode()
    return (ta.GetID() if ta is not None else None) == (tb.GetID() if tb is not None else None)


def _world_volume(volume_node: Any) -> Any:
    from SSSSegmentLib.errors import UserFacingError
    from SSSSegmentLib.geometry import sss_volume_from_node

    try:
        return sss_volume_from_node(volume_node)
    except UserFacingError as e:
        raise SceneDataError(str(e)) from None


def case_label_map(case: SceneCase, name_to_value: Dict[str, int]) -> Tuple[np.ndarray, int]:
    """The ``[k, j, i]`` label map of a labeled case on its volume's grid, and the number of voxels
    claimed by more than one segment."""
    import slicer.util

    volume, seg = case.volume, case.segmentation
    if not _same_transform(volume, seg):
        raise SceneDataError(
            f"Segmentation '{seg.GetName()}' and its volume '{volume.GetName()}' are under different transforms. "
            "Put both under the same transform (Data module, Transform column) or harden both transforms."
        )
    shape = tuple(reversed(volume.GetImageData().GetDimensions()))
    dtype = np.uint8 if max(name_to_value.values()) < 256 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    overlap = 0
    segmentation = seg.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        name = segmentation.GetNthSegment(n).GetName().strip() or segment_id
        try:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume) > 0
        except RuntimeError as e:
            raise SceneDataError(f"Slicer could not export segment '{name}' of '{seg.GetName()}' ({e}).") from None
        if mask.shape != shape:
            raise SceneDataError(f"Segment '{name}' of '{seg.GetName()}' did not come out on the grid of '{volume.GetName()}'.")
        overlap += int(np.count_nonzero(mask & (labels > 0)))
        labels[mask] = name_to_value[name]
    return labels, overlap


def export_scene_cases(
    labeled: Sequence[SceneCase],
    unlabeled: Sequence[SceneCase],
    run_dir: str,
    progress: Optional[Progress] = None,
) -> ExportReport:
    """Write the included ``labeled`` cases to ``RUN/dataset`` and the included ``unlabeled``
    volumes to ``RUN/unlabeled`` (each replaced if an earlier export made it).

    Args:
        labeled / unlabeled: from :func:`SSSTrainLib.scene_cases.find_scene_cases`; excluded cases
            are skipped. Pass an empty list to write nothing of that kind.
        run_dir: the run folder (created if missing).
        progress: ``progress(text, fraction)`` after each case.

    Raises:
        SceneDataError: a segmentation under another transform than its volume, a segment named
            "background", a folder in the way that SSS Train did not write.
    """
    from sss_lib.preprocess import guess_modality
    from sss_lib.volume import Volume
    from sss_lib.volume_io import write_volume

    labeled = [c for c in labeled if c.included]
    unlabeled = [c for c in unlabeled if c.included]
    report = ExportReport()
    total = len(labeled) + len(unlabeled)
    done = 0
    os.makedirs(run_dir, exist_ok=True)

    if labeled:
        classes = class_table(labeled)
        name_to_value = {name: value for value, name in classes.items()}
        root = os.path.join(run_dir, C.SCENE_DATASET_DIR)
        _fresh_folder(root)
        modalities = set()
        origin: Dict[str, Dict[str, str]] = {}
        for case in labeled:
            image = _world_volume(case.volume)
            labels, overlap = case_label_map(case, name_to_value)
            present = set(np.unique(labels).tolist()) - {0}
            missing = [classes[v] for v in sorted(classes) if v not in present]
            if missing:
                report.notes.append(f"{case.case_id}: no voxels of {', '.join(missing)}")
            if overlap:
                report.notes.append(f"{case.case_id}: {overlap} voxels in several segments (the later segment kept them)")
            write_volume(image, os.path.join(root, "imagesTr", f"{case.case_id}_0000{FILE_ENDING}"))
            label_volume = Volume(labels, image.spacing, image.origin, image.direction, source=case.segmentation.GetName())
            write_volume(label_volume, os.path.join(root, "labelsTr", f"{case.case_id}{FILE_ENDING}"))
            modalities.add(guess_modality(image.voxels))
            origin[case.case_id] = {"volume": case.volume.GetName(), "segmentation": case.segmentation.GetName()}
            report.labeled.append(case.case_id)
            done += 1
            if progress:
                progress(f"Wrote labeled case {case.case_id}", done / total)
        channel = modalities.pop() if len(modalities) == 1 else "image"
        dataset = {
            "name": "SSS scene export",
            "description": "Volumes and segmentations exported from a 3D Slicer scene by the SSS Train module.",
            "channel_names": {"0": channel},
            "labels": dict([("background", 0)] + [(name, value) for value, name in sorted(classes.items())]),
            "numTraining": len(report.labeled),
            "file_ending": FILE_ENDING,
            "sss_scene_cases": origin,
        }
        with open(os.path.join(root, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(dataset, f, indent=2)
        report.dataset_dir = root
        report.classes = classes

    if unlabeled:
        folder = os.path.join(run_dir, C.SCENE_UNLABELED_DIR)
        _fresh_folder(folder)
        for case in unlabeled:
            write_volume(_world_volume(case.volume), os.path.join(folder, f"{case.case_id}{FILE_ENDING}"))
            report.unlabeled.append(case.case_id)
            done += 1
            if progress:
                progress(f"Wrote unlabeled volume {case.case_id}", done / total)
        report.unlabeled_dir = folder
    return report
