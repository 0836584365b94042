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
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import constants as C

OVERWRITE = "overwrite"
KEEP_EDITED = "keep edited slices"
CANCEL = "cancel"

AXIS_NAMES = ("k", "j", "i")  # numpy axes 0, 1, 2 of a [k, j, i] mask
_RECORD_VERSION = "2"
_CHUNK = 16  # slices hashed at a time (bounds the uint64 copy: 16 x J x I x 8 bytes)


@dataclasses.dataclass
class SliceRecord:
    """Digests of a ``[k, j, i]`` mask: ``digests[a][s]`` is slice ``s`` along numpy axis ``a``
    (uint64; 0 for an empty slice)."""

    shape: Tuple[int, int, int]
    digests: Tuple[np.ndarray, np.ndarray, np.ndarray]


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


def _weights(axis: int, n: int) -> np.ndarray:
    """Fixed odd pseudo-random uint64 weights for the ``n`` indices of numpy ``axis`` (the same in
    every session, so a record saved with a scene is still comparable)."""
    rng = np.random.default_rng(0x5355 + axis)
    return rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def slice_digests(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice digests of a 0/1 ``[k, j, i]`` mask along k, j and i (uint64 arrays).

    The digest of slice ``s`` is a weighted sum of its voxels, each weighted by the product of fixed
    random odd 64-bit weights of its two other coordinates, modulo 2**64. Two different slices have
    the same digest with a chance of about 2**-63. Being linear, all three axes come from one pass
    over the mask's bounding box (a hash per slice along i and j would copy the whole volume).
    """
    k_n, j_n, i_n = mask.shape
    out = (np.zeros(k_n, np.uint64), np.zeros(j_n, np.uint64), np.zeros(i_n, np.uint64))
    box = _bounding_box(mask)
    if box is None:
        return out
    (k0, k1), (j0, j1), (i0, i1) = box
    wk, wj, wi = _weights(0, k_n)[k0:k1], _weights(1, j_n)[j0:j1], _weights(2, i_n)[i0:i1]
    with np.errstate(over="ignore"):  # modulo 2**64 is the point
        for start in range(k0, k1, _CHUNK):
            stop = min(start + _CHUNK, k1)
            x = (mask[start:stop, j0:j1, i0:i1] != 0).astype(np.uint64)
            by_i = x @ wi  # (chunk, J'): sum over i
            out[0][start:stop] = by_i @ wj
            out[1][j0:j1] += wk[start - k0:stop - k0] @ by_i
            out[2][i0:i1] += wk[start - k0:stop - k0] @ (wj @ x)
    return out


def _bounding_box(mask: np.ndarray) -> Optional[List[Tuple[int, int]]]:
    box = []
    for axis in range(3):
        used = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if used.size == 0:
            return None
        box.append((int(used[0]), int(used[-1]) + 1))
    return box


def encode_record(mask: np.ndarray) -> str:
    """The segment-tag text for ``mask``: ``"2;K,J,I;k0,j0,i0;k digests;j digests;i digests"``,
    each axis's digests (hex) from its first to its last non-empty slice.

    Only ``,`` and ``;`` separate fields: a segment tag's value must not hold ``|`` or ``:``, which
    the ``.seg.nrrd`` header uses between tags.
    """
    digests = slice_digests(mask)
    starts, parts = [], []
    for d in digests:
        used = np.flatnonzero(d)
        first, last = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
        starts.append(str(first))
        parts.append(",".join(f"{int(v):x}" for v in d[first:last]))
    return ";".join([_RECORD_VERSION, ",".join(str(int(n)) for n in mask.shape), ",".join(starts)] + parts)


def decode_record(text: Optional[str]) -> Optional[SliceRecord]:
    """:func:`encode_record`'s text back, or None for a missing, garbled or older tag."""
    if not text:
        return None
    try:
        version, shape_text, starts_text, *parts = text.split(";")
        shape = tuple(int(n) for n in shape_text.split(","))
        starts = [int(n) for n in starts_text.split(",")]
        if version != _RECORD_VERSION or len(shape) != 3 or len(starts) != 3 or len(parts) != 3:
            return None
        digests = []
        for n, start, part in zip(shape, starts, parts):
            values = [int(v, 16) for v in part.split(",")] if part else []
            if start < 0 or start + len(values) > n:
                return None
            d = np.zeros(n, np.uint64)
            d[start:start + len(values)] = np.array(values, dtype=np.uint64)
            digests.append(d)
    except ValueError:
        return None
    return SliceRecord(shape, (digests[0], digests[1], digests[2]))  # type: ignore[arg-type]


def edited_slices(current: np.ndarray, record: Optional[SliceRecord]) -> Optional[Tuple[int, List[int]]]:
    """``(axis, slice indices)`` where ``current`` differs from ``record``; None when unedited or
    when there is nothing to compare with (no record, or another grid)."""
    if record is None or tuple(current.shape) != tuple(record.shape):
        return None
    now = slice_digests(current)
    changed = [np.flatnonzero(now[axis] != record.digests[axis]).tolist() for axis in range(3)]
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


def _edit_of(scene: Any, segmentation_node: Any, volume_node: Any, label: int) -> Optional[Tuple[np.ndarray, int, List[int]]]:
    """``(current mask, axis, edited slices)`` of class ``label``'s segment, or None if unedited,
    missing or without a record."""
    from .segmentation import read_segment_mask, segment_id

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id(label))
    record = decode_record(_tag(segment, C.ATTR_WRITTEN_SLICES)) if segment is not None else None
    if record is None:
        return None
    current = read_segment_mask(scene, segmentation_node, volume_node, segment_id(label))
    found = edited_slices(current, record)
    return None if found is None else (current, found[0], found[1])


def find_edits(
    scene: Any, segmentation_node: Optional[Any], volume_node: Any, labels: Optional[Iterable[int]] = None
) -> List[EditReport]:
    """The SSS segments (of ``labels``, default all) edited since SSS last wrote them."""
    from .segmentation import segment_id

    if segmentation_node is None:
        return []
    segmentation = segmentation_node.GetSegmentation()
    reports = []
    for label in _labels_of(segmentation) if labels is None else [int(v) for v in labels]:
        edit = _edit_of(scene, segmentation_node, volume_node, label)
        if edit is not None:
            reports.append(EditReport(label, segmentation.GetSegment(segment_id(label)).GetName(), edit[1], edit[2]))
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
    current segment (classes without edits or without a record are returned unchanged)."""
    out = dict(masks)
    for label, mask in masks.items():
        edit = _edit_of(scene, segmentation_node, volume_node, label)
        if edit is not None:
            out[label] = merge_keep_edited(mask, edit[0], edit[1], edit[2])
    return out
