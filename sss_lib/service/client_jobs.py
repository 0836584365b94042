"""The training-job methods of :class:`sss_lib.service.client.ServiceClient` (docs/service_api.md,
"Endpoints": uploads and jobs). Standard library only, Python 3.9 (runs inside Slicer).

::

    job = client.submit_job("Dataset001_Heart", settings={"iterations": 300})   # local folder (or archive): uploaded
    job = client.submit_job({"path": "Dataset001_Heart"})                        # under the server's --data-root
    for record in client.follow(job["job_id"]):   # the trainer's progress objects (sss.progress/1)
        print(record["event"], record["step"], record["total_steps"])
    client.job(job_id)["state"]                   # queued, running, stopping, stopped, interrupted, done, failed
    client.stop_job(job_id); client.resume_job(job_id)
    client.download_model(job_id, "heart.ssstask"); client.download_curves(job_id, "curves.png")

A dataset named by a local folder is packed as a tar archive in a temporary file and streamed to
``POST /v1/uploads`` (never held in memory whole); symbolic links are packed as the files they
point to (the server refuses links).
"""

import json
import os
import tarfile
import tempfile
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

#: Job states in which nothing runs or waits (a follower stops there).
JOB_END_STATES = ("stopped", "interrupted", "done", "failed")
#: Seconds one long-poll of a job's progress asks the server to wait for news.
FOLLOW_WAIT_S = 10.0

DataRef = Union[str, "os.PathLike[str]", Mapping[str, Any]]


#: File endings whose content is compressed already (gzip again would cost time and save nothing).
COMPRESSED_ENDINGS = (".gz", ".zip", ".npz", ".png", ".jpg", ".jpeg", ".bz2", ".xz", ".zst")


def _mostly_compressed(folder: str) -> bool:
    packed = other = 0
    for top, _, files in os.walk(folder, followlinks=True):
        for name in files:
            try:
                size = os.path.getsize(os.path.join(top, name))
            except OSError:
                continue
            if name.lower().endswith(COMPRESSED_ENDINGS):
                packed += size
            else:
                other += size
    return packed >= other


