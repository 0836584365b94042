"""Run infrastructure a training run can be trusted with: configuration file, atomic checkpoints,
bit-exact RNG capture, clean stopping, progress lines and curves.

- :mod:`.config`: :class:`RunConfig`, JSON in the run folder.
- :mod:`.layout`: :class:`RunPaths`, where each file of a run lives.
- :mod:`.checkpoint`: :func:`save_checkpoint` (atomic), :func:`load_checkpoint` (weights_only).
- :mod:`.rng`: :func:`capture_rng_state` / :func:`restore_rng_state`.
- :mod:`.stop`: :class:`StopRequest` (SIGINT/SIGTERM/stop file).
- :mod:`.progress`: :class:`ProgressReporter`, :func:`parse_progress_line`.
- :mod:`.history` / :mod:`.curves`: the JSONL history and its PNG plot.

The names below are loaded on first use, so ``import sss_lib.runs`` (e.g. by a GUI that only
parses progress lines) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RunConfig": ".config",
    "RunPaths": ".layout",
    "checkpoint_payload": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "capture_rng_state": ".rng",
    "restore_rng_state": ".rng",
    "StopRequest": ".stop",
    "STOP_FILE_ENV": ".stop",
    "ProgressRecord": ".progress",
    "ProgressReporter": ".progress",
    "parse_progress_line": ".progress",
    "append_history": ".history",
    "read_history": ".history",
    "truncate_history": ".history",
    "plot_curves": ".curves",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
