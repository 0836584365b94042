"""Segment Editor edits survive a re-run: detect them, ask, and keep the edited slices if wanted.

When SSS writes a class's segment it stores, as a segment tag, a digest of every slice of the mask
it wrote, along each of the three voxel axes (:func:`encode_record`). Before a later run rewrites
the segment, :func:`find_edits` compares the segment's current voxels with that record: slices whose
digest differs were edited since (by the Segment Editor, a script, anything). The edit is measured
along the axis on which it touches the fewest slices, which is the view it was painted in.

The panel then asks (:func:`ask_how_to_write`): overwrite, keep the edited slices, or cancel. Keeping
merges (:func:`merge_keep_edited`): edited slices keep the user's voxels, all other slices get the
new result. The record keeps the *new result's* digests, so kept slices still count as edited on the
next run and are protected again.

A segment without a record (written before this existed, or made by hand) has nothing to compare
with and is treated as unedited.
"""

import dataclasses
import hashlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import constants as C

OVERWRITE = "overwrite"
KEEP_EDITED = "keep edited slices"
CANCEL = "cancel"

AXIS_NAMES = ("k", "j", "i")  # numpy axes 0, 1, 2 of a [k, j, i] mask
_DIGEST_CHARS = 12  # 48 bits per slice: a chance collision is ~1e-14 per slice comparison


@dataclasses.dataclass
class SliceRecord:
    """Digests of a ``[k, j, i]`` mask: ``digests[a][s]`` is slice ``s`` along numpy axis ``a``."""

    shape: Tuple[int, int, int]
    digests: Tuple[List[str], List[str], List[str]]


@dataclasses.dataclass
class EditReport:
    """A segment that was edited since SSS wrote it.

    Attributes:
        label, name: the class.
        axis: numpy axis (0 = k, 1 = j, 2 = i) along which the edit touches the fewest slices.
        slices: the edited slice indices along ``axis``.
    """

    label: int
    name: str
    axis: int
    slices: List[int]

    def describe(self) -> str:
        return f"'{self.name}': {len(self.slices)} slice(s) along {AXIS_NAMES[self.axis]} ({_ranges(self.slices)})"


def slice_digests(mask: np.ndarray) -> Tuple[List[str], List[str], List[str]]:
    """Per-slice digests of a 0/1 ``[k, j, i]`` mask along k, j and i."""
    bits = np.ascontiguousarray(mask, dtype=bool)
    out = []
    for axis in range(3):
        stack = np.ascontiguousarray(np.moveaxis(bits, axis, 0))
        out.append([hashlib.blake2b(np.packbits(s).tobytes(), digest_size=8).hexdigest()[:_DIGEST_CHARS] for s in stack])
    return out[0], out[1], out[2]


def encode_record(mask: np.ndarray) -> str:
    """The segment-tag text for ``mask``: ``"K,J,I;k digests;j digests;i digests"``.

    Only ``,`` and ``;`` separate fields: a segment tag's value must not hold ``|`` or ``:``, which
    the ``.seg.nrrd`` header uses between tags.
    """
    digests = slice_digests(mask)
    return ";".join([",".join(str(int(n)) for n in mask.shape)] + [",".join(d) for d in digests])


def decode_record(text: Optional[str]) -> Optional[SliceRecord]:
    """:func:`encode_record`'s text back, or None for a missing or garbled tag."""
    if not text:
        return None
    try:
        shape_text, k, j, i = text.split(";")
        shape = tuple(int(n) for n in shape_text.split(","))
        digests = (k.split(","), j.split(","), i.split(","))
    except ValueError:
        return None
    if len(shape) != 3 or any(len(d) != n for d, n in zip(digests, shape)):
        return None
    return SliceRecord(shape, digests)  # type: ignore[arg-type]


def edited_slices(current: np.ndarray, record: Optional[SliceRecord]) -> Optional[Tuple[int, List[int]]]:
    """``(axis, slice indices)`` where ``current`` differs from ``record``; None when unedited or
    when there is nothing to compare with (no record, or another grid)."""
    if record is None or tuple(current.shape) != tuple(record.shape):
        return None
    now = slice_digests(current)
    changed = [[s for s, (a, b) in enumerate(zip(now[axis], record.digests[axis])) if a != b] for axis in range(3)]
    if not changed[0]:
        return None  # every k slice matches, so the mask is the one SSS wrote
    axis = min(range(3), key=lambda a: (len(changed[a]), a))
    return axis, changed[axis]