def pack_dataset(folder: "Union[str, os.PathLike[str]]", archive: "Union[str, os.PathLike[str]]") -> str:
    """Write ``folder`` (a dataset folder) as a tar archive at ``archive``, under its own name: plain
    when most bytes are compressed already (``.nii.gz`` images), else gzip level 1 (``.nii``,
    ``.nrrd``); the server reads both. Links are stored as the files they point to. Returns ``archive``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a dataset folder")
    if _mostly_compressed(folder):
        tf = tarfile.open(os.fspath(archive), "w", dereference=True)
    else:
        tf = tarfile.open(os.fspath(archive), "w:gz", compresslevel=1, dereference=True)
    with tf:
        tf.add(folder, arcname=os.path.basename(folder.rstrip(os.sep)) or "dataset")
    return os.fspath(archive)


def _write_atomic(path: "Union[str, os.PathLike[str]]", data: bytes) -> str:
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class JobsClientMixin:
    """Job methods; they call ``self._request(...)`` and ``self._stream_lines(...)`` of ServiceClient."""

    # -- uploads and submission --------------------------------------------------------------------
    def upload_dataset(self, source: "Union[str, os.PathLike[str]]") -> Dict[str, Any]:
        """Upload a dataset: a local folder (nnU-Net v2 raw; packed by :func:`pack_dataset` first) or
        an archive file made already (``.zip``, ``.tar.gz``, ``.tar``). Answers ``{upload_id, cases, labeled,
        unlabeled, layout, classes}``.

        Raises:
            FileNotFoundError: neither a folder nor a file. ServiceError: 422 ``bad_archive`` (no
            dataset the trainer reads; the message says why), 413 (larger than the server's --max-upload).
        """
        source = os.fspath(source)
        if os.path.isfile(source):
            return self._upload_archive(source)
        fd, archive = tempfile.mkstemp(prefix="sss-upload-", suffix=".tar")
        os.close(fd)
        try:
            return self._upload_archive(pack_dataset(source, archive))
        finally:
            os.unlink(archive)

    def _upload_archive(self, archive: str) -> Dict[str, Any]:
        with open(archive, "rb") as body:
            # A fresh connection: a kept-alive one the server had closed would be retried with a
            # body already half read.
            self.close()  # type: ignore[attr-defined]
            data = self._request("POST", "/uploads", body=body,  # type: ignore[attr-defined]
                                 headers={"Content-Length": str(os.path.getsize(archive))},
                                 timeout=max(self.timeout, 300.0))[2]  # type: ignore[attr-defined]
        return json.loads(data.decode("utf-8"))

    def _data_ref(self, data: DataRef) -> Dict[str, Any]:
        if isinstance(data, Mapping):
            return dict(data)
        return {"upload_id": self.upload_dataset(data)["upload_id"]}

    def submit_job(self, labeled: DataRef, unlabeled: Optional[DataRef] = None,
                   settings: Optional[Mapping[str, Any]] = None, name: Optional[str] = None) -> Dict[str, Any]:
        """Queue a training job; ``{job_id, state: "queued", position}``.

        Args:
            labeled / unlabeled: a local folder (uploaded first), ``{"path": P}`` (a folder under
                the server's ``--data-root``) or ``{"upload_id": ID}`` (an earlier upload).
            settings: ``train`` options by destination name (``{"iterations": 300, "backbone":
                "litemedsam", "labeled_batch": 8}``) and ``gpus``.
            name: a label for people (default: the dataset's folder name).

        Raises:
            ServiceError: 422 bad settings or data, 403/400 a path outside the data root, 404 an
            unknown upload.
        """
        payload: Dict[str, Any] = {"labeled": self._data_ref(labeled), "settings": dict(settings or {})}
        if unlabeled is not None:
            payload["unlabeled"] = self._data_ref(unlabeled)
        if name is not None:
            payload["name"] = name
        return self._get_answer("POST", "/jobs", json=payload)

    # -- state and progress ------------------------------------------------------------------------
    def _get_answer(self, method: str, path: str, **kw: Any) -> Dict[str, Any]:
        data = self._request(method, path, **kw)[2]  # type: ignore[attr-defined]
        return json.loads(data.decode("utf-8")) if data else {}

    def job(self, job_id: str) -> Dict[str, Any]:
        """``{job_id, name, state, position, step, total, last, error?, ...}``."""
        return self._get_answer("GET", f"/jobs/{job_id}")

    def jobs(self) -> List[Dict[str, Any]]:
        """Every job on the server, oldest first."""
        return list(self._get_answer("GET", "/jobs")["jobs"])

    def job_progress(self, job_id: str, after: int = 0, wait: float = 0.0) -> Dict[str, Any]:
        """``{lines: [progress objects], next, state}``: the records after the first ``after``;
        ``wait`` > 0 long-polls up to that many seconds (at most 30) for one."""
        return self._get_answer("GET", f"/jobs/{job_id}/progress", params={"after": int(after), "wait": wait},
                                timeout=self.timeout + wait)  # type: ignore[attr-defined]

    def follow(self, job_id: str, after: int = 0, wait: float = FOLLOW_WAIT_S,
               reconnect_s: float = 0.0) -> Iterator[Dict[str, Any]]:
        """The job's progress objects from record ``after`` on, as they come, until the job ends
        (stopped, interrupted, done, failed); then ask :meth:`job` for the outcome.

        Args:
            reconnect_s: when the server goes away, keep trying this long (a server restarting on
                the same jobs folder keeps the job) before raising ServiceUnavailable.
        """
        from .client import ServiceUnavailable

        cursor = int(after)
        lost_since: Optional[float] = None
        while True:
            try:
                answer = self.job_progress(job_id, cursor, wait)
            except ServiceUnavailable:
                lost_since = lost_since if lost_since is not None else time.monotonic()
                if time.monotonic() - lost_since > reconnect_s:
                    raise
                time.sleep(1.0)
                continue
            lost_since = None
            for record in answer["lines"]:
                yield record
            cursor = int(answer["next"])
            if answer["state"] in JOB_END_STATES and not answer["lines"]:
                return

    def stream_job(self, job_id: str, after: int = 0) -> Iterator[Dict[str, Any]]:
        """The NDJSON stream of a job: its progress objects, then ``{"state": ...}`` as the last one."""
        return self._stream_lines(f"/jobs/{job_id}/stream", {"after": int(after)})  # type: ignore[attr-defined]

    # -- control -----------------------------------------------------------------------------------
    def stop_job(self, job_id: str) -> Dict[str, Any]:
        """Ask the job to stop at its next clean point (it keeps a checkpoint); a queued job ends at once."""
        return self._get_answer("POST", f"/jobs/{job_id}/stop")

    def resume_job(self, job_id: str) -> Dict[str, Any]:
        """Queue a stopped, interrupted or failed job again; it continues from its checkpoint."""
        return self._get_answer("POST", f"/jobs/{job_id}/resume")

    # -- files -------------------------------------------------------------------------------------
    def job_model(self, job_id: str) -> bytes:
        """The bytes of the job's task model (``.ssstask``).

        Raises:
            ServiceError: 404 ``no_model`` while the job has none yet.
        """
        return self._request("GET", f"/jobs/{job_id}/model")[2]  # type: ignore[attr-defined]

    def job_curves(self, job_id: str) -> bytes:
        """The bytes of the job's loss and validation curves (PNG).

        Raises:
            ServiceError: 404 ``no_curves`` before the first validation.
        """
        return self._request("GET", f"/jobs/{job_id}/curves.png")[2]  # type: ignore[attr-defined]

    def download_model(self, job_id: str, path: "Union[str, os.PathLike[str]]") -> str:
        """Save the job's task model at ``path`` (atomically); returns the path. Raises as :meth:`job_model`."""
        return _write_atomic(path, self.job_model(job_id))

    def download_curves(self, job_id: str, path: "Union[str, os.PathLike[str]]") -> str:
        """Save the job's curves (PNG) at ``path`` (atomically); returns the path. Raises as :meth:`job_curves`."""
        return _write_atomic(path, self.job_curves(job_id))
