"""Progress of a training run: JSON lines on stdout for programs, a progress bar on stderr for people.

Every stdout line of a run is one JSON object with the same keys (:data:`FIELDS`) and no prefix;
keys that do not apply to an event are null (or ``{}``). ``schema`` identifies the format, so a
reader can tell these lines from anything else a library prints. Example::

    {"schema": "sss.progress/1", "event": "step", "step": 120, "total_steps": 5000, "epoch": 2,
     "losses": {"total": 0.41, "sup": 0.3, "unsup": 0.11}, "lr": 0.0001, "mask_ratio": 0.73,
     "val_dice": {}, "eta_s": 812.5, "elapsed_s": 20.1, "time": 1767225600.0, "message": "",
     "checkpoint": null}

Events: "start", "step", "val" (``val_dice``: class name -> Dice), "checkpoint" (``checkpoint``:
the file), "stop" (stopped on request; resumable), "done", "error" (``message`` says what).
A non-finite number (NaN loss) is written as null: JSON has no NaN.

:func:`parse_progress_line` reads a line back (GUIs such as SSSTrain); other lines give None.
No torch here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

from ..jsonline import parse_json_object

SCHEMA = "sss.progress/1"
EVENTS = ("start", "step", "val", "checkpoint", "stop", "done", "error")
FIELDS = ("schema", "event", "step", "total_steps", "epoch", "losses", "lr", "mask_ratio", "val_dice",
          "eta_s", "elapsed_s", "time", "message", "checkpoint")


@dataclasses.dataclass
class ProgressRecord:
    """One progress event (see the module docstring for the meaning of each field)."""

    event: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: dict[str, float | None] = dataclasses.field(default_factory=dict)
    lr: float | None = None
    mask_ratio: float | None = None
    val_dice: dict[str, float | None] = dataclasses.field(default_factory=dict)
    eta_s: float | None = None
    elapsed_s: float | None = None
    time: float | None = None
    message: str = ""
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown progress event {self.event!r}; expected one of {EVENTS}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in :data:`FIELDS` order, non-finite numbers as None."""
        return {
            "schema": SCHEMA, "event": self.event, "step": int(self.step), "total_steps": int(self.total_steps),
            "epoch": int(self.epoch), "losses": {str(k): _number(v) for k, v in self.losses.items()},
            "lr": _number(self.lr), "mask_ratio": _number(self.mask_ratio),
            "val_dice": {str(k): _number(v) for k, v in self.val_dice.items()}, "eta_s": _number(self.eta_s),
            "elapsed_s": _number(self.elapsed_s), "time": _number(self.time), "message": str(self.message),
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        return json.dumps(self.to_dict(), separators=(", ", ": "), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProgressRecord":
        """Build from a parsed object; unknown keys are ignored (newer writers may add some)."""
        kwargs = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for key in ("losses", "val_dice"):
            kwargs[key] = dict(kwargs.get(key) or {})
        for key in ("message",):
            kwargs[key] = kwargs.get(key) or ""
        return cls(**kwargs)


def parse_progress_line(line: str) -> ProgressRecord | None:
    """The record on one stdout line, or None when the line is not a progress record."""
    data = parse_json_object(line)
    if data is None or data.get("schema") != SCHEMA or data.get("event") not in EVENTS:
        return None
    try:
        return ProgressRecord.from_dict(data)
    except (TypeError, ValueError):
        return None


class ProgressReporter:
    """Writes every event as a JSON line to ``stream`` and a readable view to ``console``.

    Args:
        total_steps: the run's optimiser steps.
        stream: where JSON lines go (None: ``sys.stdout`` as it is when the reporter is made).
        console: where the readable view goes (None: ``sys.stderr``).
        json_lines / console_view: False turns that output off.
        bar: a tqdm progress bar on ``console`` (None: only when ``console`` is a terminal;
            otherwise a plain line every ~5% of the run).
        history: a JSONL file to which "step" and "val" records are appended (:mod:`.history`);
            :meth:`start` drops the records after the start step, so a resumed run keeps one curve.
        step_every: write "step" records every N steps (and always the last step).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, total_steps: int, *, stream: IO[str] | None = None, console: IO[str] | None = None,
                 json_lines: bool = True, console_view: bool = True, bar: bool | None = None,
                 history: str | Path | None = None, step_every: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total_steps = int(total_steps)
        self.stream = (sys.stdout if stream is None else stream) if json_lines else None
        self.console = (sys.stderr if console is None else console) if console_view else None
        self.history = Path(history) if history is not None else None
        self.step_every = max(1, int(step_every))
        self._clock = clock
        self._bar_wanted = bar
        self._bar: Any = None
        self._t0 = clock()
        self._start_step = 0
        self._epoch = 0
        self._last_console_step = 0

    # -- events -----------------------------------------------------------------------------------

    def start(self, step: int = 0, epoch: int = 0, message: str = "") -> ProgressRecord:
        """The run starts (``step`` > 0: resumes after that step)."""
        from .history import truncate_history

        self._t0 = self._clock()
        self._start_step = int(step)
        self._epoch = int(epoch)
        if self.history is not None:
            truncate_history(self.history, after_step=self._start_step)
        self._open_bar()
        text = message or (f"resuming at step {step + 1}/{self.total_steps}" if step
                           else f"starting: {self.total_steps} steps")
        return self._emit(ProgressRecord("start", step, self.total_steps, epoch, message=text), text)

    def step(self, step: int, losses: dict[str, float], *, lr: float | None = None,
             mask_ratio: float | None = None, epoch: int | None = None) -> ProgressRecord | None:
        """Step ``step`` (1-based) is done; returns the record written (None when skipped by ``step_every``)."""
        if epoch is not None:
            self._epoch = int(epoch)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(_format_losses(losses, lr, mask_ratio), refresh=False)
        if step % self.step_every and step != self.total_steps:
            return None
        record = ProgressRecord("step", step, self.total_steps, self._epoch, dict(losses), lr=lr,
                                mask_ratio=mask_ratio, eta_s=self._eta(step))
        self._append_history(record)
        line = None
        if self._bar is None and self._console_due(step):
            line = (f"step {step}/{self.total_steps} {_format_losses(losses, lr, mask_ratio)} "
                    f"eta {_format_duration(record.eta_s)}")
        return self._emit(record, line)

    def val(self, step: int, val_dice: dict[str, float], message: str = "") -> ProgressRecord:
        """Validation after ``step``: per-class Dice (class name -> Dice in [0, 1])."""
        record = ProgressRecord("val", step, self.total_steps, self._epoch, val_dice=dict(val_dice),
                                eta_s=self._eta(step), message=message)
        self._append_history(record)
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in val_dice.items())
        return self._emit(record, f"validation at step {step}: Dice {shown}" + (f" ({message})" if message else ""))

    def checkpoint(self, step: int, path: str | Path, message: str = "") -> ProgressRecord:
        """A checkpoint was written."""
        record = ProgressRecord("checkpoint", step, self.total_steps, self._epoch, checkpoint=str(path),
                                message=message)
        return self._emit(record, f"checkpoint at step {step}: {path}" + (f" ({message})" if message else ""))

    def stop(self, step: int, message: str = "") -> ProgressRecord:
        """The run stopped on request after ``step``; it can be resumed."""
        text = message or f"stopped after step {step}; resume to continue"
        return self._emit(ProgressRecord("stop", step, self.total_steps, self._epoch, message=text), text, close=True)

    def done(self, step: int, message: str = "") -> ProgressRecord:
        """The run finished."""
        text = message or f"done: {step} steps"
        return self._emit(ProgressRecord("done", step, self.total_steps, self._epoch, message=text), text, close=True)

    def error(self, message: str, step: int = 0) -> ProgressRecord:
        """The run failed; ``message`` says what to do."""
        return self._emit(ProgressRecord("error", step, self.total_steps, self._epoch, message=message),
                          f"error: {message}", close=True)

    def close(self) -> None:
        """Close the progress bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _eta(self, step: int) -> float | None:
        done = step - self._start_step
        if done <= 0:
            return None
        return (self._clock() - self._t0) / done * max(0, self.total_steps - step)

    def _emit(self, record: ProgressRecord, text: str | None, close: bool = False) -> ProgressRecord:
        record.elapsed_s = self._clock() - self._t0
        record.time = time.time()
        if self.stream is not None:
            self.stream.write(record.to_json() + "\n")
            self.stream.flush()
        if text and self.console is not None:
            if self._bar is not None:
                self._bar.write(text, file=self.console)
            else:
                self.console.write(text + "\n")
                self.console.flush()
        if close:
            self.close()
        return record

    def _append_history(self, record: ProgressRecord) -> None:
        if self.history is not None:
            from .history import append_history

            record.elapsed_s = self._clock() - self._t0
            record.time = time.time()
            append_history(self.history, record)

    def _open_bar(self) -> None:
        self.close()
        if self.console is None:
            return
        wanted = self._bar_wanted
        if wanted is None:
            wanted = bool(getattr(self.console, "isatty", lambda: False)())
        if wanted:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self._start_step, file=self.console,
                             dynamic_ncols=True, unit="step", leave=True)

    def _console_due(self, step: int) -> bool:
        every = max(1, self.total_steps // 20)
        if step - self._last_console_step >= every or step == self.total_steps:
            self._last_console_step = step
            return True
        return False


def _number(value: Any) -> float | None:
    """A plain float (numpy scalars and 0-d tensors included), None for None and non-finite values."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt(value: Any) -> str:
    number = _number(value)
    return "n/a" if number is None else f"{number:.4f}"


def _format_losses(losses: dict[str, float], lr: float | None, mask_ratio: float | None) -> str:
    parts = [f"{k} {_fmt(v)}" for k, v in losses.items()]
    if _number(mask_ratio) is not None:
        parts.append(f"mask {float(mask_ratio):.2f}")  # type: ignore[arg-type]
    if _number(lr) is not None:
        parts.append(f"lr {float(lr):.2e}")  # type: ignore[arg-type]
    return " ".join(parts)


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
