"""Training checkpoints that survive a kill at any moment, and load without executing code.

:func:`save_checkpoint` writes to a temporary file in the target's folder, flushes and fsyncs it,
then renames it over the target with ``os.replace`` (atomic on POSIX and Windows) and fsyncs the
folder: at every instant the target is either the previous complete checkpoint or the new one.
A kill mid-save leaves at most a stray ``.<name>.tmp-<pid>-*`` file, removed by the next save once
its process is gone.

Payloads are checked before writing to hold only what ``torch.load(weights_only=True)`` accepts
(tensors, dicts, lists, tuples, str, int, float, bool, None), so a run never finds out at resume
time that its checkpoint cannot be read; :func:`load_checkpoint` always loads with
``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightsError
from .pids import pid_alive

log = logging.getLogger(__name__)

FORMAT = "sss-run-checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)


def checkpoint_payload(*, model: Mapping[str, Any], step: int, epoch: int, config: Mapping[str, Any],
                       optimizer: Mapping[str, Any] | None = None, ema: Mapping[str, Any] | None = None,
                       scheduler: Mapping[str, Any] | None = None, rng: Mapping[str, Any] | None = None,
                       data: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None
                       ) -> dict[str, Any]:
    """The standard payload of a run checkpoint.

    Args:
        model: the student's state dict (or a dict of state dicts, one per trained module).
        step: optimiser steps done (the next step to run is ``step + 1``).
        epoch: the epoch the run is in.
        config: the run's configuration as plain JSON types (``RunConfig.to_dict()``).
        optimizer / ema / scheduler: their ``state_dict()`` s.
        rng: :func:`sss_lib.runs.rng.capture_rng_state` (None: captured now, without named generators).
        data: the data order's state (e.g. the epoch's permutation as a tensor and the position in it).
        extra: anything else of plain types (best validation score, ...).
    """
    from .rng import capture_rng_state

    return {
        "format": FORMAT, "version": VERSION, "step": int(step), "epoch": int(epoch), "config": dict(config),
        "model": model, "optimizer": optimizer, "ema": ema, "scheduler": scheduler,
        "rng": rng if rng is not None else capture_rng_state(), "data": data, "extra": extra or {},
    }


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (see the module docstring); returns the path.

    Raises:
        TypeError: the payload holds something ``weights_only`` loading would refuse (the message
            names where).
    """
    target = Path(path)
    _check_plain(payload, "payload")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: the target is untouched, and the partial temp file must go.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        WeightsError: the file is missing or unreadable (the message says what to do).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no checkpoint there. Start the run without --resume, or point at the "
                           "run folder's checkpoints/last.pt.")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise WeightsError(f"{p}: the checkpoint cannot be read ({type(exc).__name__}: {exc}). Resume from "
                           "another checkpoint of the run, or start again.") from exc
    if not isinstance(payload, dict):
        raise WeightsError(f"{p}: not a training checkpoint (it holds a {type(payload).__name__}).")
    return payload


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) refuses; "
                    "store it as a tensor, list, dict or str")


def _remove_stale_temps(target: Path) -> None:
    prefix = f".{target.name}.tmp-"
    for stray in target.parent.glob(f"{prefix}*"):
        pid_text = stray.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and pid_alive(int(pid_text)):
            continue  # another live process is writing it
        stray.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted save", stray)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; Windows cannot open a folder for fsync.
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
