"""The run's history: its "step" and "val" progress records, one JSON object per line in a file of
the run folder (``history.jsonl``), so a resumed run keeps and extends its whole curve.

Robust to a kill: a half-written last line is skipped on reading and dropped by the next
:func:`truncate_history` (which every :meth:`ProgressReporter.start` runs). No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .progress import ProgressRecord, parse_progress_line


def append_history(path: str | os.PathLike[str], record: ProgressRecord) -> None:
    """Append ``record`` as one line (creating the file and its folder)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as f:
        # A kill mid-append leaves a line without its newline; never glue a record onto it.
        f.seek(0, os.SEEK_END)
        prefix = b""
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = b"\n"
        f.write(prefix + record.to_json().encode("utf-8") + b"\n")
        f.flush()


def read_history(path: str | os.PathLike[str]) -> list[ProgressRecord]:
    """The records in the file, in order (empty when the file does not exist); damaged lines are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, encoding="utf-8", errors="replace") as f:
        return [r for r in (parse_progress_line(line) for line in f) if r is not None]


def truncate_history(path: str | os.PathLike[str], after_step: int) -> int:
    """Drop the records of steps after ``after_step`` (written after the checkpoint a run resumes
    from) and any damaged line; rewrites the file atomically. Returns how many records were dropped."""
    p = Path(path)
    if not p.is_file():
        return 0
    records = read_history(p)
    kept = [r for r in records if r.step <= after_step]
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(r.to_json() + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return len(records) - len(kept)
