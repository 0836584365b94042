"""Provenance of prompts: a class becomes "user" as soon as a person edits its markups, anywhere.

Edits come from the views (drags, clicks), but also from the Markups module's control-point table,
an ROI's centre and size spin boxes, the Python console, or a loaded file. These fire different
events (``PointModifiedEvent``, ``ModifiedEvent``, ``PointAdded/RemovedEvent``,
``PointPositionDefinedEvent``, ``PointEndInteractionEvent``), and so do changes that are not edits
(visibility, selection of a described point, a name, the provenance attribute itself). So the
watcher observes them all and compares a **fingerprint** of what makes the prompt (control-point
positions in the node's own coordinates, their placement status and polarity; an ROI's centre, size
and orientation) with the one it last saw: only a change of the fingerprint marks the class "user".

SSS's own writes happen inside :meth:`PromptEditWatcher.paused`; leaving it takes the new state as
the baseline, so they never look like a user edit. Coordinates are node coordinates, so moving the
volume's parent transform does not count either.
"""

import contextlib
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

from . import constants as C
from .markups import ClassNodes, apply_pending_polarity, point_is_positive

Fingerprint = Tuple[Any, ...]


def mark_user(points: Any) -> None:
    """Mark the class of ``points`` (its points node and boxes) as edited by the user."""
    nodes = [points] + [points.GetNthNodeReference(C.REF_BOX, i) for i in range(points.GetNumberOfNodeReferences(C.REF_BOX))]
    for node in nodes:
        if node is not None:
            node.SetAttribute(C.ATTR_SOURCE, C.SOURCE_USER)
    # A user prompt is certain by definition (SlicePrompt.confidence is 1.0 for user prompts).
    points.RemoveAttribute(C.ATTR_CONFIDENCE)


def _rounded(values: Any) -> Tuple[float, ...]:
    # Rounding to 1e-6 mm keeps float noise of a round trip through VTK from looking like an edit.
    return tuple(round(float(v), 6) for v in values)


def markup_fingerprint(node: Any) -> Fingerprint:
    """What of ``node`` makes a prompt: a tuple that changes exactly when the prompt changes.

    Points node: per control point its position (node coordinates), placement status and polarity.
    ROI node: additionally its centre, size and object-to-node orientation. Display properties,
    names, locks and attributes are left out.
    """
    import slicer

    points = []
    for i in range(node.GetNumberOfControlPoints()):
        status = node.GetNthControlPointPositionStatus(i)
        position = _rounded(node.GetNthControlPointPosition(i)) if status != slicer.vtkMRMLMarkupsNode.PositionUndefined else ()
        polarity = point_is_positive(node, i) if node.GetAttribute(C.ATTR_ROLE) == C.ROLE_POINTS else None
        points.append((status, position, polarity))
    out: Tuple[Any, ...] = (tuple(points),)
    if node.IsA("vtkMRMLMarkupsROINode"):
        matrix = node.GetObjectToNodeMatrix()
        orientation = _rounded(matrix.GetElement(r, c) for r in range(3) for c in range(4))
        out += (_rounded(node.GetCenter()), _rounded(node.GetSize()), orientation)
    return out


class PromptEditWatcher:
    """Observes class markups and marks a class "user" when its prompt changes outside :meth:`paused`.

    Args:
        on_edit: called with the class label when a class became "user", and after every finished
            edit (a drag's end, a placed or removed point) of a "user" class, e.g. to refresh the panel.
    """

    def __init__(self, on_edit: Optional[Callable[[int], None]] = None) -> None:
        self.on_edit = on_edit
        self._pause_depth = 0
        self._observations: List[tuple] = []  # (node, tag)
        self._points_of: Dict[str, Any] = {}  # observed node ID -> its class's points node
        self._nodes: Dict[str, Any] = {}  # observed node ID -> node
        self._fingerprints: Dict[str, Fingerprint] = {}

    @property
    def events(self) -> List[int]:
        import slicer
        import vtk

        m = slicer.vtkMRMLMarkupsNode
        return [
            m.PointModifiedEvent, m.PointAddedEvent, m.PointRemovedEvent, m.PointPositionDefinedEvent,
            m.PointPositionUndefinedEvent, m.PointEndInteractionEvent, vtk.vtkCommand.ModifiedEvent,
        ]

    @property
    def finished_edit_events(self) -> List[int]:
        import slicer

        m = slicer.vtkMRMLMarkupsNode
        return [m.PointEndInteractionEvent, m.PointPositionDefinedEvent, m.PointRemovedEvent]

    def watch(self, classes: List[ClassNodes]) -> None:
        """Observe ``classes`` (replacing whatever was observed before); their state now is the baseline."""
        self.unwatch_all()
        for c in classes:
            for node in c.all_nodes():
                self._points_of[node.GetID()] = c.points
                self._nodes[node.GetID()] = node
                self._fingerprints[node.GetID()] = markup_fingerprint(node)
                for event in self.events:
                    # VTK names custom MRML events "NoEvent" in the callback: bind the id instead.
                    tag = node.AddObserver(event, lambda caller, _name, eid=event: self._on_event(caller, eid))
                    self._observations.append((node, tag))

    def unwatch_all(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        self._points_of = {}
        self._nodes = {}
        self._fingerprints = {}

    def paused(self) -> ContextManager[None]:
        """Ignore changes while code (not a person) writes markups; they become the new baseline."""
        return self._ignoring(rebaseline=True)

    def _quiet(self) -> ContextManager[None]:
        """Ignore events without taking a new baseline (for writes that are part of a user edit)."""
        return self._ignoring(rebaseline=False)

    @contextlib.contextmanager
    def _ignoring(self, rebaseline: bool) -> Iterator[None]:
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if rebaseline and not self._pause_depth:
                self._rebaseline()

    def _rebaseline(self) -> None:
        for node_id, node in self._nodes.items():
            self._fingerprints[node_id] = markup_fingerprint(node)

    def _on_event(self, caller: Any, event_id: int) -> None:
        if self._pause_depth:
            return
        import slicer

        node_id = caller.GetID()
        points = self._points_of.get(node_id)
        if points is None:
            return
        if caller is points and event_id == slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent:
            with self._quiet():  # the placed point's polarity completes the user's edit
                apply_pending_polarity(points)
        fingerprint = markup_fingerprint(caller)
        changed = fingerprint != self._fingerprints.get(node_id)
        self._fingerprints[node_id] = fingerprint
        was_user = points.GetAttribute(C.ATTR_SOURCE) == C.SOURCE_USER
        if changed:
            with self._quiet():  # mark_user's attribute writes are not edits
                mark_user(points)
        notify = (changed and not was_user) or (event_id in self.finished_edit_events and (changed or was_user))
        if notify and self.on_edit is not None:
            self.on_edit(int(points.GetAttribute(C.ATTR_LABEL)))
