"""Provenance of prompts: a class becomes "user" as soon as a person edits its markups.

The watcher observes the end of a drag (``PointEndInteractionEvent``, also sent by ROI handles), a
finished placement (``PointPositionDefinedEvent``) and a deletion (``PointRemovedEvent``) on every
node of every class. These events also fire when code writes markups, so the logic wraps its own
writes in :meth:`PromptEditWatcher.paused`.
"""

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import constants as C
from .markups import ClassNodes, apply_pending_polarity


def mark_user(points: Any) -> None:
    """Mark the class of ``points`` (its points node and boxes) as edited by the user."""
    nodes = [points] + [points.GetNthNodeReference(C.REF_BOX, i) for i in range(points.GetNumberOfNodeReferences(C.REF_BOX))]
    for node in nodes:
        if node is not None:
            node.SetAttribute(C.ATTR_SOURCE, C.SOURCE_USER)
    # A user prompt is certain by definition (SlicePrompt.confidence is 1.0 for user prompts).
    points.RemoveAttribute(C.ATTR_CONFIDENCE)


class PromptEditWatcher:
    """Observes class markups and marks a class "user" when it is edited outside :meth:`paused`.

    Args:
        on_edit: called with the class label after a class was marked, e.g. to refresh the panel.
    """

    def __init__(self, on_edit: Optional[Callable[[int], None]] = None) -> None:
        self.on_edit = on_edit
        self._pause_depth = 0
        self._observations: List[tuple] = []  # (node, tag)
        self._points_of: Dict[str, Any] = {}  # observed node ID -> its class's points node

    @property
    def events(self) -> List[int]:
        import slicer

        m = slicer.vtkMRMLMarkupsNode
        return [m.PointEndInteractionEvent, m.PointPositionDefinedEvent, m.PointRemovedEvent]

    def watch(self, classes: List[ClassNodes]) -> None:
        """Observe ``classes`` (replacing whatever was observed before)."""
        self.unwatch_all()
        for c in classes:
            for node in c.all_nodes():
                self._points_of[node.GetID()] = c.points
                for event in self.events:
                    # VTK names custom MRML events "NoEvent" in the callback: bind the id instead.
                    tag = node.AddObserver(event, lambda caller, _name, eid=event: self._on_event(caller, eid))
                    self._observations.append((node, tag))

    def unwatch_all(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        self._points_of = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ignore events while code (not a person) writes markups."""
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1

    def _on_event(self, caller: Any, event_id: int) -> None:
        if self._pause_depth:
            return
        import slicer

        points = self._points_of.get(caller.GetID())
        if points is None:
            return
        if caller is points and event_id == slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent:
            with self.paused():
                apply_pending_polarity(points)
        mark_user(points)
        if self.on_edit is not None:
            self.on_edit(int(points.GetAttribute(C.ATTR_LABEL)))

