"""Runs: a segment or auto-segment of one session, executed on the session's device worker.

A run is created ``queued`` and answered with its id at once; the device's worker thread executes
runs one at a time (first come, first served), so request handlers never wait for inference.
Progress events are kept on the run for ``GET /v1/runs/{id}`` (long-poll) and ``/stream``.

Cancel is checked after every engine event, i.e. at slice granularity: the engine is a generator
that changes its session only when it reaches its "done" event, so a cancelled (or failed) run
leaves the session exactly as before it. A queued run that is cancelled never starts.

When a run completes, its label map is compared with the session's previous one and the result
is the bounding box of what changed (:func:`sss_lib.service.protocol.label_patch`), with the
metadata the contract lists (``meta_json``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import Cancelled, SSSError
from . import protocol
from .http_errors import ApiError, from_library_error, not_found

if TYPE_CHECKING:
    from ..prompts import PromptSet
    from .sessions import Session

log = logging.getLogger(__name__)

#: Worker priorities: runs first, background work (embeddings ahead of need) when nothing waits.
PRIORITY_RUN = 0
PRIORITY_BACKGROUND = 10

#: What a run computes: ``work(run) -> (labels [k, j, i], meta)``; raises Cancelled when asked to stop.
Work = Callable[["Run"], "tuple[np.ndarray, dict[str, Any]]"]


class Run:
    """One run's state, events and result (thread-safe)."""

    def __init__(self, session: "Session", kind: str, work: Work) -> None:
        self.run_id = secrets.token_hex(12)
        self.session = session
        self.kind = kind
        self.work = work
        self.state = "queued"
        self.events: list[dict[str, Any]] = []
        self.error: dict[str, str] | None = None
        self.cancel_requested = threading.Event()
        self.result_npz: bytes | None = None
        self.labels: np.ndarray | None = None
        self.meta: dict[str, Any] | None = None
        self.extent: tuple[int, int] | None = None  # first and last key slice of the run's prompts
        self.created = time.time()
        self._lock = threading.RLock()  # re-entrant: cancel_all may run in a signal handler

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def ended(self) -> bool:
        return self.state in protocol.RUN_END_STATES

    def add_event(self, stage: str, done: int, total: int, message: str) -> None:
        with self._lock:
            self.events.append({"stage": stage, "done": int(done), "total": int(total), "message": message})

    def set_state(self, state: str, error: dict[str, str] | None = None) -> bool:
        """Move to ``state`` unless already ended; False when it had ended."""
        with self._lock:
            if self.ended:
                return False
            self.state = state
            self.error = error
            return True

    def snapshot(self, after: int = 0) -> dict[str, Any]:
        """``{run_id, state, events (those past index after), next, error?}``."""
        with self._lock:
            out: dict[str, Any] = {"run_id": self.run_id, "state": self.state,
                                   "events": self.events[max(0, after):], "next": len(self.events)}
            if self.error is not None:
                out["error"] = dict(self.error)
            return out

    def event_count(self) -> int:
        with self._lock:
            return len(self.events)

#: How long stopping a worker waits for its current step (a slice, or a slow first model load).
WORKER_STOP_S = 20.0


