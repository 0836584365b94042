"""``python -m sss_lib train --server URL ...``: train on an SSS service as if training here.

The labeled (and unlabeled) dataset folders are packed and uploaded (``server:PATH`` names a
folder under the service's ``--data-root`` instead), the job is submitted with the command's
options as settings, and its progress is followed: stdout carries the same JSON progress lines a
local run prints, stderr a readable view. Ctrl+C asks the job to stop at its next clean point (a
second one leaves it running and returns); ``--job ID`` follows an existing job again, ``--job ID
--resume`` resumes it. When the job is done the task model is downloaded to ``--out`` (default
``sss-job-ID.ssstask`` here).

Exit codes as a local run: 0 done or stopped on request (resumable), 2 bad input, a failed or an
interrupted job, or a service that went away, 130 a second Ctrl+C.

Only an explicit ``--server`` trains remotely (``$SSS_SERVER`` does not apply to ``train``): the
Slicer panel and the service itself start local trainers that must stay local.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import IO, Any

from ..errors import InputError, SSSError
from ..runs.progress import ProgressRecord, ProgressReporter

log = logging.getLogger(__name__)

SERVER_PREFIX = "server:"
#: How long a follower keeps trying while the service is away (a restart keeps the job).
RECONNECT_S = 120.0


def add_remote_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--job`` and ``--name``, for ``train --server`` (the server options come from the CLI)."""
    server = parser._option_string_actions.get("--server")
    if server is not None:  # the shared option's help names $SSS_SERVER, which train does not use
        server.help = ("train on the SSS service at URL: the data are uploaded (or named server:PATH), progress "
                       "lines come back on stdout, the model is downloaded to --out ($SSS_SERVER does not apply "
                       "to train)")
    group = parser.add_argument_group("training on a service (with --server)")
    group.add_argument("--job", default=None, metavar="ID",
                       help="follow this job on the service again (with --resume: resume it) instead of submitting")
    group.add_argument("--name", default=None, help="the job's name on the service (default: the dataset folder's)")


def _data_ref(value: str, what: str) -> Any:
    """``{"path": P}`` for ``server:P``, else the local folder (uploaded by the client)."""
    if value.startswith(SERVER_PREFIX):
        return {"path": value[len(SERVER_PREFIX):]}
    path = Path(value)
    if not path.is_dir():
        raise InputError(path, f"is not a folder ({what} data must be a dataset folder to upload)",
                         f"Give the dataset folder, or {SERVER_PREFIX}PATH for a folder under the service's "
                         "--data-root.")
    return path


class _Console:
    """The readable view on stderr of progress records received from the service."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last_step = 0

    def show(self, record: dict[str, Any]) -> None:
        r = ProgressRecord.from_dict(record)
        text = r.message if r.event in ("start", "stop", "done") else None
        if r.event == "step":
            every = max(1, r.total_steps // 20)
            if r.step - self._last_step >= every or r.step == r.total_steps:
                self._last_step = r.step
                losses = " ".join(f"{k} {v:.4f}" for k, v in r.losses.items() if v is not None)
                text = f"step {r.step}/{r.total_steps} {losses}"
        elif r.event == "val":
            text = f"validation at step {r.step}: Dice " + ", ".join(
                f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in r.val_dice.items())
        elif r.event == "checkpoint":
            text = f"checkpoint at step {r.step} (on the service)"
        elif r.event == "error":
            text = f"error: {r.message}"
        if text:
            print(text, file=self.stream, flush=True)


def run_remote_train(args: argparse.Namespace, *, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run ``train --server`` with parsed options; returns the exit code (module docstring)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    reporter = ProgressReporter(max(1, int(args.iterations)), stream=out, console=err, bar=False)
    try:
        return _run(args, out, err)
    except SSSError as e:
        reporter.error(str(e))
        return 2


def _say(err: IO[str], text: str) -> None:
    print(text, file=err, flush=True)


def _run(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from ..remote_run import connect, server_from_env
    from .job_settings import SettingsError, namespace_to_settings

    url, token_file = server_from_env(args.server, args.token_file)
    client = connect(url, token_file, ca_file=getattr(args, "ca_file", None))
    job_id = getattr(args, "job", None)
    after = 0
    if args.device != "auto":
        _say(err, "note: --device is ignored with --server (the service trains on its own GPUs or CPU)")
    if job_id:
        if args.resume:
            after = int(client.job_progress(job_id)["next"])
            client.resume_job(job_id)
            _say(err, f"job {job_id} resumed on {client.url}")
    else:
        if args.resume:
            raise InputError(None, "--resume with --server continues a job on the service",
                             "Add --job ID (the id printed when it was submitted).")
        if not args.labeled:
            raise InputError(None, "--labeled is required", "Give the labeled dataset folder (or --job ID).")
        try:
            settings = namespace_to_settings(args)
        except SettingsError as e:
            raise InputError(None, str(e)) from None
        labeled = _data_ref(args.labeled, "labeled")
        unlabeled = _data_ref(args.unlabeled, "unlabeled") if args.unlabeled else None
        for data in (labeled, unlabeled):
            if isinstance(data, Path):
                _say(err, f"uploading {data} to {client.url} ...")
        answer = client.submit_job(labeled, unlabeled, settings, name=getattr(args, "name", None))
        job_id = answer["job_id"]
        _say(err, f"job {job_id} submitted to {client.url} (queue position {answer.get('position')})")
    return _follow(client, job_id, after, args, out, err)


def _follow(client: Any, job_id: str, after: int, args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    console = _Console(err)
    hint = f"python -m sss_lib train --server {client.url} --job {job_id}"
    stop_asked = False
    cursor = after
    while True:
        try:
            for record in client.follow(job_id, after=cursor, reconnect_s=RECONNECT_S):
                cursor += 1
                out.write(json.dumps(record, separators=(", ", ": ")) + "\n")
                out.flush()
                console.show(record)
            break
        except KeyboardInterrupt:
            if stop_asked:
                _say(err, f"left job {job_id} as it is on the service; follow it again with: {hint}")
                return 130
            stop_asked = True
            client.close()  # the interrupted request's answer is never read: start afresh
            client.stop_job(job_id)
            _say(err, f"asked job {job_id} to stop at its next checkpoint (Ctrl+C again to leave without waiting)")
    job = client.job(job_id)
    state = job["state"]
    if state == "done":
        target = Path(args.out) if args.out else Path(f"sss-job-{job_id}.ssstask")
        try:
            client.download_model(job_id, target)
        except SSSError as e:
            raise SSSError(f"job {job_id} is done but its model could not be fetched ({e}); fetch it with: "
                           f"{hint} --out {target}") from None
        _say(err, f"task model: {target}")
        return 0
    if state == "stopped":
        _say(err, f"job {job_id} stopped with a checkpoint; resume it with: {hint} --resume")
        return 0
    message = (job.get("error") or {}).get("message", state)
    _say(err, f"error: job {job_id} {state}: {message}")
    if state == "interrupted":
        _say(err, f"resume it with: {hint} --resume")
    return 2
