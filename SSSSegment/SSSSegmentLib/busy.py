"""One busy state per panel: while a step runs (an install, an export, a run), the widgets that must
not start a second one are disabled, and a second click that still arrives does nothing.

Qt delivers clicks queued while a blocking step pumps events (``processEvents`` in an install or an
export), so disabling the buttons alone is not enough: every handler asks :meth:`BusyState.begin`
first and gives up when the panel is busy. Every ending (done, failed, cancelled, an exception)
calls :meth:`BusyState.end`. Qt-free and Python 3.9 compatible (SSS Train uses it too).
"""

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence


class BusyState:
    """The busy flag of one panel.

    Args:
        ui: the panel's widgets (``slicer.util.childWidgetVariables``), looked up by name.
        names: the widgets disabled while busy (they must exist in the panel's .ui file).
        on_change: called after the state changes (the panel recomputes its buttons there).
    """

    def __init__(self, ui: Any, names: Sequence[str], on_change: Optional[Callable[[], None]] = None) -> None:
        self.ui = ui
        self.names = list(names)
        self.on_change = on_change
        self.what = ""  # what the panel is busy with ("" when idle)

    @property
    def active(self) -> bool:
        return bool(self.what)

    def begin(self, what: str) -> bool:
        """Become busy with ``what``; False (and nothing changes) when already busy."""
        if self.active:
            return False
        self.what = what or "busy"
        self._changed()
        return True

    def end(self) -> None:
        """Back to idle (idempotent): the busy widgets are enabled again, then the panel's own rules
        (``on_change``) decide which of them stay disabled."""
        if not self.active:
            return
        self.what = ""
        for name in self.names:
            getattr(self.ui, name).enabled = True
        self._changed()

    def apply(self) -> None:
        """Disable the busy widgets if busy (call last in the panel's button update)."""
        if not self.active:
            return
        for name in self.names:
            getattr(self.ui, name).enabled = False

    @contextlib.contextmanager
    def hold(self, what: str) -> Iterator[bool]:
        """``with busy.hold("export") as started:`` runs the block busy; ``started`` is False (and the
        block should do nothing) when the panel was busy already. Ends busy however the block ends."""
        started = self.begin(what)
        try:
            yield started
        finally:
            if started:
                self.end()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
        self.apply()
