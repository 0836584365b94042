"""Segmentation sessions of the service: one volume with a backbone (prompts) or a task model (task).

A prompts session wraps a :class:`~sss_lib.engine.SegmentationSession`, a task session an
:class:`~sss_lib.auto_segment.AutoSegmentSession`; both keep per-class results between runs, so a
re-run recomputes only the classes whose prompts changed. The session also keeps the label map of
its last completed run, against which the next run's result patch is computed (see runs.py).

Sessions idle longer than the TTL are closed (never while a run of theirs is queued or running);
a request for one answers 404 ``unknown_session``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..preprocess import Preprocessing
from ..volume import SliceAxis, Volume, axis_from_name
from .http_errors import ApiError, not_found
from .memory import MemoryBudget, SessionStore
from .models import ModelEntry, ModelRegistry, RuntimeCache
from .volumes import VolumeStore

if TYPE_CHECKING:
    from ..auto_segment import AutoSegmentSession, TaskRuntime
    from ..engine import SegmentationSession
    from .runs import Run

log = logging.getLogger(__name__)

AXIS_NAMES = "ijk"
#: How many completed runs per session keep their full label map (for ``result?full=1``).
KEEP_FULL_RESULTS = 2


@dataclasses.dataclass
class SessionRequest:
    """What ``POST /v1/sessions`` asks for (validated by the route's schema)."""

    volume_id: str
    backbone: str = "auto"
    task_model: str | None = None
    slice_axis: str = "auto"
    modality: Literal["auto", "CT", "MR", "other"] = "auto"
    window: tuple[float, float] | None = None


@dataclasses.dataclass(eq=False)
class Session:
    """One open session. ``engine`` runs prompts; ``auto`` (task sessions) wraps it."""

    session_id: str
    kind: Literal["prompts", "task"]
    volume_id: str
    volume: Volume
    backbone_name: str
    device: str
    engine: "SegmentationSession"
    store: SessionStore
    auto: "AutoSegmentSession | None" = None
    runtime: "TaskRuntime | None" = None  # the shared runtime (task sessions)
    model: ModelEntry | None = None
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    labels: np.ndarray | None = None  # label map of the last completed run, [k, j, i]
    labels_run_id: str | None = None
    active_runs: int = 0
    closed: bool = False
    prefetch_plan: int = 0  # bumped by each plan of embeddings ahead (prefetch.py); older plans stop
    prefetched: int = 0  # slice embeddings computed ahead of need
    recent: "collections.deque[Run]" = dataclasses.field(default_factory=lambda: collections.deque())

    @property
    def slice_axis(self) -> SliceAxis:
        return self.engine.slice_axis

    @property
    def stack_shape(self) -> list[int]:
        return [int(v) for v in self.engine.stack_shape]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"session_id": self.session_id, "kind": self.kind,
                               "slice_axis": AXIS_NAMES[self.slice_axis.axis], "stack_shape": self.stack_shape,
                               "backbone": self.backbone_name, "volume_id": self.volume_id}
        if self.model is not None:
            out["model_id"] = self.model.model_id
        return out

    def commit(self, run: "Run", labels: np.ndarray) -> None:
        """``labels`` of the completed ``run`` become the session's; old runs drop their full maps."""
        self.labels, self.labels_run_id = labels, run.run_id
        self.recent.append(run)
        while len(self.recent) > KEEP_FULL_RESULTS:
            self.recent.popleft().labels = None


