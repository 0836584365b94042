"""Training jobs of the SSS service: a persistent queue of ``train`` subprocesses.

One folder per job under ``JOBS = <jobs_dir>/jobs``::

    JOBS/<job_id>/job.json        the job's record (written atomically at every change)
    JOBS/<job_id>/run/            the run folder of the unchanged trainer (config, checkpoints,
                                  history.jsonl, curves.png, model.ssstask, STOP)
    JOBS/<job_id>/progress.jsonl  the trainer's stdout: its JSON progress lines, every attempt
    JOBS/<job_id>/console.log     the trainer's stderr

Uploaded datasets live in ``<jobs_dir>/uploads`` (:mod:`.uploads`); a job names its data by upload
id or by a path under ``--data-root`` and the record keeps the resolved folder.

Scheduling: first in, first out. The server trains on ``gpus`` GPUs (0: on the CPU); a job asks
for ``settings.gpus`` (default 1) and starts when the job ahead of it has started and that many
GPUs are free (``CUDA_VISIBLE_DEVICES`` names them; several run under ``torchrun``). On a CPU
server one job runs at a time. A job runs ``python -m sss_lib train --labeled ... --run-dir RUN``
in its own process group (session), writing to files rather than pipes, so it never blocks on
the server and outlives it.

States: ``queued -> running -> done | failed | stopped | interrupted``; ``stop`` on a running job
creates the run contract's stop file (``running -> stopping -> stopped``, at a clean point with a
checkpoint), on a queued job it ends it at once (``stopped``). ``resume`` re-queues a stopped,
interrupted or failed job; it starts with ``--resume`` when the run folder holds a checkpoint.
The outcome of an attempt is read from its last progress event (``done``, ``stop``, ``error``), so
it is the same whether the server saw the process end or found it ended after a restart.

Restart safety (:meth:`JobManager.start`): every ``job.json`` is read back. A job recorded as
running or stopping whose trainer still runs (a server that was killed) is **adopted**: the
manager follows it by its pid and files until it ends, and training never notices the restart.
One whose trainer is gone becomes ``interrupted`` (or ``done``/``stopped``/``failed`` when its
last progress event says so), resumable. Queued jobs wait in their old order. A server shut down
on purpose (:meth:`JobManager.close`) asks its running jobs to stop at a clean point; they end
``interrupted`` ("the server shut down"), to be resumed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

from ..errors import InputError
from ..runs.layout import RunPaths
from ..runs.pids import pid_alive
from ..runs.progress import parse_progress_line
from .http_errors import ApiError, from_library_error, not_found
from .job_settings import SettingsError, job_gpus, settings_to_argv
from .uploads import UploadStore, describe_dataset, write_json_atomic

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "stopping", "stopped", "interrupted", "done", "failed")
#: States in which no trainer runs and none is waiting (a stream of the job's progress ends).
END_STATES = ("stopped", "interrupted", "done", "failed")
ACTIVE_STATES = ("running", "stopping")
RESUMABLE_STATES = ("stopped", "interrupted", "failed")
_JOB_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
_NAME_MAX = 200
_CONSOLE_TAIL = 4000  # bytes of console.log quoted in a failed job's message


@dataclasses.dataclass
class Job:
    """The persisted record of one job (``job.json``); paths are absolute strings."""

    job_id: str
    name: str
    state: str
    created: float
    queued_at: float
    labeled: dict[str, Any]  # {"upload_id"} or {"path"}, plus "resolved": the folder
    unlabeled: dict[str, Any] | None
    settings: dict[str, Any]
    argv: list[str]  # the settings as train options
    gpus: int
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None
    gpu_ids: list[int] = dataclasses.field(default_factory=list)
    lines_at_start: int = 0  # progress records written before the current attempt
    stop_reason: str | None = None  # "user" or "shutdown" while a stop is pending
    error: dict[str, str] | None = None
    returncode: int | None = None
    adopted: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class _ProgressLog:
    """The progress records of a job's ``progress.jsonl``, read incrementally (lines that are not
    progress records, and a last line still being written, are left out)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return self.records
        if size < self._offset:  # replaced: read again (never happens in normal use)
            self.records, self._offset, self._partial = [], 0, b""
        if size > self._offset:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(size - self._offset)
            self._offset += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            for raw in lines:
                record = parse_progress_line(raw.decode("utf-8", "replace"))
                if record is not None:
                    self.records.append(json.loads(raw))
        return self.records


