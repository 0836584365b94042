"""A polite stop: the run finishes its current step, saves a checkpoint and exits cleanly.

A :class:`StopRequest` is set by SIGTERM or SIGINT (Ctrl+C), by the appearance of a stop file, or
by :meth:`StopRequest.request` (e.g. from a GUI thread). The training loop polls it between steps
(:attr:`StopRequest.requested`). A second Ctrl+C raises ``KeyboardInterrupt`` at once, for a run
that does not reach a clean point.

The stop file is, in order: the ``stop_file`` argument, ``$SSS_STOP_FILE``, ``<run_dir>/STOP``.
Creating it (any content) asks the run to stop; a GUI that cannot send signals (Windows) uses it.
No torch here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_FILE_ENV = "SSS_STOP_FILE"


class StopRequest:
    """Whether the run has been asked to stop, and why.

    Args:
        run_dir: the run folder (its ``STOP`` file is watched unless another is named).
        stop_file: the file to watch, overriding ``$SSS_STOP_FILE`` and ``run_dir``.
        clear_stale: delete a stop file that already exists (left by the previous, stopped run,
            it would end a resumed run at once).

    Use as a context manager (installs the signal handlers and restores the previous ones), or
    call :meth:`install` / :meth:`uninstall`.
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None = None, *,
                 stop_file: str | os.PathLike[str] | None = None, clear_stale: bool = True) -> None:
        chosen = stop_file or os.environ.get(STOP_FILE_ENV) or (Path(run_dir) / "STOP" if run_dir else None)
        self.stop_file: Path | None = Path(chosen) if chosen else None
        self.reason: str | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._interrupts = 0
        if clear_stale and self.stop_file is not None and self.stop_file.exists():
            log.info("removing the stop file %s left by an earlier run", self.stop_file)
            self.stop_file.unlink(missing_ok=True)

    @property
    def requested(self) -> bool:
        """True once a stop was asked for (checks the stop file; cheap enough for every step)."""
        if not self._event.is_set() and self.stop_file is not None and self.stop_file.exists():
            self.request(f"stop file {self.stop_file}")
        return self._event.is_set()

    def poll(self) -> bool:
        """Same as :attr:`requested`."""
        return self.requested

    def request(self, reason: str = "requested") -> None:
        """Ask the run to stop (thread-safe); the first reason is kept."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()
            log.info("stop requested: %s; the run stops at the next clean point", reason)

    def install(self) -> "StopRequest":
        """Catch SIGINT and SIGTERM (only possible in the main thread; elsewhere logs and does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("StopRequest: not the main thread, signals are not caught (the stop file still works)")
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the signal handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt("second Ctrl+C: stopping without a checkpoint")
        self.request(f"signal {name}")
