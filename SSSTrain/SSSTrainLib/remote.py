"""Training on an SSS server ("Compute on: server"): submit, follow, stop, resume, fetch the results.

The data is exported as for a local run (scene cases into ``RUN/dataset`` and ``RUN/unlabeled``),
packed as ``.tar.gz`` archives and uploaded to the server's job queue (``POST /v1/uploads``,
``POST /v1/jobs``; docs/service_api.md). The run folder stays on this computer: it records the job
(``RUN/slicer/remote_job.json``: server address and job id, never the token), and
:class:`RemoteJobMonitor` keeps ``RUN/curves.png`` and ``RUN/model.ssstask`` up to date by
downloading them, so "Use this model" and a reopened panel work as for a local run.

:class:`RemoteJobMonitor` has the interface of :class:`SSSTrainLib.monitor.RunMonitor`, so the panel
follows a server job and a local process the same way; each :meth:`RemoteJobMonitor.poll` is one
short request. Python 3.9 compatible; ``sss_lib`` is imported inside the functions.
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

from . import constants as C
from .errors import RunFolderError
from .files import FileWatch, read_dataclass, write_bytes_atomically, write_dataclass
from .monitor import DONE, ENDED, EVENT, FAILED, FINISHED, LOG, STOPPED, RunMessage, finished_text
from .runstate import panel_dir
from .settings import TrainSettings, check_settings, given, train_arguments

JOB_FILE = "remote_job.json"
# Job states (docs/service_api.md) after which the job does nothing more until resumed.
JOB_END_STATES = ("stopped", "interrupted", "done", "failed")
JOB_ACTIVE_STATES = ("queued", "running", "stopping")
_OUTCOME = {"done": DONE, "stopped": STOPPED, "failed": FAILED, "interrupted": ENDED}
# After a failed request the monitor waits this long before asking again (the server may restart).
RETRY_S = 5.0
# A reopened panel reads this many progress lines back (enough for the last state and log).
ATTACH_LINES = 200


@dataclasses.dataclass
class RemoteJob:
    """A training job this run folder sent to a server.

    Attributes:
        run_dir: the local run folder; url: the server; job_id: the job there.
        next: progress lines read so far (a reopened panel reads the last few again).
        started: ``time.time()`` at submission.
    """

    run_dir: str
    url: str
    job_id: str
    next: int = 0
    started: float = 0.0


def job_path(run_dir: str) -> str:
    return os.path.join(panel_dir(run_dir), JOB_FILE)


def read_job(run_dir: str) -> Optional[RemoteJob]:
    """The server job recorded in ``run_dir``, or None (none, or a damaged file)."""
    if not given(run_dir):
        return None
    return read_dataclass(job_path(run_dir), RemoteJob)


def write_job(job: RemoteJob) -> str:
    """Write ``job`` atomically into its run folder; returns the file."""
    return write_dataclass(job_path(job.run_dir), job)


def job_settings(settings: TrainSettings) -> Dict[str, Any]:
    """The job's ``settings`` (the ``train`` options the server accepts from a client, by destination):
    the panel's own command line (:func:`~SSSTrainLib.settings.train_arguments`) parsed by the
    trainer's parser, so a server job and a local run take the same options from one mapping. Values
    equal to the trainer's defaults are left out (the server uses the same defaults)."""
    import argparse

    from sss_lib.service.job_settings import namespace_to_settings
    from sss_lib.trainer.run import add_train_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    return namespace_to_settings(parser.parse_args(train_arguments(settings)[1:]))


def submit(logic: Any, settings: TrainSettings, scene: Any, client: Any,
           progress: Optional[Callable[[str, Optional[float]], None]] = None,
           extra_settings: Optional[Dict[str, Any]] = None) -> "RemoteJobMonitor":
    """Export the data, upload it and submit the job; returns the monitor that follows it.

    Args:
        logic: the panel's :class:`SSSTrainLib.logic.TrainLogic` (its data export and folder checks).
        client: a ``sss_lib.service.client.ServiceClient`` of the server.
        extra_settings: more ``train`` options by destination (e.g. ``{"image_size": 512}``; the
            server refuses those it does not let clients set).

    Raises:
        TrainUserError: a setting, the scene data or the run folder is not usable.
    """
    say = progress or (lambda text, fraction: None)
    check_settings(settings)
    run_dir = settings.run_dir
    if read_job(run_dir) is not None or logic.run_status(run_dir).has_run:
        raise RunFolderError("This run folder holds an earlier run: Resume it, or start over "
                             "(its files move to previous/), or choose another folder.")
    logic._check_writable(run_dir)
    logic.prepare_data(settings, scene, progress)
    uploads = {}
    for role, folder in (("labeled", settings.labeled_path()), ("unlabeled", settings.unlabeled_path())):
        if not given(folder):
            continue
        if not os.path.isdir(folder):
            raise RunFolderError(f"The {role} data folder {folder} does not exist; choose another.")
        say(f"Uploading the {role} data to {client.url}...", None)
        uploads[role] = {"upload_id": client.upload_dataset(folder)["upload_id"]}  # packed as an archive
    job_options = dict(job_settings(settings), **(extra_settings or {}))
    answer = client.submit_job(uploads["labeled"], unlabeled=uploads.get("unlabeled"), settings=job_options,
                               name=os.path.basename(os.path.abspath(run_dir)))
    job = RemoteJob(run_dir=os.path.abspath(run_dir), url=client.url, job_id=str(answer["job_id"]), started=time.time())
    write_job(job)
    say(f"Submitted job {job.job_id} to {client.url}.", None)
    return RemoteJobMonitor(job, lambda: client)