class DeviceWorker:
    """A thread that executes work for one device, one item at a time, lowest priority value first."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._queue: "queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]]" = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._loop, name=f"sss-worker-{device}", daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[[], None]) -> None:
        self._queue.put((priority, next(self._seq), fn))

    def pending(self, max_priority: int = PRIORITY_RUN) -> int:
        """Items waiting with priority value <= ``max_priority`` (approximate)."""
        with self._queue.mutex:
            return sum(1 for item in self._queue.queue if item[0] <= max_priority and item[2] is not None)

    def stop(self, timeout: float = WORKER_STOP_S) -> bool:
        """Ask the thread to end after its current item; True when it ended within ``timeout``."""
        self._queue.put((-1, -1, None))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            _, _, fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("worker %s: unexpected error", self.device)


class RunManager:
    """Every run of every session, and the device workers that execute them."""

    def __init__(self, after_run: Callable[[Run], None] | None = None) -> None:
        self.after_run = after_run  # called on the worker after each completed run
        self._runs: dict[str, Run] = {}
        self._workers: dict[str, DeviceWorker] = {}
        self._lock = threading.RLock()  # re-entrant: cancel_all may run in a signal handler
        self._closed = False

    def worker(self, device: str) -> DeviceWorker:
        with self._lock:
            if device not in self._workers:
                self._workers[device] = DeviceWorker(device)
            return self._workers[device]

    def submit(self, session: "Session", kind: str, work: Work) -> Run:
        """Queue a run on the session's device; returns at once."""
        run = Run(session, kind, work)
        with self._lock:
            if self._closed:
                raise ApiError(503, "shutting_down", "the service is shutting down: start it again and retry")
            self._runs[run.run_id] = run
            session.active_runs += 1
        self.worker(session.device).submit(PRIORITY_RUN, lambda: self._execute(run))
        log.info("run %s (%s) queued for session %s", run.run_id, kind, session.session_id)
        return run

    def get(self, run_id: str) -> Run:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None:
            raise not_found("run", run_id, "it never existed, or its session was closed or expired; "
                            "open a session and start the run again")
        run.session.last_used = time.monotonic()
        return run

    def cancel(self, run_id: str) -> Run:
        """Ask a run to stop: a queued run ends ``cancelled`` now, a running one at its next slice."""
        run = self.get(run_id)
        run.cancel_requested.set()
        with run._lock:  # noqa: SLF001 - the run's own lock, held briefly
            queued = run.state == "queued"
        if queued:
            run.set_state("cancelled")
        return run

    def forget_session(self, session: "Session") -> None:
        """Cancel the session's runs and forget them (the session was closed or expired)."""
        with self._lock:
            mine = [r for r in self._runs.values() if r.session is session]
            for r in mine:
                del self._runs[r.run_id]
        for r in mine:
            r.cancel_requested.set()

    def active(self) -> list[Run]:
        with self._lock:
            return [r for r in self._runs.values() if not r.ended]

    @property
    def closing(self) -> bool:
        """True once the service is stopping (no new runs)."""
        return self._closed

    def cancel_all(self) -> None:
        """Refuse new runs and ask every run to stop (returns at once; safe in a signal handler)."""
        with self._lock:
            self._closed = True
            runs = list(self._runs.values())
        for r in runs:
            r.cancel_requested.set()
            if r.state == "queued":
                r.set_state("cancelled")

    def shutdown(self) -> bool:
        """:meth:`cancel_all`, then stop the workers (each ends after its current run's next slice).

        Returns False when a worker was still inside a step (e.g. a slow first model load) after its
        wait: the caller must then not let the interpreter finalise under it (see ``serve``)."""
        self.cancel_all()
        with self._lock:
            workers = list(self._workers.values())
        return all([w.stop() for w in workers])

    # -- execution (on the worker thread) -----------------------------------------------------------
    def _execute(self, run: Run) -> None:
        session = run.session
        try:
            if run.cancel_requested.is_set() or not run.set_state("running"):
                run.set_state("cancelled")
                return
            t0 = time.perf_counter()
            try:
                labels, meta = run.work(run)
                finish(run, session, labels, meta, time.perf_counter() - t0)
            except Cancelled:
                run.set_state("cancelled")
                log.info("run %s cancelled; session %s unchanged", run.run_id, session.session_id)
                return
            except SSSError as e:
                err = from_library_error(e)
                run.set_state("failed", {"code": err.code, "message": err.message})
                log.info("run %s failed: %s", run.run_id, e)
                return
            except Exception as e:  # noqa: BLE001 - a bug: report it, keep serving
                log.exception("run %s failed", run.run_id)
                run.set_state("failed", {"code": "internal_error",
                                         "message": f"the run hit an error in the server ({type(e).__name__}: {e}); "
                                                    "see the server's log, and report it if it repeats"})
                return
            run.add_event("done", 1, 1, f"done in {run.meta['seconds']:.1f} s" if run.meta else "done")
            run.set_state("done")
            if self.after_run is not None:
                self.after_run(run)
        finally:
            with self._lock:
                session.active_runs -= 1
            session.last_used = time.monotonic()


# ------------------------------------------------------------------------------------------------
# What runs compute
# ------------------------------------------------------------------------------------------------
def segment_work(prompts: "PromptSet") -> Work:
    """A prompts run: the engine generator, stopped between slices when cancel is asked."""

    def work(run: Run) -> tuple[np.ndarray, dict[str, Any]]:
        session = run.session
        run.extent = key_slice_extent(prompts)
        events = session.engine.run(prompts)
        result = None
        try:
            for event in events:
                if event.result is not None:
                    result = event.result
                    break
                run.add_event(event.stage, event.done, event.total, event.message)
                if run.cancel_requested.is_set():
                    raise Cancelled("run cancelled; the session is as before it")
        finally:
            events.close()  # before "done" this leaves the session untouched
        if result is None:
            raise RuntimeError("the engine ended without a result")
        meta = {"recomputed": result.recomputed, "reused": result.reused,
                "slices_per_class": {str(k): v for k, v in result.slices_per_class.items()},
                "embeddings_computed": int(result.embeddings_computed)}
        return np.ascontiguousarray(result.labels.voxels), meta

    return work