class SessionManager:
    """Open sessions (thread-safe)."""

    def __init__(self, *, volumes: VolumeStore, models: ModelRegistry, runtimes: RuntimeCache,
                 memory: MemoryBudget, device: str, ttl_s: float) -> None:
        self.volumes, self.models, self.runtimes, self.memory = volumes, models, runtimes, memory
        self.device = device
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -- open / get / close ------------------------------------------------------------------------
    def open(self, request: SessionRequest) -> Session:
        """Open a session; builds (or reuses) the backbone or task runtime. Runs in a worker thread
        of the web server, never on the event loop.

        Raises:
            ApiError: unknown volume or model (404); a bad backbone name, axis or window (422);
            a task model with settings of its own overridden (422). Library errors (weights
            missing, device absent) are mapped by :func:`http_errors.from_library_error`.
        """
        stored = self.volumes.get(request.volume_id)
        volume = stored.volume
        store = self.memory.session_store()
        if request.task_model is not None:
            session = self._open_task(request, volume, store)
        else:
            session = self._open_prompts(request, volume, store)
        with self._lock:
            self._sessions[session.session_id] = session
        log.info("session %s opened: %s on volume %s, %s", session.session_id, session.kind,
                 request.volume_id[:12], session.backbone_name)
        return session

    def _open_prompts(self, request: SessionRequest, volume: Volume, store: SessionStore) -> Session:
        from ..backbones.registry import resolve_backbone_name
        from ..engine import SegmentationSession

        name = resolve_backbone_name(request.backbone, self.device.split(":")[0])  # InputError -> 422
        axis = axis_from_name(request.slice_axis, volume)
        window = tuple(request.window) if request.window is not None else (-1000.0, 1000.0)
        if window[0] >= window[1]:
            raise ApiError(422, "bad_input", f"window {list(window)} is empty: give [low, high] with low < high")
        prep = Preprocessing(modality=request.modality, window=window)  # type: ignore[arg-type]
        backbone = self.runtimes.backbone(name, self.device)
        engine = SegmentationSession(volume, backbone, slice_axis=axis, preprocessing=prep, store=store)  # type: ignore[arg-type]
        return Session(_new_id(), "prompts", request.volume_id, volume, name, self.device, engine, store)

    def _open_task(self, request: SessionRequest, volume: Volume, store: SessionStore) -> Session:
        from ..auto_segment import AutoSegmentSession

        entry = self.models.resolve(str(request.task_model))
        model_backbone = entry.model.backbone.name
        if request.backbone not in ("auto", model_backbone):
            raise ApiError(422, "bad_input", f"task model {entry.name!r} runs on {model_backbone}, not "
                           f"{request.backbone}: leave backbone unset (or 'auto') for a task model")
        model_axis = entry.model.preprocessing.slice_axis
        if request.slice_axis != "auto" and model_axis != "auto" and request.slice_axis != model_axis:
            raise ApiError(422, "bad_input", f"task model {entry.name!r} slices along {model_axis}: "
                           "leave slice_axis unset (or 'auto') for a task model")
        if request.modality != "auto" or request.window is not None:
            raise ApiError(422, "bad_input", f"task model {entry.name!r} has its own intensity settings: "
                           "leave modality and window unset for a task model")
        runtime = self.runtimes.task_runtime(entry, self.device)
        auto = AutoSegmentSession(volume, runtime, store=store)  # type: ignore[arg-type]
        return Session(_new_id(), "task", request.volume_id, volume, model_backbone, self.device, auto.engine,
                       store, auto=auto, runtime=runtime, model=entry)

    def get(self, session_id: str) -> Session:
        """The session, marked used. Raises: ApiError 404 ``unknown_session``."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and self._expired(session, time.monotonic()):
                del self._sessions[session_id]
                session.closed = True
                log.info("session %s expired", session_id)
                session = None
            if session is None:
                raise not_found("session", session_id, "it expired or never existed: upload the volume "
                                "again and open a session (POST /v1/volumes, POST /v1/sessions)")
            session.last_used = time.monotonic()
            return session

    def close(self, session_id: str) -> Session:
        """Forget a session. Raises: ApiError 404 ``unknown_session``."""
        session = self.get(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)
        session.closed = True
        return session

    # -- housekeeping -------------------------------------------------------------------------------
    def _expired(self, session: Session, now: float) -> bool:
        return session.active_runs == 0 and now - session.last_used > self.ttl_s

    def expire(self) -> list[Session]:
        """Close the sessions idle longer than the TTL; returns them."""
        now = time.monotonic()
        with self._lock:
            gone = [s for s in self._sessions.values() if self._expired(s, now)]
            for s in gone:
                del self._sessions[s.session_id]
                s.closed = True
        for s in gone:
            log.info("session %s expired after %.0f s idle", s.session_id, now - s.last_used)
        return gone

    def volume_ids(self) -> set[str]:
        with self._lock:
            return {s.volume_id for s in self._sessions.values()}

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())


def _new_id() -> str:
    return secrets.token_hex(12)