class RemoteJobMonitor:
    """Follows a server job like :class:`SSSTrainLib.monitor.RunMonitor` follows a process.

    Args:
        job: the job (its ``next`` says where reading starts; see :data:`ATTACH_LINES`).
        client: returns the server's client (None while unavailable).
        backlog: re-read this many lines before ``job.next`` (a reopened panel).
    """

    def __init__(self, job: RemoteJob, client: Callable[[], Any], backlog: int = 0) -> None:
        self.job = job
        self.run_dir = job.run_dir
        self._client = client
        self.process = None
        self.state = None
        self.finished = False
        self.stop_requested = False
        self.last_step: Any = None
        self.last_val: Any = None
        self.terminal: Any = None
        self.job_state = "queued"
        self._next = max(0, int(job.next) - backlog)
        self._retry_at = 0.0
        self._fetch_files = True
        self._curves = FileWatch(os.path.join(self.run_dir, C.CURVES_FILE))
        self._queued_shown: Optional[int] = None

    owned = True  # the panel can stop and resume it (through the server)

    @property
    def pid(self) -> Optional[int]:
        return None  # not a process of this computer

    def alive(self) -> Optional[bool]:
        return self.job_state in JOB_ACTIVE_STATES

    def stop(self) -> None:
        """Ask the server to stop the job at its next clean point (with a checkpoint)."""
        self.stop_requested = True
        self._client().stop_job(self.job.job_id)

    def poll(self) -> List[RunMessage]:
        """New reports (one short request), then FINISHED once the job has ended (last message)."""
        if self.finished or time.monotonic() < self._retry_at:
            return []
        from sss_lib.errors import SSSError

        try:
            client = self._client()
            if client is None:
                return []
            answer = client.job_progress(self.job.job_id, after=self._next)
        except SSSError as e:  # the server went away or refused: keep the job, ask again later
            self._retry_at = time.monotonic() + RETRY_S
            return [RunMessage(LOG, text=f"The server does not answer ({e}); retrying in {RETRY_S:.0f} s.")]
        messages = self._read(answer)
        if self.job_state in JOB_END_STATES:
            self._download_files()
            self.finished = True
            messages.append(self._finished_message())
        elif self._fetch_files:
            self._download_files()
        return messages

    def _read(self, answer: Dict[str, Any]) -> List[RunMessage]:
        from sss_lib.runs.progress import parse_progress_line

        messages = []
        for obj in answer.get("lines") or []:
            record = parse_progress_line(json.dumps(obj)) if isinstance(obj, dict) else None
            if record is None:
                messages.append(RunMessage(LOG, text=str(obj)))
                continue
            if record.event == "start":
                self.terminal = None
            elif record.event == "step":
                self.last_step = record
            elif record.event == "val":
                self.last_val = record
                self._fetch_files = True  # the trainer writes curves and the model at validations
            elif record.event in ("done", "stop", "error"):
                self.terminal = record
            messages.append(RunMessage(EVENT, record=record))
        self._next = int(answer.get("next", self._next))
        self.job_state = str(answer.get("state", self.job_state))
        if self.job_state == "queued":
            position = answer.get("position")
            if position != self._queued_shown:
                self._queued_shown = position
                where = f" (position {position})" if position is not None else ""
                messages.append(RunMessage(LOG, text=f"Queued on the server{where}."))
        if self._next != self.job.next:
            self.job.next = self._next
            write_job(self.job)
        return messages

    def _download_files(self) -> None:
        """Fetch curves.png and model.ssstask into the run folder (404 until the trainer wrote them)."""
        from sss_lib.errors import SSSError

        client = self._client()
        self._fetch_files = False
        for name, fetch in ((C.CURVES_FILE, client.job_curves), (C.MODEL_FILE, client.job_model)):
            try:
                data = fetch(self.job.job_id)
            except SSSError as e:
                logging.debug("SSS Train: %s of job %s not there yet: %s", name, self.job.job_id, e)
                continue
            if data:
                write_bytes_atomically(os.path.join(self.run_dir, name), data)

    def curves_update(self) -> Optional[str]:
        """``RUN/curves.png`` when it changed since the last call, else None."""
        return self._curves.path if self._curves.changed() else None

    def _finished_message(self) -> RunMessage:
        outcome = _OUTCOME.get(self.job_state, ENDED)
        text = finished_text(outcome, self.terminal, None, self.last_step)
        return RunMessage(FINISHED, record=self.terminal, outcome=outcome, returncode=None, text=text)


def resume(job: RemoteJob, client: Any) -> RemoteJobMonitor:
    """Ask the server to resume ``job`` from its last checkpoint; returns its monitor."""
    client.resume_job(job.job_id)
    return RemoteJobMonitor(job, lambda: client)


def job_status(job: RemoteJob, client: Any) -> Dict[str, Any]:
    """The server's record of ``job`` (``GET /v1/jobs/{id}``: state, step, total, last, error)."""
    return client.job(job.job_id)
