"""Prompts as markups: one point list and one or more ROI boxes per class, and back.

A class (one sss_lib ``ClassPrompts``) lives in the scene as

* a ``vtkMRMLMarkupsFiducialNode`` (the *points node*, the class's record): attributes give the class
  label, name, colour and provenance; node references point to the prompted volume and to the boxes;
  each control point is a prompt point whose description is ``"positive"`` or ``"negative"`` (saved
  in ``.mrk.json``, so the polarity survives save/load), label ``+``/``-`` and, for colour, the
  "selected" flag (selected = positive: class colour; unselected = negative: darker);
* zero or more ``vtkMRMLMarkupsROINode`` (the *box nodes*): one XYXY box on one key slice each,
  oriented along the volume's voxel axes so an oblique volume's boxes stay tight;
* at most one more ``vtkMRMLMarkupsFiducialNode`` (the *"not on this slice" node*, role
  :data:`ROLE_ABSENT`, referenced by :data:`REF_ABSENT`): one control point per slice where the
  class is absent (an sss_lib ``SlicePrompt.not_on_slice``), placed at the slice's centre; only the
  slice it lies on counts.

Stack coordinates follow sss_lib: slice ``s`` along ``axis``; ``x``/``y`` in pixels on the slice;
boxes ``(x0, y0, x1, y1)`` with corners on voxel centres. Markups are read in world coordinates
(``...World`` getters), so they may sit under any linear transform; they are written under the
volume's parent transform, so they move with the volume.

Matrices are 4x4 numpy arrays on column vectors; ``ijk_to_world`` is
:func:`SSSSegmentLib.geometry.ijk_to_world_ras` of the volume.
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import constants as C
from .geometry import apply, matrix_from_vtk, parent_to_world, vtk_from_matrix

Color = Tuple[int, int, int]

# The "not on this slice" markers (new in prompts format 2). Kept here rather than in constants.py
# so that this file alone owns them; like every name stored in MRML, never rename them.
ROLE_ABSENT = "absent"
REF_ABSENT = "sssAbsent"  # points node -> the class's "not on this slice" node
ABSENT_POINT_LABEL = "not here"


@dataclasses.dataclass
class ClassNodes:
    """The markups of one class. ``boxes`` may be empty or hold undefined (not yet placed) ROIs;
    ``absent`` is the "not on this slice" node, None until the class has had a marker."""

    points: Any
    boxes: List[Any]
    absent: Any = None

    @property
    def label(self) -> int:
        return int(self.points.GetAttribute(C.ATTR_LABEL))

    @property
    def name(self) -> str:
        return self.points.GetAttribute(C.ATTR_NAME) or f"class {self.label}"

    @property
    def color(self) -> Color:
        return parse_color(self.points.GetAttribute(C.ATTR_COLOR))

    @property
    def source(self) -> str:
        return self.points.GetAttribute(C.ATTR_SOURCE) or C.SOURCE_USER

    def all_nodes(self) -> List[Any]:
        return [self.points] + list(self.boxes) + ([self.absent] if self.absent is not None else [])

    def set_source(self, source: str) -> None:
        for node in self.all_nodes():
            node.SetAttribute(C.ATTR_SOURCE, source)

    def defined_boxes(self) -> List[Any]:
        return [b for b in self.boxes if b.GetNumberOfDefinedControlPoints() > 0]


def parse_color(text: Optional[str]) -> Color:
    """``"r,g,b"`` (0..255) -> tuple; a missing/garbled value gives red."""
    try:
        r, g, b = (int(v) for v in str(text).split(","))
        return (r, g, b)
    except ValueError:
        return (255, 0, 0)


def _unit(color: Color) -> Tuple[float, float, float]:
    return (color[0] / 255.0, color[1] / 255.0, color[2] / 255.0)


# -- class records -------------------------------------------------------------------------------


def find_classes(scene: Any, volume_node: Any) -> List[ClassNodes]:
    """The prompt classes of ``volume_node`` in ``scene``, sorted by label."""
    found = []
    points_nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
    for n in range(points_nodes.GetNumberOfItems()):
        node = points_nodes.GetItemAsObject(n)
        if node.GetAttribute(C.ATTR_ROLE) != C.ROLE_POINTS or node.GetAttribute(C.ATTR_LABEL) is None:
            continue
        if node.GetNodeReference(C.REF_VOLUME) is not volume_node:
            continue
        boxes = [node.GetNthNodeReference(C.REF_BOX, i) for i in range(node.GetNumberOfNodeReferences(C.REF_BOX))]
        found.append(ClassNodes(node, [b for b in boxes if b is not None], node.GetNodeReference(REF_ABSENT)))
    return sorted(found, key=lambda c: c.label)


def find_class(scene: Any, volume_node: Any, label: int) -> Optional[ClassNodes]:
    for c in find_classes(scene, volume_node):
        if c.label == label:
            return c
    return None


def next_free_label(scene: Any, volume_node: Any) -> int:
    used = {c.label for c in find_classes(scene, volume_node)}
    label = 1
    while label in used:
        label += 1
    return label


def default_color(label: int) -> Color:
    return C.DEFAULT_CLASS_COLORS[(label - 1) % len(C.DEFAULT_CLASS_COLORS)]


def create_class(
    scene: Any, volume_node: Any, label: int, name: str, color: Optional[Color] = None, source: str = C.SOURCE_USER
) -> ClassNodes:
    """Add the (empty) markups of a new class; raises ValueError if ``label`` is taken."""
    if label <= 0:
        raise ValueError(f"class labels must be positive (0 is background), got {label}")
    if find_class(scene, volume_node, label) is not None:
        raise ValueError(f"volume '{volume_node.GetName()}' already has a class with label {label}")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.CreateDefaultDisplayNodes()
    points.SetAttribute(C.ATTR_ROLE, C.ROLE_POINTS)
    points.SetAttribute(C.ATTR_LABEL, str(int(label)))
    points.SetNodeReferenceID(C.REF_VOLUME, volume_node.GetID())
    _follow_volume_transform(points, volume_node)
    nodes = ClassNodes(points, [])
    describe_class(nodes, name, color or default_color(label))
    nodes.set_source(source)
    return nodes


def add_box_node(scene: Any, nodes: ClassNodes, volume_node: Any) -> Any:
    """A not yet placed ROI for ``nodes``' class (reuses an unplaced one if there is one)."""
    for box in nodes.boxes:
        if box.GetNumberOfDefinedControlPoints() == 0:
            return box
    return _new_box_node(scene, nodes, volume_node)


