"""Run long work (model loading, embedding, propagation) on a worker thread; the GUI polls a queue.

Only the main thread may touch MRML or Qt, so the work function gets plain inputs (numpy arrays,
sss_lib objects) and reports through a thread-safe queue that the panel drains with a QTimer.
Cancel sets a flag that the work polls between slices; nothing is written to the scene until the
main thread takes the finished result.
"""

import dataclasses
import queue
import threading
import traceback
from typing import Any, Callable, List, Optional

# Message kinds put on the queue.
PROGRESS = "progress"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclasses.dataclass
class Message:
    """One report from the worker.

    ``kind`` is one of PROGRESS (``fraction`` in 0..1 or None when unknown, ``text``), DONE
    (``value`` = what the work returned), FAILED (``error`` = the exception, ``text`` = traceback)
    or CANCELLED.
    """

    kind: str
    text: str = ""
    fraction: Optional[float] = None
    value: Any = None
    error: Optional[BaseException] = None


# work(report, should_cancel) -> value; report(text, fraction) may be called from the worker thread.
Work = Callable[[Callable[[str, Optional[float]], None], Callable[[], bool]], Any]


class BackgroundRun:
    """One run of ``work`` on a daemon thread.

    Args:
        work: the function to run; it must raise ``sss_lib.errors.Cancelled`` (or any exception whose
            class is named ``Cancelled``) when ``should_cancel()`` turns true.
    """

    def __init__(self, work: Work, name: str = "SSS worker") -> None:
        self._work = work
        self._queue: "queue.Queue[Message]" = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.finished = False

    def start(self) -> "BackgroundRun":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next check; the run then ends with a CANCELLED message."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def poll(self) -> List[Message]:
        """Messages since the last poll, oldest first (main thread)."""
        out = []
        while True:
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                return out
            if msg.kind in (DONE, FAILED, CANCELLED):
                self.finished = True
            out.append(msg)

    def wait(self, timeout: Optional[float] = None) -> List[Message]:
        """Block until the run ends and return all its messages (tests, scripts)."""
        self.join(timeout)
        return self.poll()

    def _report(self, text: str, fraction: Optional[float] = None) -> None:
        self._queue.put(Message(PROGRESS, text=text, fraction=fraction))

    def _main(self) -> None:
        try:
            value = self._work(self._report, self._cancel.is_set)
        except BaseException as e:  # noqa: BLE001 - everything must reach the main thread
            if type(e).__name__ == "Cancelled" or (self._cancel.is_set() and isinstance(e, KeyboardInterrupt)):
                self._queue.put(Message(CANCELLED, text=str(e)))
            else:
                self._queue.put(Message(FAILED, text=traceback.format_exc(), error=e))
            return
        if self._cancel.is_set():
            # The work finished before it noticed the flag: honour the cancel, drop the result.
            self._queue.put(Message(CANCELLED, text="cancelled"))
            return
        self._queue.put(Message(DONE, value=value))
