"""``serve --preload``: build and warm backbones and task models when the service starts.

Without it the first session on a backbone builds it (and a task model's runtime) inside the user's
first run, which on a GPU also pays CUDA's start-up (see :mod:`sss_lib.backbones.warmup`). Each
preloaded item is queued on the device worker at :data:`PRIORITY_PRELOAD`: after any run already
waiting, before background prefetch. It builds through the service's :class:`RuntimeCache`, so the
sessions get the very objects it warmed. ``GET /v1/info`` reports each item's state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..task_model import SUFFIX
from .models import ModelRegistry, RuntimeCache
from .runs import PRIORITY_BACKGROUND, PRIORITY_RUN, DeviceWorker

log = logging.getLogger(__name__)

#: Between a user's run and background prefetch.
PRIORITY_PRELOAD = (PRIORITY_RUN + PRIORITY_BACKGROUND) // 2


def check_preload_names(names: Sequence[str], models_dir: Path | None) -> None:
    """Every name must be a backbone name or a task model in ``models_dir`` (by file stem).

    Raises:
        InputError: an unknown name (the message lists what can be preloaded).
    """
    from ..backbones.registry import BACKBONE_NAMES

    offered = sorted(p.stem for p in models_dir.glob(f"*{SUFFIX}")) if models_dir is not None and models_dir.is_dir() else []
    for name in names:
        if name not in BACKBONE_NAMES and name not in offered:
            models = f"; task models in --models: {', '.join(offered)}" if offered else \
                " (no task models: give --models DIR to preload one by its file name)"
            raise InputError(None, f"--preload {name!r} is neither a backbone nor a task model",
                             f"Preload a backbone ({', '.join(BACKBONE_NAMES)}){models}.")


@dataclasses.dataclass
class PreloadItem:
    """One ``--preload`` name and how far it got."""

    name: str
    state: str = "queued"  # queued -> loading -> ready | failed
    seconds: float | None = None
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Preloader:
    """Builds and warms each named backbone or task model once, on the device worker."""

    def __init__(self, names: Sequence[str], *, runtimes: RuntimeCache, models: ModelRegistry, device: str) -> None:
        self.items = [PreloadItem(n) for n in dict.fromkeys(names)]
        self._runtimes = runtimes
        self._models = models
        self._device = device
        self._lock = threading.Lock()

    def start(self, worker: DeviceWorker) -> None:
        """Queue every item on ``worker`` (returns at once)."""
        for item in self.items:
            worker.submit(PRIORITY_PRELOAD, lambda item=item: self._load(item))

    def describe(self) -> list[dict[str, Any]]:
        """``[{name, state, seconds, error}]``, in the order given."""
        with self._lock:
            return [item.describe() for item in self.items]

    def _set(self, item: PreloadItem, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(item, key, value)

    def _load(self, item: PreloadItem) -> None:
        from ..backbones.registry import BACKBONE_NAMES, resolve_backbone_name
        from ..backbones.warmup import warm_up

        self._set(item, state="loading")
        start = time.perf_counter()
        try:
            if item.name in BACKBONE_NAMES:
                name = resolve_backbone_name(item.name, self._device.split(":")[0])
                backbone = self._runtimes.backbone(name, self._device)
            else:
                entry = self._models.resolve(item.name)
                backbone = self._runtimes.task_runtime(entry, self._device).backbone
            warm_up(backbone)
        except Exception as e:  # noqa: BLE001 - reported through /v1/info; a session will meet it again
            log.warning("preloading %s failed: %s", item.name, e)
            self._set(item, state="failed", error=str(e), seconds=time.perf_counter() - start)
            return
        seconds = time.perf_counter() - start
        log.info("preloaded %s in %.1f s", item.name, seconds)
        self._set(item, state="ready", seconds=seconds)