def _new_box_node(scene: Any, nodes: ClassNodes, volume_node: Any) -> Any:
    box = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    box.CreateDefaultDisplayNodes()
    box.SetAttribute(C.ATTR_ROLE, C.ROLE_BOX)
    box.SetAttribute(C.ATTR_LABEL, nodes.points.GetAttribute(C.ATTR_LABEL))
    box.SetAttribute(C.ATTR_SOURCE, nodes.source)
    box.SetNodeReferenceID(C.REF_VOLUME, volume_node.GetID())
    _follow_volume_transform(box, volume_node)
    nodes.points.AddNodeReferenceID(C.REF_BOX, box.GetID())
    nodes.boxes.append(box)
    describe_class(nodes, nodes.name, nodes.color)
    return box


def remove_box_node(scene: Any, nodes: ClassNodes, box: Any) -> None:
    for i in range(nodes.points.GetNumberOfNodeReferences(C.REF_BOX)):
        if nodes.points.GetNthNodeReference(C.REF_BOX, i) is box:
            nodes.points.RemoveNthNodeReferenceID(C.REF_BOX, i)
            break
    nodes.boxes = [b for b in nodes.boxes if b is not box]
    scene.RemoveNode(box)


def remove_class(scene: Any, nodes: ClassNodes) -> None:
    for node in nodes.all_nodes():
        scene.RemoveNode(node)


def describe_class(nodes: ClassNodes, name: str, color: Color) -> None:
    """Name and colour every node of the class after it (names: "<class> points", "<class> box")."""
    for node in nodes.all_nodes():
        node.SetAttribute(C.ATTR_NAME, name)
        node.SetAttribute(C.ATTR_COLOR, ",".join(str(int(v)) for v in color))
    nodes.points.SetName(f"SSS {name} points")
    for n, box in enumerate(nodes.boxes):
        box.SetName(f"SSS {name} box" + (f" {n + 1}" if n else ""))
    if nodes.absent is not None:
        nodes.absent.SetName(f"SSS {name} not on slice")
    rgb = _unit(color)
    dark = tuple(v * C.NEGATIVE_COLOR_SCALE for v in rgb)
    display = nodes.points.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*rgb)  # positive points are "selected"
        display.SetColor(*dark)  # negative points are not
        display.SetActiveColor(*rgb)
    for box in nodes.boxes:
        d = box.GetDisplayNode()
        if d is not None:
            d.SetSelectedColor(*rgb)
            d.SetColor(*rgb)
            d.SetFillOpacity(0.1)
    if nodes.absent is not None and nodes.absent.GetDisplayNode() is not None:
        d = nodes.absent.GetDisplayNode()
        d.SetSelectedColor(*dark)  # drawn like a negative point: "the class, but not here"
        d.SetColor(*dark)
        d.SetActiveColor(*rgb)
        if hasattr(d, "SetGlyphTypeFromString"):
            d.SetGlyphTypeFromString("Cross2D")


