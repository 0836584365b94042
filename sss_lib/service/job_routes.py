"""Training-job endpoints: ``/v1/uploads`` and ``/v1/jobs`` (see docs/service_api.md).

:func:`build_jobs_router` makes the :class:`~sss_lib.service.jobs.JobManager` for a
:class:`~sss_lib.service.config.ServiceConfig` and returns a router whose lifespan starts it (jobs
reloaded, scheduler running) and closes it when the server shuts down (running trainers asked to
stop at a clean point). Errors are :class:`~sss_lib.service.http_errors.ApiError`, answered by the
app's handler as ``{"error": {code, message}}``.

Long-polls and streams wait with ``asyncio.sleep``, never in a worker thread, so any number of
followers costs no thread; blocking work (extracting an archive, reading a dataset's file list)
runs in the thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import Request  # at module level: FastAPI resolves the routes' annotations here

from .http_errors import ApiError
from .jobs import END_STATES, JobManager
from .protocol import MAX_WAIT_S, NDJSON_TYPE, OCTET_TYPE
from .uploads import EXTRACT_FACTOR

log = logging.getLogger(__name__)

#: Seconds between two looks at a job's progress file while a request waits for news.
POLL_S = 0.2
_CHUNK = 1 << 20


def training_gpus(config: Any) -> tuple[int, str]:
    """``(gpus, device)`` for training jobs: the GPUs jobs may use (0: the CPU, one job at a time)
    and the trainer's ``--device`` when no GPU is used.

    ``--device cpu`` or ``mps`` trains there; otherwise every visible CUDA GPU, at most
    ``config.gpus`` of them when given.
    """
    device = str(config.device or "auto")
    if device in ("cpu", "mps"):
        return 0, device
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = visible if config.gpus is None else min(int(config.gpus), visible)
    if config.gpus is not None and int(config.gpus) > visible:
        log.warning("--gpus %s but %d CUDA GPU(s) are visible: training jobs use %d", config.gpus, visible, gpus)
    return gpus, ("cpu" if device.startswith("cuda") and gpus == 0 else device)


def build_manager(config: Any) -> JobManager:
    """The job manager for ``config`` (not started)."""
    gpus, device = training_gpus(config)
    return JobManager(config.resolved_jobs_dir(), data_root=config.data_root, gpus=gpus, device=device,
                      max_extract=EXTRACT_FACTOR * int(config.max_upload_bytes))


async def _body_to_file(request: Any, manager: JobManager) -> str:
    """Stream the request body to a new file of the upload store (the app's body limit applies)."""
    path, out = manager.uploads.new_body_file()
    try:
        with out:
            async for chunk in request.stream():
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return str(path)


def _open_file(path: os.PathLike[str] | str) -> tuple[Any, int]:
    # Opened before the answer starts: a file the trainer replaces meanwhile (atomic rename) is
    # still sent whole, as it was.
    f = open(path, "rb")
    return f, os.fstat(f.fileno()).st_size


def _file_answer(path: Any, media_type: str, filename: str) -> Any:
    from fastapi.responses import StreamingResponse

    f, size = _open_file(path)

    def chunks():
        with f:
            while True:
                data = f.read(_CHUNK)
                if not data:
                    return
                yield data

    return StreamingResponse(chunks(), media_type=media_type,
                             headers={"Content-Length": str(size),
                                      "Content-Disposition": f'attachment; filename="{filename}"'})


def _json_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(422, "bad_request", "the body must be a JSON object such as "
                       '{"labeled": {"upload_id": "..."}, "settings": {"iterations": 300}}')
    unknown = set(data) - {"labeled", "unlabeled", "settings", "name"}
    if unknown:
        raise ApiError(422, "bad_request", f"unknown field(s) {', '.join(sorted(unknown))}; a job takes labeled, "
                       "unlabeled, settings and name")
    if "labeled" not in data:
        raise ApiError(422, "bad_request", 'labeled is required: {"upload_id": ID} or {"path": PATH}')
    if not isinstance(data.get("settings", {}), dict):
        raise ApiError(422, "bad_settings", 'settings must be a JSON object such as {"iterations": 300}')
    return data


def _wait_s(wait: float) -> float:
    return min(max(0.0, float(wait)), MAX_WAIT_S)


def build_jobs_router(config: Any) -> Any:
    """The ``/v1/uploads`` and ``/v1/jobs`` routes for ``config`` (a ServiceConfig); the router's
    lifespan starts and closes its :class:`JobManager` (also at ``router.job_manager``)."""
    from fastapi import APIRouter
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    manager = build_manager(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await run_in_threadpool(manager.start)
        try:
            yield
        finally:
            await run_in_threadpool(manager.close)

    router = APIRouter(lifespan=lifespan)
    router.job_manager = manager  # type: ignore[attr-defined]

    @router.post("/v1/uploads", status_code=201)
    async def upload(request: Request) -> dict[str, Any]:
        """Upload a ``.zip`` or ``.tar.gz`` of a dataset folder (nnU-Net v2 raw); answers
        ``{upload_id, cases, labeled, unlabeled, layout, classes}``."""
        body = await _body_to_file(request, manager)
        return await run_in_threadpool(manager.uploads.add_archive, body)

    @router.post("/v1/jobs", status_code=201)
    async def submit(request: Request) -> dict[str, Any]:
        """Queue a training job: ``{labeled: {upload_id}|{path}, unlabeled?, settings?, name?}``."""
        try:
            data = _json_object(await request.json())
        except ValueError:
            raise ApiError(400, "bad_json", "the body is not valid JSON") from None
        return await run_in_threadpool(manager.submit, data["labeled"], data.get("unlabeled"),
                                       data.get("settings") or {}, data.get("name"))

    @router.get("/v1/jobs")
    async def list_jobs() -> dict[str, Any]:
        """Every job, oldest first: ``{jobs: [...]}``."""
        return {"jobs": manager.list()}

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        """One job: state, queue position, step, total, last progress object, error."""
        return manager.get(job_id)

    @router.get("/v1/jobs/{job_id}/progress")
    async def progress(job_id: str, after: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """The trainer's progress objects after the first ``after``; ``wait`` long-polls (at most
        30 s) until there is one or the job has ended."""
        deadline = time.monotonic() + _wait_s(wait)
        while True:
            answer = manager.progress(job_id, after)
            if answer["lines"] or answer["state"] in END_STATES or time.monotonic() >= deadline:
                return answer
            await asyncio.sleep(POLL_S)

    @router.get("/v1/jobs/{job_id}/stream")
    async def stream(job_id: str, request: Request, after: int = 0) -> Any:
        """NDJSON: the trainer's progress objects as they come, then ``{"state": ...}`` once the job ends."""
        import json

        manager.get(job_id)  # 404 before the answer starts

        async def lines() -> AsyncIterator[bytes]:
            cursor = max(0, int(after))
            while True:
                answer = manager.progress(job_id, cursor)
                cursor = answer["next"]
                if answer["lines"]:
                    yield "".join(json.dumps(r) + "\n" for r in answer["lines"]).encode()
                if answer["state"] in END_STATES:
                    yield (json.dumps({"state": answer["state"]}) + "\n").encode()
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_S)

        return StreamingResponse(lines(), media_type=NDJSON_TYPE)

    @router.post("/v1/jobs/{job_id}/stop", status_code=202)
    async def stop(job_id: str) -> dict[str, Any]:
        """Stop at the next clean point (a checkpoint is kept); a queued job ends at once."""
        return manager.stop(job_id)

    @router.post("/v1/jobs/{job_id}/resume", status_code=202)
    async def resume(job_id: str) -> dict[str, Any]:
        """Queue a stopped, interrupted or failed job again; it continues from its checkpoint."""
        return manager.resume(job_id)

    @router.get("/v1/jobs/{job_id}/curves.png")
    async def curves(job_id: str) -> Any:
        """The loss and validation curves (404 until the first validation)."""
        return _file_answer(manager.file(job_id, "curves"), "image/png", f"{job_id}-curves.png")

    @router.get("/v1/jobs/{job_id}/model")
    async def model(job_id: str) -> Any:
        """The task model (``.ssstask``; 404 until the job is done or stopped after a checkpoint)."""
        return _file_answer(manager.file(job_id, "model"), OCTET_TYPE, f"{job_id}.ssstask")

    return router
