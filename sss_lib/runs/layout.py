"""Where a run keeps its files. Everything of one run lives in one folder::

    <run_dir>/config.json           the RunConfig, written when the run starts
    <run_dir>/checkpoints/last.pt   the latest checkpoint (resume from here)
    <run_dir>/checkpoints/best.pt   the checkpoint with the best validation Dice
    <run_dir>/history.jsonl         step and validation records (the curves)
    <run_dir>/curves.png            the curves, redrawn at each validation
    <run_dir>/STOP                  create it to ask the run to stop cleanly
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of the run in ``root``."""

    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike[str]) -> "RunPaths":
        return cls(Path(run_dir))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def stop_file(self) -> Path:
        return self.root / "STOP"

    def create(self) -> "RunPaths":
        """Make the run folder and its checkpoints folder; returns self."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self