def set_class_visibility(nodes: ClassNodes, visible: bool) -> None:
    for node in nodes.all_nodes():
        d = node.GetDisplayNode()
        if d is not None:
            d.SetVisibility(bool(visible))


def class_visible(nodes: ClassNodes) -> bool:
    d = nodes.points.GetDisplayNode()
    return bool(d is None or d.GetVisibility())


def _follow_volume_transform(node: Any, volume_node: Any) -> None:
    transform = volume_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)


# -- point polarity ------------------------------------------------------------------------------


def point_is_positive(points: Any, index: int) -> bool:
    """Polarity of a prompt point: its description, else (a point placed outside SSS) its selected flag."""
    text = (points.GetNthControlPointDescription(index) or "").strip().lower()
    if text == C.NEGATIVE:
        return False
    if text == C.POSITIVE:
        return True
    return bool(points.GetNthControlPointSelected(index))


def set_point_polarity(points: Any, index: int, positive: bool) -> None:
    points.SetNthControlPointDescription(index, C.POSITIVE if positive else C.NEGATIVE)
    points.SetNthControlPointLabel(index, "+" if positive else "-")
    points.SetNthControlPointSelected(index, bool(positive))


def apply_pending_polarity(points: Any) -> List[int]:
    """Give every point without a polarity the node's pending one (set when a place mode starts).

    Returns the indices that were updated. Called when the user finishes placing a point.
    """
    pending = points.GetAttribute(C.ATTR_PENDING_POLARITY) or C.POSITIVE
    updated = []
    for i in range(points.GetNumberOfControlPoints()):
        text = (points.GetNthControlPointDescription(i) or "").strip().lower()
        if text not in (C.POSITIVE, C.NEGATIVE):
            set_point_polarity(points, i, pending != C.NEGATIVE)
            updated.append(i)
    return updated


# -- prompts -> markups --------------------------------------------------------------------------


def _node_from_ijk(node: Any, ijk_to_world: np.ndarray) -> np.ndarray:
    """4x4 from voxel ijk to ``node``'s own coordinates (undoing the node's parent transform)."""
    return np.linalg.inv(parent_to_world(node)) @ ijk_to_world


def write_box(box: Any, ijk_to_world: np.ndarray, axis: Any, key_slice: int, xyxy: Sequence[float]) -> None:
    """Place ``box`` (ROI) on slice ``key_slice`` around ``xyxy`` (pixels), one slice thick.

    The ROI's axes follow the volume's in-plane voxel axes (orthonormalised), so a box drawn on an
    oblique volume is the exact voxel rectangle, not its axis-aligned hull.
    """
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    node_from_ijk = _node_from_ijk(box, ijk_to_world)
    a = node_from_ijk[:3, :3]
    ax, ay = axis.in_plane_axes
    step_x, step_y, step_s = (float(np.linalg.norm(a[:, k])) for k in (ax, ay, axis.axis))
    ux = a[:, ax] / step_x
    uy = a[:, ay] - ux * float(ux @ a[:, ay])
    uy /= np.linalg.norm(uy)
    uz = np.cross(ux, uy)
    centre_ijk = axis.stack_to_ijk(np.array([key_slice, (x0 + x1) / 2.0, (y0 + y1) / 2.0]))
    object_to_node = np.eye(4)
    object_to_node[:3, 0], object_to_node[:3, 1], object_to_node[:3, 2] = ux, uy, uz
    object_to_node[:3, 3] = apply(node_from_ijk, centre_ijk)
    box.SetAndObserveObjectToNodeMatrix(vtk_from_matrix(object_to_node))
    box.SetSize((x1 - x0) * step_x, (y1 - y0) * step_y, step_s)


