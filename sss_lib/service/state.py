"""Everything one running service holds: volumes, models, sessions, runs, the memory budget, and
the housekeeping thread that closes idle sessions."""

from __future__ import annotations

import logging
import threading

from .config import ServiceConfig
from .memory import MemoryBudget
from .models import ModelRegistry, RuntimeCache
from .preload import Preloader
from .runs import Run, RunManager
from .sessions import Session, SessionManager
from .volumes import VolumeStore

log = logging.getLogger(__name__)


class ServiceState:
    """The service's parts, built from a config. ``device`` is the resolved device string."""

    def __init__(self, config: ServiceConfig, device: str) -> None:
        self.config = config
        self.device = device
        self.memory = MemoryBudget(config.memory_budget_bytes)
        self.volumes = VolumeStore()
        self.models = ModelRegistry(config.models_dir)
        self.runtimes = RuntimeCache()
        self.runs = RunManager(after_run=self._after_run if config.prefetch else None)
        self.sessions = SessionManager(volumes=self.volumes, models=self.models, runtimes=self.runtimes,
                                       memory=self.memory, device=device, ttl_s=config.session_ttl_s)
        self.preloader = Preloader(config.preload, runtimes=self.runtimes, models=self.models, device=device)
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        #: False when a worker thread was still busy after its wait at shutdown (read by ``serve``).
        self.stopped_cleanly = True

    def start(self) -> None:
        """Start the housekeeping thread; queue the ``--preload`` items on the device worker."""
        self._janitor = threading.Thread(target=self._housekeeping, name="sss-janitor", daemon=True)
        self._janitor.start()
        if self.preloader.items:
            self.preloader.start(self.runs.worker(self.device))

    def _after_run(self, run: Run) -> None:
        """Embed the session's other slices ahead of the next run (prefetch.py)."""
        from .prefetch import schedule

        schedule(run.session, run.extent, self.runs, self.memory)

    def close_session(self, session: Session) -> None:
        self.runs.forget_session(session)

    def housekeeping_once(self) -> None:
        """Close expired sessions; drop volumes no session uses that were idle for the TTL."""
        for session in self.sessions.expire():
            self.close_session(session)
        for volume_id in self.volumes.drop_unused(self.sessions.volume_ids(), self.config.session_ttl_s):
            log.info("volume %s dropped (unused for the session TTL)", volume_id[:12])

    def _housekeeping(self) -> None:
        period = min(30.0, max(0.2, self.config.session_ttl_s / 4))
        while not self._stop.wait(period):
            try:
                self.housekeeping_once()
            except Exception:  # noqa: BLE001 - housekeeping must never stop
                log.exception("housekeeping failed")

    def shutdown(self) -> None:
        """Cancel every run and stop the threads (the server is stopping)."""
        self._stop.set()
        self.stopped_cleanly = self.runs.shutdown()
        if self._janitor is not None:
            self._janitor.join(5)
