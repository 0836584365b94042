"""Follow a training run from its files: progress records, console lines, the end of the process.

One :class:`RunMonitor` serves the run this panel started (it holds the ``Popen``) and a run it
found when the panel was reopened (it knows the pid from the run-state file) alike. Progress
records come from ``RUN/slicer/stdout.jsonl`` (everything the trainer reports: start, steps,
validations, checkpoints, stop, done, error); for a run started outside Slicer, which has no such
file, from ``RUN/history.jsonl`` (steps and validations). The panel calls :meth:`RunMonitor.poll`
from a timer on the main thread.

The records are parsed with ``sss_lib.runs.progress.parse_progress_line`` (Python 3.10+, imported
when first needed); this file itself is Python 3.9 compatible and Qt-free.
"""

import dataclasses
import os
from typing import Any, List, Optional

from . import constants as C
from .files import FileWatch
from .process import FileTail, console_file, pid_alive, request_stop, stdout_file, stop_file
from .runstate import RunState, read_state

EVENT = "event"
LOG = "log"
FINISHED = "finished"

DONE = "done"
STOPPED = "stopped"
FAILED = "failed"
ENDED = "ended"  # the process is gone without a final report
_OUTCOME = {"done": DONE, "stop": STOPPED, "error": FAILED}

# A reopened panel reads this much of the files' ends: enough for the latest state and log.
ATTACH_BACKLOG_BYTES = 256 * 1024


@dataclasses.dataclass
class RunMessage:
    """One report for the panel.

    ``kind`` EVENT: ``record`` is an ``sss_lib.runs.progress.ProgressRecord``; LOG: ``text`` is a
    console line; FINISHED: the process ended, ``outcome`` is done/stopped/failed/ended and
    ``returncode`` its exit status when this panel started it (else None), ``text`` says it in words.
    """

    kind: str
    record: Any = None
    text: str = ""
    outcome: str = ""
    returncode: Optional[int] = None


class RunMonitor:
    """Follows the run in ``run_dir``.

    Args:
        run_dir: the run folder.
        process: the ``subprocess.Popen`` when this panel started the run (its exit status is then known).
        state: the run-state record (default: read from the run folder).
        backlog: bytes of the existing files to read first (None: all of them; 0: only what comes
            next, for a run just started, whose files may hold earlier runs' lines).
    """

    def __init__(self, run_dir: str, process: Any = None, state: Optional[RunState] = None,
                 backlog: Optional[int] = None) -> None:
        self.run_dir = run_dir
        self.process = process
        self.state = state if state is not None else read_state(run_dir)
        events = stdout_file(run_dir)
        self.source = events if (process is not None or os.path.exists(events)) else os.path.join(run_dir, C.HISTORY_FILE)
        self._events = FileTail(self.source, backlog)
        self._console = FileTail(console_file(run_dir), backlog)
        self.finished = False
        self.last_step: Any = None
        self.last_val: Any = None
        self.terminal: Any = None
        self.stop_requested = False
        self._curves = FileWatch(os.path.join(run_dir, C.CURVES_FILE))

    @property
    def owned(self) -> bool:
        """True when this panel started the process."""
        return self.process is not None

    @property
    def pid(self) -> Optional[int]:
        if self.process is not None:
            return self.process.pid
        return self.state.pid if self.state is not None else None

    def alive(self) -> Optional[bool]:
        """Whether the training process runs: True/False, or None when it cannot be told (no
        run-state file, or the run is on another computer sharing the folder)."""
        if self.process is not None:
            return self.process.poll() is None
        if self.state is not None and self.state.on_this_host():
            return pid_alive(self.state.pid, self.state.started)
        return None

    def stop(self) -> None:
        """Ask the run to stop at its next clean point (stop file)."""
        self.stop_requested = True
        request_stop(self.run_dir)

    def poll(self) -> List[RunMessage]:
        """New reports, oldest first, then FINISHED once the process has ended (last message)."""
        if self.finished:
            return []
        alive = self.alive()  # before reading, so the lines written before the exit are all read
        messages = self._read()
        if self.stop_requested and alive and self.terminal is None and not os.path.exists(stop_file(self.run_dir)):
            request_stop(self.run_dir)  # a trainer starting up removes a stale stop file: ask again
        if alive is False or (alive is None and self.terminal is not None):
            self.finished = True
            messages.append(self._finished_message())
        return messages

    def curves_update(self) -> Optional[str]:
        """``RUN/curves.png`` when it changed since the last call (the panel reloads it), else None."""
        return self._curves.path if self._curves.changed() else None

    def _read(self) -> List[RunMessage]:
        from sss_lib.runs.progress import parse_progress_line

        messages = []
        for line in self._events.read_lines():
            record = parse_progress_line(line)
            if record is None:
                if line.strip():
                    messages.append(RunMessage(LOG, text=line))
                continue
            if record.event == "start":
                self.terminal = None  # a resumed run: earlier final reports no longer apply
            elif record.event == "step":
                self.last_step = record
            elif record.event == "val":
                self.last_val = record
            elif record.event in _OUTCOME:
                self.terminal = record
            messages.append(RunMessage(EVENT, record=record))
        messages += [RunMessage(LOG, text=line) for line in self._console.read_lines()]
        return messages

    def _finished_message(self) -> RunMessage:
        code = self.process.returncode if self.process is not None else None
        if self.terminal is not None:
            outcome = _OUTCOME[self.terminal.event]
        elif code is not None and code != 0:
            outcome = FAILED
        else:
            outcome = ENDED
        return RunMessage(FINISHED, record=self.terminal, outcome=outcome, returncode=code,
                          text=finished_text(outcome, self.terminal, code, self.last_step))