def write_class_prompts(
    scene: Any,
    nodes: ClassNodes,
    volume_node: Any,
    class_prompts: Any,
    ijk_to_world: np.ndarray,
    axis: Any,
    source: str,
) -> None:
    """Replace the class's markups with ``class_prompts`` (an sss_lib ``ClassPrompts``).

    Existing box nodes are reused in order, missing ones created, extra ones removed. Sets the
    class's name, colour and provenance from the prompts and ``source``.
    """
    points = nodes.points
    points.RemoveAllControlPoints()
    boxes = [p for p in class_prompts.prompts if p.box is not None]
    while len(nodes.boxes) < len(boxes):
        _new_box_node(scene, nodes, volume_node)
    for extra in list(nodes.boxes[len(boxes):]):
        remove_box_node(scene, nodes, extra)
    for box, prompt in zip(nodes.boxes, boxes):
        write_box(box, ijk_to_world, axis, prompt.key_slice, prompt.box)
    node_from_ijk = _node_from_ijk(points, ijk_to_world)
    confidence: Dict[str, float] = {}
    absent_slices = []
    for prompt in class_prompts.prompts:
        if getattr(prompt, "absent", False):
            absent_slices.append(prompt.key_slice)
            continue
        confidence[str(prompt.key_slice)] = float(prompt.confidence)
        for polarity, xys in ((True, prompt.positive_points), (False, prompt.negative_points)):
            for x, y in xys:
                ijk = axis.stack_to_ijk(np.array([prompt.key_slice, x, y], dtype=float))
                index = points.AddControlPoint(*[float(v) for v in apply(node_from_ijk, ijk)])
                set_point_polarity(points, index, polarity)
    points.SetAttribute(C.ATTR_CONFIDENCE, json.dumps(confidence, sort_keys=True))
    if nodes.absent is not None:
        nodes.absent.RemoveAllControlPoints()
    for s in sorted(set(absent_slices)):
        _add_absent_point(scene, nodes, volume_node, ijk_to_world, axis, s)
    describe_class(nodes, class_prompts.name, tuple(int(v) for v in class_prompts.color))
    nodes.set_source(source)


def clear_class_prompts(scene: Any, nodes: ClassNodes) -> None:
    nodes.points.RemoveAllControlPoints()
    nodes.points.RemoveAttribute(C.ATTR_CONFIDENCE)
    for box in list(nodes.boxes):
        remove_box_node(scene, nodes, box)
    if nodes.absent is not None:
        nodes.absent.RemoveAllControlPoints()


# -- "not on this slice" ---------------------------------------------------------------------------


def slice_index_at(volume_node: Any, axis: Any, world_ras: Sequence[float]) -> int:
    """The slice (along ``axis``) of ``volume_node`` that world point ``world_ras`` lies on, e.g.
    the centre of the slice view showing it: ``sliceNode.GetSliceToRAS()`` column 3."""
    from .geometry import ijk_to_world_ras

    return _slice_of(np.linalg.inv(ijk_to_world_ras(volume_node)), axis, world_ras)


def _slice_of(world_to_ijk: np.ndarray, axis: Any, world: Sequence[float]) -> int:
    """The slice index (rounded) along ``axis`` of a world point."""
    return int(round(float(axis.ijk_to_stack(apply(world_to_ijk, np.asarray(world, dtype=float)))[0])))


def mark_not_on_slice(scene: Any, nodes: ClassNodes, volume_node: Any, axis: Any, slice_index: int) -> Any:
    """Mark ``nodes``' class absent from slice ``slice_index`` along ``axis``; returns its node.

    Adds a control point at the slice's centre to the class's "not on this slice" node (made on
    first use) and marks the class ``"user"``. Does nothing more if the slice is already marked.

    Raises:
        ValueError: the slice is outside the volume, or the class has a box or points on it (a
            class cannot be both prompted and absent on one slice: delete those first).
    """
    from .geometry import ijk_to_world_ras

    ijk_to_world = ijk_to_world_ras(volume_node)
    world_to_ijk = np.linalg.inv(ijk_to_world)
    n_slices = volume_node.GetImageData().GetDimensions()[axis.axis]
    slice_index = int(slice_index)
    if not 0 <= slice_index < n_slices:
        raise ValueError(f"slice {slice_index} is outside the volume (0..{n_slices - 1})")
    snap = snapshot_class(nodes)
    on_slice = [int(round(box_to_stack(m, size, world_to_ijk, axis)[0])) for m, size in snap.boxes]
    on_slice += [_slice_of(world_to_ijk, axis, w) for w, _ in snap.points]
    if slice_index in on_slice:
        raise ValueError(
            f"class '{nodes.name}' has a box or points on slice {slice_index}; delete them before marking "
            "the class 'not on this slice' there"
        )
    if slice_index not in not_on_slice_slices(nodes, world_to_ijk, axis):
        _add_absent_point(scene, nodes, volume_node, ijk_to_world, axis, slice_index)
    describe_class(nodes, nodes.name, nodes.color)
    nodes.set_source(C.SOURCE_USER)
    return nodes.absent


