"""Results as a segmentation node: one segment per class, on the input volume's exact voxel grid.

The segmentation node sits under the volume's parent transform and takes the volume as its
reference geometry, so its voxels coincide with the volume's, including oblique directions. A
label volume ``[k, j, i]`` from sss_lib is written one class at a time through a temporary labelmap
node that copies the volume's geometry and transform (Slicer then has nothing to resample). A
segment's ID is derived from its class label, so a re-run updates the same segment in place.
"""

from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import constants as C

Color = Tuple[int, int, int]


def segment_id(label: int) -> str:
    return f"{C.SEGMENT_ID_PREFIX}{int(label)}"


def prepare_segmentation(scene: Any, volume_node: Any, segmentation_node: Optional[Any] = None) -> Any:
    """The output node for ``volume_node``: ``segmentation_node`` or a new one, set on its grid."""
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} SSS segmentation")
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    transform = volume_node.GetParentTransformNode()
    segmentation_node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return segmentation_node


def _temporary_labelmap(scene: Any, volume_node: Any, voxels: np.ndarray) -> Any:
    """A hidden labelmap node with ``volume_node``'s geometry and transform holding ``voxels``."""
    import slicer.util

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__SSS_temp__")
    labelmap.SetHideFromEditors(True)
    labelmap.CopyOrientation(volume_node)
    transform = volume_node.GetParentTransformNode()
    labelmap.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
    slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(voxels))
    return labelmap


def write_class_segments(
    scene: Any,
    segmentation_node: Any,
    volume_node: Any,
    labels: np.ndarray,
    classes: Sequence[Tuple[int, str, Color]],
    update: Optional[Iterable[int]] = None,
    keep_edited: bool = False,
) -> List[str]:
    """Write ``labels`` (``[k, j, i]``, values = class labels) into one segment per class.

    Args:
        classes: ``(label, name, colour 0..255)`` of every class to show; names and colours are
            refreshed on every call.
        update: labels whose voxels to (re)write; default all. A class whose segment does not
            exist yet is always written. Segments of other classes keep their voxels, including any
            manual edits made in the Segment Editor.

        keep_edited: in segments edited since SSS last wrote them (Segment Editor), keep the
            edited slices and write the new result only into the others (see
            :mod:`SSSSegmentLib.edit_guard`; ask first with ``edit_guard.ask_how_to_write``).
            False overwrites the edits.

    SSS segments (tagged with a class label) of classes not in ``classes`` are removed: their class
    was deleted or lost all its prompts. Every written segment records per-slice digests of the new
    result (segment tag ``SSS.WrittenSlices``), from which the next run detects edits.

    Returns:
        The IDs of the segments whose voxels were written.
    """
    import slicer
    import vtk

    from . import edit_guard

    if labels.shape != tuple(reversed(volume_node.GetImageData().GetDimensions())):
        raise ValueError(f"label volume of shape {labels.shape} does not fit the volume's grid")
    prepare_segmentation(scene, volume_node, segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    wanted = None if update is None else {int(v) for v in update}
    keep = {segment_id(label) for label, _, _ in classes}
    for sid in list(_sss_segment_ids(segmentation)):
        if sid not in keep:
            segmentation.RemoveSegment(sid)
    written = []
    for label, name, color in classes:
        sid = segment_id(label)
        rgb = (color[0] / 255.0, color[1] / 255.0, color[2] / 255.0)
        is_new = segmentation.GetSegment(sid) is None
        if is_new:
            segmentation.AddEmptySegment(sid, name, rgb)
        segment = segmentation.GetSegment(sid)
        segment.SetName(name)
        segment.SetColor(*rgb)
        segment.SetTag(C.ATTR_SEGMENT_LABEL, str(int(label)))
        if not is_new and wanted is not None and int(label) not in wanted:
            continue
        mask = (labels == label).astype(np.uint8)
        record = edit_guard.encode_record(mask)  # the new result's digests, also where edits are kept
        if keep_edited and not is_new:
            mask = edit_guard.keep_edited_masks(scene, segmentation_node, volume_node, {int(label): mask})[int(label)]
        labelmap = _temporary_labelmap(scene, volume_node, mask)
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation_node, ids):
                raise RuntimeError(f"Slicer could not import the mask of class '{name}' into the segmentation")
        finally:
            scene.RemoveNode(labelmap)
        segmentation.GetSegment(sid).SetTag(C.ATTR_WRITTEN_SLICES, record)
        written.append(sid)
    return written


def _sss_segment_ids(segmentation: Any) -> List[str]:
    """IDs of the segments SSS wrote (those tagged with a class label)."""
    import vtk

    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        if segmentation.GetSegment(sid).GetTag(C.ATTR_SEGMENT_LABEL, vtk.mutable("")):
            out.append(sid)
    return out


def read_segment_mask(scene: Any, segmentation_node: Any, volume_node: Any, sid: str) -> np.ndarray:
    """Segment ``sid`` as a 0/1 ``uint8`` ``[k, j, i]`` array on ``volume_node``'s grid."""
    import slicer
    import slicer.util
    import vtk

    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    labelmap = _temporary_labelmap(scene, volume_node, np.zeros(shape, dtype=np.uint8))
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(sid)
        logic = slicer.modules.segmentations.logic()
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node):
            raise RuntimeError(f"Slicer could not export segment {sid}")
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def read_labels(scene: Any, segmentation_node: Any, volume_node: Any) -> np.ndarray:
    """The SSS segments as a ``[k, j, i]`` label array on ``volume_node``'s grid (tests, self-test)."""
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    out = np.zeros(tuple(reversed(volume_node.GetImageData().GetDimensions())), dtype=np.uint16)
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        tag = vtk.mutable("")
        if not segmentation.GetSegment(sid).GetTag(C.ATTR_SEGMENT_LABEL, tag):
            continue
        out[read_segment_mask(scene, segmentation_node, volume_node, sid) > 0] = int(str(tag))
    return out


def record_run(segmentation_node: Any, model: str, device: str, seconds: float) -> None:
    """Note on the node which model made it, on which device, and how long the run took."""
    segmentation_node.SetAttribute(C.ATTR_MODEL, model)
    segmentation_node.SetAttribute(C.ATTR_DEVICE, device)
    segmentation_node.SetAttribute(C.ATTR_SECONDS, f"{seconds:.2f}")