def format_duration(seconds: Optional[float]) -> str:
    """``"1 h 05 min"``, ``"4 min 10 s"``, ``"35 s"``; ``"?"`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, float(seconds))))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def _value(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def fraction(record: Any) -> Optional[float]:
    """How far the run is (0..1) after ``record``, or None when its length is unknown."""
    if record is None or not record.total_steps:
        return None
    return min(1.0, max(0.0, record.step / record.total_steps))


def describe(record: Any) -> str:
    """One progress record as the panel's status line."""
    e = record.event
    if e == "step":
        losses = record.losses
        shown = f"loss {_value(losses['total'])}" if "total" in losses else ", ".join(f"{k} {_value(v)}" for k, v in losses.items())
        parts = [f"Step {record.step}/{record.total_steps}", shown]
        if record.mask_ratio is not None:
            parts.append(f"trusted pixels {record.mask_ratio:.0%}")
        parts.append(f"ETA {format_duration(record.eta_s)}")
        return "  |  ".join(p for p in parts if p)
    if e == "val":
        dice = ", ".join(f"{k} {_value(v)}" for k, v in record.val_dice.items())
        return f"Validation at step {record.step}: Dice {dice}" + (f" ({record.message})" if record.message else "")
    if e == "checkpoint":
        return f"Checkpoint saved at step {record.step}."
    if e == "error":
        return f"Training failed: {record.message}"
    return record.message or f"{e} at step {record.step}"


def finished_text(outcome: str, terminal: Any, returncode: Optional[int], last_step: Any) -> str:
    """What the panel says when the process has ended."""
    step = terminal.step if terminal is not None else (last_step.step if last_step is not None else None)
    at = f" at step {step}" if step is not None else ""
    if outcome == DONE:
        return f"Training finished{at}. 'Use this model' opens it in SSS Segment."
    if outcome == STOPPED:
        return f"Training stopped{at} with a checkpoint. 'Resume' continues it."
    if outcome == FAILED:
        message = terminal.message if terminal is not None and terminal.message else "see the log below"
        code = f" (exit code {returncode})" if returncode is not None else ""
        return f"Training failed{at}{code}: {message}"
    return f"The training process ended{at} without a final report; see the log. 'Resume' continues from the last checkpoint."
