"""Task models (uploaded, or named from ``--models DIR``) and the backbones and task runtimes built
from them, once per (name, device), shared by every session.

Task-model files are read with :func:`sss_lib.task_model.load_task_model` (a zip of ``.npy``
arrays read without pickle). ``model_id`` is the SHA-256 of the file's bytes, so the same file
uploaded twice, or uploaded and also found in ``--models``, is one model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..task_model import SUFFIX, TaskModel, load_task_model
from .http_errors import not_found

if TYPE_CHECKING:
    from ..auto_segment import TaskRuntime
    from ..backbones.base import Backbone

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ModelEntry:
    model_id: str
    name: str
    model: TaskModel

    def describe(self) -> dict[str, Any]:
        """``{model_id, name, classes: [{label, name, color}], backbone}``."""
        return {
            "model_id": self.model_id,
            "name": self.name,
            "classes": [{"label": c.label, "name": c.name, "color": list(c.color)} for c in self.model.classes],
            "backbone": self.model.backbone.name,
        }


class ModelRegistry:
    """Uploaded task models, and those in ``models_dir`` (by file stem), loaded on first use."""

    def __init__(self, models_dir: Path | None) -> None:
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._by_id: dict[str, ModelEntry] = {}
        self._files: dict[Path, tuple[float, int, str]] = {}  # path -> (mtime, size, model_id)
        self._lock = threading.Lock()

    def add_bytes(self, data: bytes, name: str | None = None) -> ModelEntry:
        """Load an uploaded ``.ssstask`` file's bytes.

        Raises:
            ApiError: 422 ``bad_model`` when the bytes are not a usable task model.
        """
        model_id = hashlib.sha256(data).hexdigest()
        with self._lock:
            known = self._by_id.get(model_id)
        if known is not None:
            return known
        fd, tmp = tempfile.mkstemp(prefix="sss-upload-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            model = load_task_model(tmp)  # TaskModelError -> 422 bad_model (http_errors)
        finally:
            os.unlink(tmp)
        entry = ModelEntry(model_id, name or f"upload-{model_id[:12]}", model)
        with self._lock:
            return self._by_id.setdefault(model_id, entry)

    def named(self) -> list[ModelEntry]:
        """The models in ``models_dir`` (loading new or changed files; unreadable ones are logged and skipped)."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        out = []
        for path in sorted(self.models_dir.glob(f"*{SUFFIX}")):
            try:
                out.append(self._load_file(path))
            except Exception as e:  # noqa: BLE001 - one bad file must not hide the others
                log.warning("skipping task model %s: %s", path, e)
        return out

    def _load_file(self, path: Path) -> ModelEntry:
        st = path.stat()
        with self._lock:
            seen = self._files.get(path)
            if seen is not None and seen[:2] == (st.st_mtime, st.st_size) and seen[2] in self._by_id:
                return self._by_id[seen[2]]
        data = path.read_bytes()
        model_id = hashlib.sha256(data).hexdigest()
        entry = ModelEntry(model_id, path.stem, load_task_model(path))
        with self._lock:
            self._files[path] = (st.st_mtime, st.st_size, model_id)
            entry = self._by_id.setdefault(model_id, entry)
            if entry.name.startswith("upload-"):
                entry.name = path.stem
            return entry

    def all(self) -> list[ModelEntry]:
        """Every model known now (uploaded and named)."""
        named = self.named()
        ids = {e.model_id for e in named}
        with self._lock:
            uploaded = [e for e in self._by_id.values() if e.model_id not in ids]
        return named + uploaded

    def resolve(self, ref: str) -> ModelEntry:
        """A model by ``model_id`` or by name (a file stem in ``models_dir``, or an upload's name).

        Raises:
            ApiError: 404 ``unknown_model``.
        """
        with self._lock:
            entry = self._by_id.get(ref)
        if entry is not None:
            return entry
        candidates = self.all()
        for e in candidates:
            if e.name == ref:
                return e
        names = ", ".join(sorted(e.name for e in candidates)) or "none"
        raise not_found("model", ref, f"upload the .ssstask file (POST /v1/models) or name a model the "
                        f"server offers (available: {names})")


class RuntimeCache:
    """Backbones per (name, device) and task runtimes per (model_id, device), built once.

    A task runtime gets a backbone of its own: loading a task model replaces the backbone's
    prompt encoder and mask decoder, so it cannot be the one the prompt sessions use.
    """

    def __init__(self) -> None:
        self._backbones: dict[tuple[str, str], "Backbone"] = {}
        self._runtimes: dict[tuple[str, str], "TaskRuntime"] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def _key_lock(self, *key: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(key, threading.Lock())  # type: ignore[arg-type]

    def backbone(self, name: str, device: str) -> "Backbone":
        """The backbone ``name`` (already resolved, not "auto") on ``device``."""
        from ..backbones.registry import build_backbone

        with self._key_lock("backbone", name, device):
            if (name, device) not in self._backbones:
                log.info("building backbone %s on %s", name, device)
                self._backbones[(name, device)] = build_backbone(name, device=device)
            return self._backbones[(name, device)]

    def task_runtime(self, entry: ModelEntry, device: str) -> "TaskRuntime":
        """The task model ``entry`` ready to run on ``device``."""
        from ..auto_segment import TaskRuntime

        with self._key_lock("runtime", entry.model_id, device):
            if (entry.model_id, device) not in self._runtimes:
                log.info("building task model %s on %s", entry.name, device)
                self._runtimes[(entry.model_id, device)] = TaskRuntime.from_task_model(
                    entry.model, device=device, source=entry.name)
            return self._runtimes[(entry.model_id, device)]

    def backbone_names(self) -> list[str]:
        return sorted({name for name, _ in self._backbones})