def _is_our_trainer(pid: int | None, run_dir: Path) -> bool:
    """True when ``pid`` runs and is the trainer of ``run_dir`` (Linux checks its command line, so a
    reused pid is not mistaken for it; elsewhere a running pid is trusted)."""
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if sys.platform.startswith("linux") and cmdline.exists():
        try:
            return str(run_dir).encode() in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _lock_folder(folder: Path) -> IO[bytes] | None:
    """Hold ``folder/.lock`` for this process (released when the returned file is closed), so two
    services never schedule the same jobs. Where ``fcntl`` is missing (Windows) nothing is locked.

    Raises:
        InputError: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    f = open(folder / ".lock", "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().decode("ascii", "replace").strip() or "?"
        f.close()
        raise InputError(folder, f"is used by another SSS service (pid {holder})",
                         "Stop that service, or give this one another --jobs-dir.") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()).encode())
    f.flush()
    return f


def _package_parent() -> str:
    import sss_lib

    return str(Path(sss_lib.__file__).resolve().parent.parent)


class JobManager:
    """The queue, the trainer processes and the job records.

    Args:
        jobs_dir: where jobs and uploads live (created).
        data_root: the folder ``{path}`` datasets must lie in (None: paths refused).
        gpus: GPUs the server trains on (0: the CPU, one job at a time).
        device: the trainer's ``--device`` on a CPU server ("cpu", "mps"); GPU jobs get "cuda".
        max_extract: most bytes an uploaded archive may expand to.
        trainer: the command that starts one trainer process (default ``python -m sss_lib train``);
            its options follow. Multi-GPU jobs use ``python -m torch.distributed.run``.
        poll_s: how often the scheduler checks processes and the queue.
        env: extra environment variables for trainers.

    Call :meth:`start` once (loads the jobs, starts the scheduler thread) and :meth:`close` at the end.
    """

    def __init__(self, jobs_dir: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None = None,
                 gpus: int = 0, device: str = "cpu", max_extract: int = 8 << 30,
                 trainer: Sequence[str] | None = None, poll_s: float = 0.25,
                 env: Mapping[str, str] | None = None) -> None:
        self.root = Path(jobs_dir).resolve()
        self.jobs_root = self.root / "jobs"
        self.jobs_root.mkdir(parents=True, exist_ok=True)
        self._dir_lock = _lock_folder(self.root)
        self.uploads = UploadStore(self.root / "uploads", max_extract=max_extract)
        self.data_root = Path(data_root) if data_root is not None else None
        self.gpus = max(0, int(gpus))
        self.device = device
        self.trainer = list(trainer) if trainer else [sys.executable, "-m", "sss_lib", "train"]
        self.poll_s = float(poll_s)
        self.env = dict(env or {})
        self._jobs: dict[str, Job] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, _ProgressLog] = {}
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "JobManager":
        """Load every job (module docstring, "Restart safety") and start the scheduler."""
        with self._lock:
            for folder in sorted(self.jobs_root.iterdir()):
                record = folder / "job.json"
                if not (_JOB_ID_RE.match(folder.name) and record.is_file()):
                    continue
                try:
                    job = Job.from_json(json.loads(record.read_text(encoding="utf-8")))
                except (ValueError, TypeError) as err:
                    log.error("job %s: unreadable record %s (%s); left alone", folder.name, record, err)
                    continue
                self._jobs[job.job_id] = job
                if job.state in ACTIVE_STATES:
                    if _is_our_trainer(job.pid, self.run_dir(job.job_id)):
                        job.adopted = True
                        log.info("job %s: its trainer (pid %s) still runs; adopted", job.job_id, job.pid)
                        self._save(job)
                    else:
                        self._finish(job, None)
            queued = sum(j.state == "queued" for j in self._jobs.values())
            log.info("jobs: %d loaded from %s (%d queued)", len(self._jobs), self.jobs_root, queued)
        self._thread = threading.Thread(target=self._loop, name="sss-jobs", daemon=True)
        self._thread.start()
        return self

    def close(self, *, stop_jobs: bool = True, grace_s: float = 10.0) -> None:
        """Stop the scheduler and release the jobs folder. ``stop_jobs``: ask running trainers to
        stop at a clean point and wait up to ``grace_s`` for them (those still running are adopted
        by the next start)."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if stop_jobs:
                self._stop_all(grace_s)
        finally:
            if self._dir_lock is not None:
                self._dir_lock.close()  # releases the lock
                self._dir_lock = None

    def _stop_all(self, grace_s: float) -> None:
        with self._lock:
            for job in self._jobs.values():
                if job.state in ACTIVE_STATES:
                    job.state, job.stop_reason = "stopping", job.stop_reason or "shutdown"
                    self._write_stop_file(job)
                    self._save(job)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                self._reap()
                if not any(j.state in ACTIVE_STATES for j in self._jobs.values()):
                    return
            time.sleep(0.1)

    # -- paths --------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_root / job_id

    def run_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "run"

    def progress_file(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "progress.jsonl"

    def console_file(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "console.log"

    # -- requests -----------------------------------------------------------------------------------
    def submit(self, labeled: Mapping[str, Any], unlabeled: Mapping[str, Any] | None = None,
               settings: Mapping[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
        """Queue a job; returns ``{job_id, state: "queued", position}``.

        Args:
            labeled / unlabeled: ``{"upload_id": ...}`` or ``{"path": ...}`` (relative to the data root).
            settings: ``train`` options (:mod:`.job_settings`) and ``gpus``.
            name: a label for people (default: the dataset's folder name).

        Raises:
            ApiError: 404 unknown upload, 403/400 refused path, 422 bad settings or unusable data.
        """
        settings = dict(settings or {})
        try:
            argv = settings_to_argv(settings)
            gpus = job_gpus(settings, self.gpus)
        except SettingsError as err:
            raise ApiError(422, "bad_settings", f"{err}") from None
        lab = self._resolve_data("labeled", labeled, layout=str(settings.get("layout", "auto")))
        if lab["_info"]["labeled"] == 0:
            raise ApiError(422, "no_labeled_cases", f"the labeled dataset ({self._describe_ref(labeled)}) holds no "
                           "labeled case. Name a dataset with labels (nnU-Net: labelsTr/).")
        unl = self._resolve_data("unlabeled", unlabeled) if unlabeled is not None else None
        if name is not None and (not isinstance(name, str) or len(name) > _NAME_MAX):
            raise ApiError(422, "bad_request", f"name must be a string of at most {_NAME_MAX} characters")
        now = time.time()
        job_id = secrets.token_hex(6)
        folder = Path(lab["resolved"])
        if "upload_id" in lab and folder.name == "data":  # the dataset was at the archive's root
            folder = Path(f"upload-{str(lab['upload_id'])[:8]}")
        job = Job(job_id=job_id, name=(name or folder.name), state="queued", created=now,
                  queued_at=now, labeled={k: v for k, v in lab.items() if not k.startswith("_")},
                  unlabeled=None if unl is None else {k: v for k, v in unl.items() if not k.startswith("_")},
                  settings=settings, argv=argv, gpus=gpus)
        with self._lock:
            self.job_dir(job_id).mkdir(parents=True)
            self._jobs[job_id] = job
            self._save(job)
            position = self._position(job)
        log.info("job %s queued (%s, position %s)", job_id, job.name, position)
        return {"job_id": job_id, "state": "queued", "position": position}

    def get(self, job_id: str) -> dict[str, Any]:
        """The public view of a job (``GET /v1/jobs/{id}``). Raises ApiError 404."""
        with self._lock:
            return self._view(self._job(job_id))

    def list(self) -> list[dict[str, Any]]:
        """Every job, oldest first."""
        with self._lock:
            return [self._view(j) for j in sorted(self._jobs.values(), key=lambda j: j.created)]

    def progress(self, job_id: str, after: int = 0) -> dict[str, Any]:
        """``{lines: [progress objects after the first `after`], next, state, position}``. Raises ApiError 404."""
        with self._lock:
            job = self._job(job_id)
            records = self._records(job_id)
            after = max(0, min(int(after), len(records)))
            return {"lines": records[after:], "next": len(records), "state": job.state,
                    "position": self._position(job)}

    def stop(self, job_id: str) -> dict[str, Any]:
        """Ask a job to stop: a queued job ends ``stopped`` at once, a running one at its next clean
        point (``stopping``). Raises ApiError 404, or 409 for a job that has ended."""
        with self._lock:
            job = self._job(job_id)
            if job.state == "queued":
                job.state, job.ended_at = "stopped", time.time()
                job.error = None
            elif job.state == "running":
                job.state, job.stop_reason = "stopping", "user"
                self._write_stop_file(job)
            elif job.state == "stopping":
                job.stop_reason = "user"
            else:
                raise ApiError(409, "job_not_running", f"job {job_id} is {job.state}: there is nothing to stop")
            self._save(job)
            return self._view(job)

    def resume(self, job_id: str) -> dict[str, Any]:
        """Queue a stopped, interrupted or failed job again (from its checkpoint when it has one).
        Raises ApiError 404, or 409 for a job that is queued, running or done."""
        with self._lock:
            job = self._job(job_id)
            if job.state not in RESUMABLE_STATES:
                why = "it has finished" if job.state == "done" else "it has not ended"
                raise ApiError(409, "job_not_resumable", f"job {job_id} is {job.state}: {why}; only a stopped, "
                               "interrupted or failed job can be resumed")
            job.state, job.queued_at, job.error, job.stop_reason = "queued", time.time(), None, None
            job.ended_at = job.returncode = None
            self._save(job)
            return self._view(job)

    def file(self, job_id: str, which: str) -> Path:
        """The job's ``curves`` (PNG) or ``model`` (.ssstask) file. Raises ApiError 404 (unknown job
        or no such file yet, with a message saying when it appears)."""
        with self._lock:
            job = self._job(job_id)
        paths = RunPaths.of(self.run_dir(job_id))
        path = {"curves": paths.curves, "model": paths.root / "model.ssstask"}[which]
        if path.is_file():
            return path
        when = ("after the first validation" if which == "curves"
                else "when the job is done (or stopped after a checkpoint)")
        raise ApiError(404, f"no_{which}", f"job {job_id} ({job.state}) has no {which} file yet; it appears {when}")

    # -- internals: records -------------------------------------------------------------------------
    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(str(job_id)) if _JOB_ID_RE.match(str(job_id)) else None
        if job is None:
            raise not_found("job", str(job_id), "GET /v1/jobs lists this server's jobs")
        return job

    def _save(self, job: Job) -> None:
        write_json_atomic(self.job_dir(job.job_id) / "job.json", dataclasses.asdict(job))

    def _records(self, job_id: str) -> list[dict[str, Any]]:
        tail = self._logs.get(job_id)
        if tail is None:
            tail = self._logs[job_id] = _ProgressLog(self.progress_file(job_id))
        return tail.refresh()

    def _position(self, job: Job) -> int | None:
        if job.state != "queued":
            return None
        queue = sorted((j for j in self._jobs.values() if j.state == "queued"), key=lambda j: j.queued_at)
        return 1 + queue.index(job)

    def _view(self, job: Job) -> dict[str, Any]:
        records = self._records(job.job_id)
        last = records[-1] if records else None
        paths = RunPaths.of(self.run_dir(job.job_id))
        view: dict[str, Any] = {
            "job_id": job.job_id, "name": job.name, "state": job.state, "position": self._position(job),
            "step": int(last["step"]) if last else 0,
            "total": int(last["total_steps"]) if last else int(job.settings.get("iterations", 300)),
            "last": last, "created": job.created, "started": job.started_at, "ended": job.ended_at,
            "attempts": job.attempts, "gpus": job.gpus, "settings": job.settings,
            "labeled": {k: v for k, v in job.labeled.items() if k != "resolved"},
            "unlabeled": None if job.unlabeled is None else {k: v for k, v in job.unlabeled.items() if k != "resolved"},
            "resumable": job.state in RESUMABLE_STATES,
            "files": {"curves": paths.curves.is_file(), "model": (paths.root / "model.ssstask").is_file()},
        }
        if job.error:
            view["error"] = dict(job.error)
        return view

    @staticmethod
    def _describe_ref(ref: Mapping[str, Any]) -> str:
        return f"upload {ref['upload_id']}" if "upload_id" in ref else f"path {ref.get('path')!r}"

    def _resolve_data(self, role: str, ref: Any, layout: str = "auto") -> dict[str, Any]:
        from .paths import PathRefused, resolve_under_root

        if not isinstance(ref, Mapping) or len(ref) != 1 or not ({"upload_id", "path"} & set(ref)):
            raise ApiError(422, "bad_request", f"{role} must be {{\"upload_id\": ID}} (from POST /v1/uploads) or "
                           "{\"path\": PATH} (relative to the server's data root)")
        if "upload_id" in ref:
            folder = Path(self.uploads.get(str(ref["upload_id"]))["path"])
        else:
            try:
                folder = resolve_under_root(ref["path"], self.data_root)
            except PathRefused as err:
                raise from_library_error(err) from None
        try:
            info = describe_dataset(folder, layout if role == "labeled" else "auto")
        except InputError as err:
            raise ApiError(422, "bad_dataset", f"the {role} data ({self._describe_ref(ref)}) cannot be used: "
                           f"{str(err).replace(str(folder), 'the dataset folder')}") from None
        return {**dict(ref), "resolved": str(folder), "_info": info}

    # -- internals: processes -----------------------------------------------------------------------
    def _write_stop_file(self, job: Job) -> None:
        stop = RunPaths.of(self.run_dir(job.job_id)).stop_file
        stop.parent.mkdir(parents=True, exist_ok=True)
        stop.write_text(f"stop requested ({job.stop_reason}) at {time.ctime()}\n")

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                with self._lock:
                    self._reap()
                    self._start_queued()
            except Exception:  # the scheduler must outlive any one bad job
                log.exception("jobs: scheduler error")
            self._closing.wait(self.poll_s)

    def _reap(self) -> None:
        """Record the end of every trainer that has ended; re-create a stop file a starting trainer
        removed as stale (it clears one it finds at its start)."""
        for job in list(self._jobs.values()):
            if job.state not in ACTIVE_STATES:
                continue
            proc = self._procs.get(job.job_id)
            if proc is not None:
                code = proc.poll()
                ended = code is not None
            else:
                code, ended = None, not _is_our_trainer(job.pid, self.run_dir(job.job_id))
            if ended:
                self._procs.pop(job.job_id, None)
                self._finish(job, code)
            elif job.state == "stopping" and not RunPaths.of(self.run_dir(job.job_id)).stop_file.exists():
                self._write_stop_file(job)

    def _finish(self, job: Job, returncode: int | None) -> None:
        """Set the end state of the attempt that just ended, from its last progress event."""
        records = self._records(job.job_id)[job.lines_at_start:]
        final = next((r for r in reversed(records) if r.get("event") in ("done", "stop", "error")), None)
        event = final.get("event") if final else None
        model = (self.run_dir(job.job_id) / "model.ssstask").is_file()
        if event == "done" and model:
            job.state, job.error = "done", None
        elif event == "stop":
            if job.stop_reason == "shutdown":
                job.state = "interrupted"
                job.error = {"code": "server_shutdown", "message": "the server shut down; the job stopped at a "
                             "checkpoint. Resume it (POST /v1/jobs/ID/resume) to continue."}
            else:
                job.state, job.error = "stopped", None
        elif event == "error":
            job.state = "failed"
            job.error = {"code": "training_failed", "message": str(final.get("message") or "the trainer failed")}
        elif returncode is None or returncode < 0 or returncode == 130:
            job.state = "interrupted"
            job.error = {"code": "trainer_gone", "message": "the trainer ended without finishing (killed, or the "
                         "server's machine went down). Resume the job to continue from its last checkpoint."}
        else:
            job.state = "failed"
            job.error = {"code": "training_failed", "message": f"the trainer exited with code {returncode}: "
                         f"{self._console_tail(job.job_id)}"}
        job.returncode, job.ended_at, job.pid, job.gpu_ids = returncode, time.time(), None, []
        job.stop_reason, job.adopted = None, False
        self._save(job)
        log.info("job %s %s%s", job.job_id, job.state, f" ({job.error['message']})" if job.error else "")

    def _console_tail(self, job_id: str) -> str:
        try:
            with open(self.console_file(job_id), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _CONSOLE_TAIL))
                text = f.read().decode("utf-8", "replace").strip()
        except OSError:
            return "no console output"
        return text.splitlines()[-1] if text else "no console output"

    def _free_gpus(self) -> list[int]:
        busy = {g for j in self._jobs.values() if j.state in ACTIVE_STATES for g in j.gpu_ids}
        return [g for g in range(self.gpus) if g not in busy]

    def _start_queued(self) -> None:
        if self._closing.is_set():
            return
        queue = sorted((j for j in self._jobs.values() if j.state == "queued"), key=lambda j: j.queued_at)
        for job in queue:  # first in, first out: a job never starts before one queued ahead of it
            if self.gpus == 0:
                if any(j.state in ACTIVE_STATES for j in self._jobs.values()):
                    return
                ids: list[int] = []
            else:
                free = self._free_gpus()
                if len(free) < job.gpus:
                    return
                ids = free[:job.gpus]
            self._launch(job, ids)

    def _command(self, job: Job) -> list[str]:
        run = self.run_dir(job.job_id)
        resume = RunPaths.of(run).last_checkpoint.is_file()
        device = "cuda" if job.gpu_ids else self.device
        trainer = self.trainer
        if len(job.gpu_ids) > 1:
            trainer = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={len(job.gpu_ids)}", *self.trainer[1:]]
        cmd = [*trainer, "--labeled", job.labeled["resolved"], "--run-dir", str(run), "--device", device]
        if job.unlabeled is not None:
            cmd += ["--unlabeled", job.unlabeled["resolved"]]
        return cmd + job.argv + (["--resume"] if resume else [])

    def _launch(self, job: Job, gpu_ids: list[int]) -> None:
        run = self.run_dir(job.job_id)
        run.mkdir(parents=True, exist_ok=True)
        RunPaths.of(run).stop_file.unlink(missing_ok=True)  # a stale one would end the run at once
        job.gpu_ids = list(gpu_ids)
        cmd = self._command(job)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "SSS_STOP_FILE": str(RunPaths.of(run).stop_file)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_parent(), env.get("PYTHONPATH")) if p)
        if gpu_ids:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            names = [v.strip() for v in visible.split(",")] if visible else [str(g) for g in range(self.gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(names[g] for g in gpu_ids)
        job.lines_at_start = len(self._records(job.job_id))
        with open(self.progress_file(job.job_id), "ab") as out, open(self.console_file(job.job_id), "ab") as err:
            err.write(f"\n--- attempt {job.attempts + 1} at {time.ctime()}: {' '.join(cmd)}\n".encode())
            err.flush()
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=self.job_dir(job.job_id), env=env, start_new_session=True)
            except OSError as e:
                job.state, job.ended_at = "failed", time.time()
                job.error = {"code": "launch_failed", "message": f"the trainer could not be started ({e})"}
                self._save(job)
                return
        self._procs[job.job_id] = proc
        job.state, job.pid, job.attempts = "running", proc.pid, job.attempts + 1
        job.started_at, job.ended_at, job.returncode, job.error, job.stop_reason = time.time(), None, None, None, None
        self._save(job)
        log.info("job %s started (attempt %d, pid %d%s)", job.job_id, job.attempts, proc.pid,
                 f", GPUs {gpu_ids}" if gpu_ids else "")