def unmark_not_on_slice(nodes: ClassNodes, volume_node: Any, axis: Any, slice_index: int) -> bool:
    """Remove the class's "not on this slice" marker(s) on ``slice_index``; True if one was there."""
    from .geometry import ijk_to_world_ras

    if nodes.absent is None:
        return False
    world_to_ijk = np.linalg.inv(ijk_to_world_ras(volume_node))
    removed = False
    for i in reversed(range(nodes.absent.GetNumberOfControlPoints())):
        if _slice_of(world_to_ijk, axis, nodes.absent.GetNthControlPointPositionWorld(i)) == int(slice_index):
            nodes.absent.RemoveNthControlPoint(i)
            removed = True
    if removed:
        nodes.set_source(C.SOURCE_USER)
    return removed


def not_on_slice_slices(nodes: ClassNodes, world_to_ijk: np.ndarray, axis: Any) -> List[int]:
    """The slices (sorted, unique) where the class is marked "not on this slice"."""
    return sorted({_slice_of(world_to_ijk, axis, w) for w in _absent_world(nodes)})


def _absent_world(nodes: ClassNodes) -> List[np.ndarray]:
    if nodes.absent is None:
        return []
    node = nodes.absent
    return [np.array(node.GetNthControlPointPositionWorld(i), dtype=float) for i in range(node.GetNumberOfControlPoints())]


def _add_absent_point(scene: Any, nodes: ClassNodes, volume_node: Any, ijk_to_world: np.ndarray, axis: Any,
                      slice_index: int) -> None:
    """One "not on this slice" control point at the centre of slice ``slice_index``."""
    if nodes.absent is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        node.CreateDefaultDisplayNodes()
        node.SetAttribute(C.ATTR_ROLE, ROLE_ABSENT)
        node.SetAttribute(C.ATTR_LABEL, nodes.points.GetAttribute(C.ATTR_LABEL))
        node.SetAttribute(C.ATTR_SOURCE, nodes.source)
        node.SetNodeReferenceID(C.REF_VOLUME, volume_node.GetID())
        _follow_volume_transform(node, volume_node)
        nodes.points.SetNodeReferenceID(REF_ABSENT, node.GetID())
        nodes.absent = node
        describe_class(nodes, nodes.name, nodes.color)
    dims = volume_node.GetImageData().GetDimensions()
    ax, ay = axis.in_plane_axes
    ijk = axis.stack_to_ijk(np.array([slice_index, (dims[ax] - 1) / 2.0, (dims[ay] - 1) / 2.0], dtype=float))
    index = nodes.absent.AddControlPoint(*[float(v) for v in apply(_node_from_ijk(nodes.absent, ijk_to_world), ijk)])
    nodes.absent.SetNthControlPointLabel(index, ABSENT_POINT_LABEL)
    nodes.absent.SetNthControlPointLocked(index, True)  # only its slice matters; dragging it in-plane means nothing


# -- markups -> prompts --------------------------------------------------------------------------


@dataclasses.dataclass
class ClassSnapshot:
    """A class's markups as plain data (world RAS), safe to hand to a worker thread.

    ``boxes``: ``(object-to-world 4x4, full size (3,))`` per placed ROI; ``points``: ``(world xyz,
    positive)`` per placed point; ``confidence``: key slice (text) -> PCSW confidence; ``absent``:
    world xyz of each "not on this slice" marker.
    """

    label: int
    name: str
    color: Color
    source: str
    boxes: List[Tuple[np.ndarray, np.ndarray]]
    points: List[Tuple[np.ndarray, bool]]
    confidence: Dict[str, float]
    absent: List[np.ndarray] = dataclasses.field(default_factory=list)


def snapshot_class(nodes: ClassNodes) -> ClassSnapshot:
    """Copy the class's placed boxes and points out of MRML (main thread)."""
    import slicer

    boxes = [
        (matrix_from_vtk(b.GetObjectToWorldMatrix()), np.array(b.GetSize(), dtype=float)) for b in nodes.defined_boxes()
    ]
    points = []
    p = nodes.points
    for i in range(p.GetNumberOfControlPoints()):
        if p.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue
        points.append((np.array(p.GetNthControlPointPositionWorld(i), dtype=float), point_is_positive(p, i)))
    source = nodes.source if nodes.source in (C.SOURCE_AUTO, C.SOURCE_USER) else C.SOURCE_USER
    return ClassSnapshot(nodes.label, nodes.name, nodes.color, source, boxes, points, _read_confidence(nodes.points),
                         _absent_world(nodes))


