"""Prompts as markups: one point list and one or more ROI boxes per class, and back.

A class (one sss_lib ``ClassPrompts``) lives in the scene as

* a ``vtkMRMLMarkupsFiducialNode`` (the *points node*, the class's record): attributes give the class
  label, name, colour and provenance; node references point to the prompted volume and to the boxes;
  each control point is a prompt point whose description is ``"positive"`` or ``"negative"`` (saved
  in ``.mrk.json``, so the polarity survives save/load), label ``+``/``-`` and, for colour, the
  "selected" flag (selected = positive: class colour; unselected = negative: darker);
* zero or more ``vtkMRMLMarkupsROINode`` (the *box nodes*): one XYXY box on one key slice each,
  oriented along the volume's voxel axes so an oblique volume's boxes stay tight.

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


@dataclasses.dataclass
class ClassNodes:
    """The markups of one class. ``boxes`` may be empty or hold undefined (not yet placed) ROIs."""

    points: Any
    boxes: List[Any]

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
        return [self.points] + list(self.boxes)

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
        found.append(ClassNodes(node, [b for b in boxes if b is not None]))
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
    for prompt in class_prompts.prompts:
        confidence[str(prompt.key_slice)] = float(prompt.confidence)
        for polarity, xys in ((True, prompt.positive_points), (False, prompt.negative_points)):
            for x, y in xys:
                ijk = axis.stack_to_ijk(np.array([prompt.key_slice, x, y], dtype=float))
                index = points.AddControlPoint(*[float(v) for v in apply(node_from_ijk, ijk)])
                set_point_polarity(points, index, polarity)
    points.SetAttribute(C.ATTR_CONFIDENCE, json.dumps(confidence, sort_keys=True))
    describe_class(nodes, class_prompts.name, tuple(int(v) for v in class_prompts.color))
    nodes.set_source(source)


def clear_class_prompts(scene: Any, nodes: ClassNodes) -> None:
    nodes.points.RemoveAllControlPoints()
    nodes.points.RemoveAttribute(C.ATTR_CONFIDENCE)
    for box in list(nodes.boxes):
        remove_box_node(scene, nodes, box)


# -- markups -> prompts --------------------------------------------------------------------------


@dataclasses.dataclass
class ClassSnapshot:
    """A class's markups as plain data (world RAS), safe to hand to a worker thread.

    ``boxes``: ``(object-to-world 4x4, full size (3,))`` per placed ROI; ``points``: ``(world xyz,
    positive)`` per placed point; ``confidence``: key slice (text) -> PCSW confidence.
    """

    label: int
    name: str
    color: Color
    source: str
    boxes: List[Tuple[np.ndarray, np.ndarray]]
    points: List[Tuple[np.ndarray, bool]]
    confidence: Dict[str, float]


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
    return ClassSnapshot(nodes.label, nodes.name, nodes.color, source, boxes, points, _read_confidence(nodes.points))


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
    """The class as an sss_lib ``ClassPrompts`` along ``axis``, or None if it has no box and no point.

    Points are grouped by the slice they lie on (rounded); each box starts a group on its key slice.
    Every group becomes one ``SlicePrompt``.

    Raises:
        sss_lib.errors.PromptError: two boxes on one slice, or a slice with only negative points.
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
    if not groups:
        return None
    prompts = []
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
