"""Training of task models (SSS_METHOD.md section 4).

* :func:`run_training` (:mod:`.semisup_loop`): the run behind ``python -m sss_lib train`` — the
  training contract's run folder, atomic checkpoints, exact ``--resume``, stop requests, JSON-lines
  progress, data-parallel ``torchrun``; supervised, or semi-supervised with unlabeled data (EMA
  teacher, PCSW prompts, pseudo-labels, strong views, CutMix, DFE). Settings: :class:`SemiSupConfig`.
* :func:`train_task_model` (:mod:`.loop`): a supervised run in one call, without a run folder
  (tests, benchmarks, scripts).

Both train the coarse head and the backbone's prompt encoder + mask decoder on cached embeddings,
validate with the full Auto-segment pipeline and write a task-model file. Importing this package
does not import torch; calling either function does.

(The package is not called ``training``: sam2 installs a top-level package of that name.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TrainConfig, TrainEvent, TrainResult, ValidationRecord
from .samples import PromptJitter
from .semisup_config import SemiSupConfig, StrongViewSettings

if TYPE_CHECKING:
    from .semisup_loop import RunOutcome

__all__ = ["PromptJitter", "SemiSupConfig", "StrongViewSettings", "TrainConfig", "TrainEvent", "TrainResult",
           "ValidationRecord", "run_training", "train_task_model"]


def train_task_model(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """See :func:`sss_lib.trainer.loop.train_task_model` (imported on first call: it needs torch)."""
    from .loop import train_task_model as run

    return run(config, **kwargs)


def run_training(config: SemiSupConfig, **kwargs: Any) -> "RunOutcome":
    """See :func:`sss_lib.trainer.semisup_loop.run_training` (imported on first call: it needs torch)."""
    from .semisup_loop import run_training as run

    return run(config, **kwargs)