def auto_segment_work(edited: "PromptSet | None", prompt_points: bool | None) -> Work:
    """A task run: coarse head, PCSW (the user's classes from ``edited`` kept), propagation."""

    def work(run: Run) -> tuple[np.ndarray, dict[str, Any]]:
        session = run.session
        auto = session.auto
        assert auto is not None and session.runtime is not None
        if auto.runtime.prompt_points != prompt_points:
            auto.runtime = dataclasses.replace(session.runtime, prompt_points=prompt_points)
            auto._auto = None  # noqa: SLF001 - PCSW's cached prompts depend on prompt_points
        before = session.store.computed

        def progress(event: Any) -> None:
            if event.stage != "done":
                run.add_event(event.stage, event.done, event.total, event.message)

        result = auto.run(edited, progress=progress, should_cancel=run.cancel_requested.is_set)
        run.extent = key_slice_extent(result.prompts)
        labels = np.ascontiguousarray(result.labels.voxels)
        stack = session.slice_axis.to_stack(labels)
        classes = sorted(set(result.prompts.by_label()) | set(result.absent))
        meta = {
            "recomputed": result.recomputed, "reused": result.reused,
            "slices_per_class": {str(lbl): np.flatnonzero((stack == lbl).reshape(stack.shape[0], -1).any(axis=1)).tolist()
                                 for lbl in classes},
            "embeddings_computed": int(session.store.computed - before),
            "prompts": result.prompts.to_json(),
            "pcsw": {str(lbl): pcsw_json(res) for lbl, res in result.pcsw.items()},
            "user_classes": result.user_classes, "absent": result.absent,
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
        }
        rings = getattr(result, "rings", None)  # the ring rule's rebuilt slices, where the library reports them
        if rings:
            meta["rings"] = {str(k): [int(s) for s in v] for k, v in rings.items()}
        from_coarse = getattr(result, "from_coarse", None)  # classes painted from the coarse head
        if from_coarse:
            meta["from_coarse"] = [int(k) for k in from_coarse]
        return labels, meta

    return work


def key_slice_extent(prompts: "PromptSet") -> tuple[int, int] | None:
    """``(first, last)`` key slice of every prompt, or None without prompts."""
    keys = [p.key_slice for c in prompts.classes for p in c.prompts]
    return (min(keys), max(keys)) if keys else None


def pcsw_json(res: Any) -> dict[str, Any]:
    """PCSW's decision for one class (:class:`sss_lib.pcsw.PcswResult`) without its prompt."""
    return {"status": res.status, "reason": res.reason,
            "window": list(res.window) if res.window is not None else None,
            "continuity": res.continuity, "mean_probability": res.mean_probability,
            "volume_mm3": res.volume_mm3, "windows_tried": res.windows_tried}


def changed_labels(old: np.ndarray | None, new: np.ndarray) -> list[int]:
    """Labels (not 0) whose voxel set differs between ``old`` and ``new``; all of ``new``'s when no ``old``."""
    if old is None:
        found = np.unique(new)
    else:
        diff = old != new
        found = np.union1d(np.unique(old[diff]), np.unique(new[diff]))
    return [int(v) for v in found if v != 0]


def voxel_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels.ravel().astype(np.int64))
    return {str(lbl): int(n) for lbl, n in enumerate(counts) if lbl != 0 and n > 0}


def finish(run: Run, session: "Session", labels: np.ndarray, meta: dict[str, Any], seconds: float) -> None:
    """Make the run's result patch against the session's last map, then commit the map to the session."""
    old = session.labels
    start, patch = protocol.label_patch(labels, old)
    meta = dict(meta, seconds=round(seconds, 4), base_run_id=session.labels_run_id,
                changed_labels=changed_labels(old, labels), voxel_counts=voxel_counts(labels))
    run.meta = meta
    run.result_npz = protocol.encode_result(patch, start, meta)
    run.labels = labels
    session.commit(run, labels)


def full_result(run: Run) -> bytes:
    """The whole label map of a completed run (``?full=1``).

    Raises:
        ApiError: 410 ``result_gone`` when the session has moved two runs past it.
    """
    if run.labels is None or run.meta is None:
        raise ApiError(410, "result_gone", f"run {run.run_id}'s full label map is no longer kept (its session "
                       "has newer runs): fetch the latest run's result")
    return protocol.encode_result(run.labels, (0, 0, 0), dict(run.meta, full=True))