def merge_keep_edited(new_mask: np.ndarray, current: np.ndarray, axis: int, slices: Sequence[int]) -> np.ndarray:
    """``new_mask`` with ``slices`` along numpy ``axis`` taken from ``current`` (the user's voxels)."""
    merged = np.array(new_mask, copy=True)
    index = [slice(None)] * 3
    index[axis] = list(slices)  # type: ignore[call-overload]
    merged[tuple(index)] = current[tuple(index)]
    return merged


def find_edits(
    scene: Any, segmentation_node: Optional[Any], volume_node: Any, labels: Optional[Iterable[int]] = None
) -> List[EditReport]:
    """The SSS segments (of ``labels``, default all) edited since SSS last wrote them."""
    from .segmentation import read_segment_mask, segment_id

    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    wanted = _labels_of(segmentation) if labels is None else [int(v) for v in labels]
    reports = []
    for label in wanted:
        segment = segmentation.GetSegment(segment_id(label))
        if segment is None:
            continue
        record = decode_record(_tag(segment, C.ATTR_WRITTEN_SLICES))
        if record is None:
            continue
        found = edited_slices(read_segment_mask(scene, segmentation_node, volume_node, segment_id(label)), record)
        if found is not None:
            reports.append(EditReport(label, segment.GetName(), found[0], found[1]))
    return reports


def question(reports: List[EditReport]) -> Tuple[str, str]:
    """``(text, details)`` of the question :func:`ask_how_to_write` asks."""
    names = ", ".join(f"'{r.name}'" for r in reports)
    text = (
        f"The segment(s) {names} were edited since SSS wrote them (for example in the Segment Editor). "
        f"The new result would replace them.\n\n"
        f"Keep edited slices: slices you edited stay as they are, all others get the new result.\n"
        f"Overwrite: the new result replaces your edits.\n"
        f"Cancel: nothing is written; the segmentation stays as it is."
    )
    return text, "Edited:\n" + "\n".join(r.describe() for r in reports)


def ask_how_to_write(
    scene: Any, segmentation_node: Optional[Any], volume_node: Any, labels: Optional[Iterable[int]] = None,
    ask: Optional[Callable[[str, str], str]] = None,
) -> str:
    """:data:`OVERWRITE` when no segment about to be rewritten was edited; otherwise the user's
    answer to ``ask(text, details)`` (default: a message box in Slicer): :data:`OVERWRITE`,
    :data:`KEEP_EDITED` or :data:`CANCEL`."""
    reports = find_edits(scene, segmentation_node, volume_node, labels)
    if not reports:
        return OVERWRITE
    text, details = question(reports)
    return (ask or ask_with_message_box)(text, details)


def ask_with_message_box(text: str, details: str) -> str:
    """Slicer's three-button question; in testing mode it keeps the edits without a popup."""
    import qt
    import slicer

    if slicer.app.testingEnabled():
        return KEEP_EDITED
    box = qt.QMessageBox(slicer.util.mainWindow())
    box.setWindowTitle("SSS: edited segments")
    box.setIcon(qt.QMessageBox.Question)
    box.setText(text)
    box.setDetailedText(details)
    keep = box.addButton("Keep edited slices", qt.QMessageBox.AcceptRole)
    overwrite = box.addButton("Overwrite", qt.QMessageBox.DestructiveRole)
    box.addButton(qt.QMessageBox.Cancel)
    box.setDefaultButton(keep)
    box.exec_()
    clicked = box.clickedButton()
    return KEEP_EDITED if clicked == keep else OVERWRITE if clicked == overwrite else CANCEL


def _labels_of(segmentation: Any) -> List[int]:
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        text = _tag(segmentation.GetSegment(segmentation.GetNthSegmentID(n)), C.ATTR_SEGMENT_LABEL)
        if text:
            out.append(int(text))
    return out


def _tag(segment: Any, name: str) -> Optional[str]:
    import vtk

    value = vtk.mutable("")
    return str(value) if segment.GetTag(name, value) else None


def _ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts: List[str] = []
    start = prev = None
    for v in sorted(values):
        if start is None:
            start = prev = v
        elif v == prev + 1:  # type: ignore[operator]
            prev = v
        else:
            parts.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(parts)


def keep_edited_masks(
    scene: Any, segmentation_node: Any, volume_node: Any, masks: Dict[int, np.ndarray]
) -> Dict[int, np.ndarray]:
    """``masks`` (label -> new 0/1 ``[k, j, i]`` mask) with each class's edited slices taken from its
    current segment (classes without edits are returned unchanged)."""
    from .segmentation import read_segment_mask, segment_id

    out = dict(masks)
    for report in find_edits(scene, segmentation_node, volume_node, masks.keys()):
        current = read_segment_mask(scene, segmentation_node, volume_node, segment_id(report.label))
        out[report.label] = merge_keep_edited(masks[report.label], current, report.axis, report.slices)
    return out