def box_to_stack(
    object_to_world: np.ndarray, size: np.ndarray, world_to_ijk: np.ndarray, axis: Any
) -> Tuple[float, Tuple[float, float, float, float]]:
    """``(slice position s, (x0, y0, x1, y1))`` of an ROI, from its 8 world corners.

    A box not aligned with the voxel axes gives the bounding rectangle of its corners on the slice.
    """
    half = np.asarray(size, dtype=float) / 2.0
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    corners_world = apply(object_to_world, signs * half)
    stack = axis.ijk_to_stack(apply(world_to_ijk, corners_world))
    s = float(axis.ijk_to_stack(apply(world_to_ijk, object_to_world[:3, 3]))[0])
    return s, (float(stack[:, 1].min()), float(stack[:, 2].min()), float(stack[:, 1].max()), float(stack[:, 2].max()))


def read_box(box: Any, world_to_ijk: np.ndarray, axis: Any) -> Tuple[float, Tuple[float, float, float, float]]:
    """:func:`box_to_stack` of an ROI node."""
    return box_to_stack(matrix_from_vtk(box.GetObjectToWorldMatrix()), np.array(box.GetSize(), dtype=float), world_to_ijk, axis)


def class_prompts_from_snapshot(snap: ClassSnapshot, world_to_ijk: np.ndarray, axis: Any) -> Optional[Any]:
    """The class as an sss_lib ``ClassPrompts`` along ``axis``, or None if it has no box, no point
    and no "not on this slice" marker.

    Points are grouped by the slice they lie on (rounded); each box starts a group on its key slice.
    Every group becomes one ``SlicePrompt``; each marked slice one ``SlicePrompt.not_on_slice``.

    Raises:
        sss_lib.errors.PromptError: two boxes on one slice, a slice with only negative points, or a
            slice with both a prompt and a "not on this slice" marker.
    """
    from sss_lib.errors import PromptError
    from sss_lib.prompts import ClassPrompts, SlicePrompt

    groups: Dict[int, Dict[str, Any]] = {}

    def group(s: float) -> Dict[str, Any]:
        return groups.setdefault(int(round(s)), {"box": None, "pos": [], "neg": []})

    for object_to_world, size in snap.boxes:
        s, xyxy = box_to_stack(object_to_world, size, world_to_ijk, axis)
        g = group(s)
        if g["box"] is not None:
            raise PromptError(f"class '{snap.name}' has two boxes on slice {int(round(s))}; delete one of them")
        g["box"] = xyxy
    for world, positive in snap.points:
        sxy = axis.ijk_to_stack(apply(world_to_ijk, world))
        group(sxy[0])["pos" if positive else "neg"].append((float(sxy[1]), float(sxy[2])))
    absent = sorted({_slice_of(world_to_ijk, axis, w) for w in snap.absent})
    if not groups and not absent:
        return None
    prompts = [SlicePrompt.not_on_slice(s, source=snap.source) for s in absent]
    for s in sorted(groups):
        g = groups[s]
        if g["box"] is None and not g["pos"]:
            raise PromptError(
                f"class '{snap.name}': slice {s} has only negative points; add a box or a positive point on "
                "that slice, or delete the negative points"
            )
        prompts.append(
            SlicePrompt(
                key_slice=s, box=g["box"], positive_points=g["pos"], negative_points=g["neg"], source=snap.source,
                confidence=snap.confidence.get(str(s), 1.0),
            )
        )
    return ClassPrompts(label=snap.label, name=snap.name, prompts=prompts, color=snap.color)


def read_class_prompts(nodes: ClassNodes, world_to_ijk: np.ndarray, axis: Any) -> Optional[Any]:
    """:func:`class_prompts_from_snapshot` of a class's nodes."""
    return class_prompts_from_snapshot(snapshot_class(nodes), world_to_ijk, axis)


def _read_confidence(points: Any) -> Dict[str, float]:
    try:
        data = json.loads(points.GetAttribute(C.ATTR_CONFIDENCE) or "{}")
        return {str(k): float(v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError):
        return {}
