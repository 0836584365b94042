"""Supervised fine-tuning of task models (SSS_METHOD.md section 4, supervised part).

``train_task_model(TrainConfig(...))`` reads a labeled dataset, trains the coarse head and the
backbone's prompt encoder + mask decoder on cached embeddings, validates with the full
Auto-segment pipeline and writes a task-model file. Importing this package does not import torch;
calling :func:`train_task_model` does.

(The package is not called ``training``: sam2 installs a top-level package of that name.)
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, TrainEvent, TrainResult, ValidationRecord
from .samples import PromptJitter

__all__ = ["PromptJitter", "TrainConfig", "TrainEvent", "TrainResult", "ValidationRecord", "train_task_model"]


def train_task_model(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """See :func:`sss_lib.trainer.loop.train_task_model` (imported on first call: it needs torch)."""
    from .loop import train_task_model as run

    return run(config, **kwargs)
