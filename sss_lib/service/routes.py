"""The ``/v1`` inference endpoints: info, volumes, models, sessions, runs (see docs/service_api.md).

Handlers never run inference: a run is queued on its device's worker (runs.py) and answered 202
at once. Blocking work that is not inference (decoding an upload, building a backbone when a
session opens, parsing prompts) runs in the web server's thread pool, never on the event loop.
Long-polls and streams wait with ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Literal, Optional

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import InputError
from ..prompts import PromptSet
from . import protocol
from .http_errors import ApiError
from .runs import Run, auto_segment_work, full_result, segment_work
from .sessions import AXIS_NAMES, Session, SessionRequest
from .state import ServiceState

#: Seconds between two looks at a run while a request waits for news.
POLL_S = 0.05


class SessionBody(BaseModel):
    volume_id: str = Field(description="from POST /v1/volumes")
    backbone: str = Field("auto", description="'auto', 'litemedsam' or a SAM-2.1 name (prompts sessions)")
    task_model: Optional[str] = Field(None, description="a model_id from POST /v1/models, or a name from --models")
    slice_axis: Literal["auto", "i", "j", "k"] = "auto"
    modality: Literal["auto", "CT", "MR", "other"] = "auto"
    window: Optional[tuple[float, float]] = Field(None, description="CT window [low, high] in HU")


class SegmentBody(BaseModel):
    prompts: dict[str, Any] = Field(description="an SSS prompts document (voxel or physical coordinates)")


class AutoSegmentBody(BaseModel):
    prompts: Optional[dict[str, Any]] = Field(None, description="an edited prompts document from an earlier run")
    prompt_points: Optional[bool] = Field(None, description="automatic prompts with points (None: the backbone's default)")


def _npz(data: bytes) -> Response:
    return Response(content=data, media_type=protocol.NPZ_TYPE)


def _parse_prompts(document: dict[str, Any], session: Session) -> PromptSet:
    """The prompts of a request, checked against the session's volume and slice axis."""
    try:
        prompts = PromptSet.from_json(document, session.volume, source="request")
    except InputError as e:
        raise ApiError(422, "bad_prompts", str(e).removeprefix("request: ")) from None
    if prompts.slice_axis != session.slice_axis:
        raise ApiError(422, "bad_prompts", f"the prompts lie along slice axis {AXIS_NAMES[prompts.slice_axis.axis]} "
                       f"but this session slices along {AXIS_NAMES[session.slice_axis.axis]}: give prompts "
                       f"with \"slice_axis\": \"{AXIS_NAMES[session.slice_axis.axis]}\" or open a session on that axis")
    return prompts


def build_router(state: ServiceState) -> APIRouter:
    """The routes, relative to ``/v1``."""
    router = APIRouter()
    config = state.config

    # -- info --------------------------------------------------------------------------------------
    @router.get("/info")
    def info() -> dict[str, Any]:
        from ..backbones.registry import cached_sam2_names

        return {
            "api_version": protocol.API_VERSION, "sss_version": __version__, "device": state.device,
            "backbones": ["auto", "litemedsam", *cached_sam2_names()],
            "models": [e.describe() for e in state.models.all()],
            "memory_budget_bytes": config.memory_budget_bytes, "max_upload_bytes": config.max_upload_bytes,
            "data_root": config.data_root is not None, "gpus": config.gpus,
            "memory": state.memory.stats(), "sessions": len(state.sessions.all()),
            "runs_active": len(state.runs.active()), "session_ttl_s": config.session_ttl_s,
            "prefetch": config.prefetch, "preload": state.preloader.describe(),
        }

    # -- volumes and models --------------------------------------------------------------------------
    @router.post("/volumes", openapi_extra={"requestBody": {"content": {protocol.NPZ_TYPE: {"schema": {
        "type": "string", "format": "binary"}}}, "required": True}})
    async def upload_volume(request: Request) -> dict[str, Any]:
        """npz with ``voxels`` ([k, j, i]), ``spacing``, ``origin``, ``direction``; the same content again is reused."""
        data = await request.body()
        stored, reused = await run_in_threadpool(state.volumes.add_npz, data)
        return {"volume_id": stored.volume_id, "shape_kji": stored.shape_kji, "reused": reused}

    @router.post("/models", openapi_extra={"requestBody": {"content": {protocol.OCTET_TYPE: {"schema": {
        "type": "string", "format": "binary"}}}, "required": True}})
    async def upload_model(request: Request, name: Optional[str] = Query(None, max_length=200)) -> dict[str, Any]:
        """A ``.ssstask`` file's bytes; ``model_id`` is their SHA-256."""
        data = await request.body()
        entry = await run_in_threadpool(state.models.add_bytes, data, name)
        return entry.describe()

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        return {"models": [e.describe() for e in state.models.all()]}

    # -- sessions ------------------------------------------------------------------------------------
    @router.post("/sessions")
    def open_session(body: SessionBody) -> dict[str, Any]:
        request = SessionRequest(body.volume_id, body.backbone, body.task_model, body.slice_axis, body.modality,
                                 tuple(body.window) if body.window is not None else None)
        return state.sessions.open(request).describe()

    @router.get("/sessions/{session_id}")
    def get_session(session_id: str) -> dict[str, Any]:
        session = state.sessions.get(session_id)
        out = session.describe()
        out["last_run_id"] = session.labels_run_id
        out["embedded_slices"] = len(session.store.cached_slices(session.engine.key))
        out["prefetched"] = session.prefetched
        return out

    @router.delete("/sessions/{session_id}", status_code=204)
    def close_session(session_id: str) -> Response:
        state.close_session(state.sessions.close(session_id))
        return Response(status_code=204)

    @router.post("/sessions/{session_id}/segment", status_code=202)
    def segment(session_id: str, body: SegmentBody) -> dict[str, Any]:
        session = state.sessions.get(session_id)
        if session.kind != "prompts":
            raise ApiError(409, "wrong_session_kind", "this is a task-model session: use auto-segment (pass your "
                           "edited prompts there to keep them), or open a session with a backbone")
        prompts = _parse_prompts(body.prompts, session)
        return {"run_id": state.runs.submit(session, "segment", segment_work(prompts)).run_id}

    @router.post("/sessions/{session_id}/auto-segment", status_code=202)
    def auto_segment(session_id: str, body: AutoSegmentBody) -> dict[str, Any]:
        session = state.sessions.get(session_id)
        if session.kind != "task":
            raise ApiError(409, "wrong_session_kind", "this session has no task model: use segment with prompts, "
                           "or open a session with task_model")
        edited = _parse_prompts(body.prompts, session) if body.prompts is not None else None
        work = auto_segment_work(edited, body.prompt_points)
        return {"run_id": state.runs.submit(session, "auto-segment", work).run_id}

    # -- runs ----------------------------------------------------------------------------------------
    @router.get("/runs/{run_id}")
    async def run_status(run_id: str, after: int = Query(0, ge=0),
                         wait: float = Query(0.0, ge=0.0, le=protocol.MAX_WAIT_S)) -> dict[str, Any]:
        """Events past ``after``; ``wait`` > 0 holds the answer until there is one or the run ends."""
        run = state.runs.get(run_id)
        deadline = time.monotonic() + wait
        while not run.ended and run.event_count() <= after and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        return run.snapshot(after)

    @router.get("/runs/{run_id}/stream", response_class=StreamingResponse,
                responses={200: {"content": {protocol.NDJSON_TYPE: {}}}})
    async def run_stream(run_id: str) -> StreamingResponse:
        """NDJSON: one event per line, then ``{"state": ...}`` (with ``error`` when failed)."""
        run = state.runs.get(run_id)
        return StreamingResponse(_follow(run, state), media_type=protocol.NDJSON_TYPE)

    @router.post("/runs/{run_id}/cancel", status_code=202)
    def cancel_run(run_id: str) -> dict[str, Any]:
        return state.runs.cancel(run_id).snapshot(0) | {"events": []}

    @router.get("/runs/{run_id}/result", response_class=Response,
                responses={200: {"content": {protocol.NPZ_TYPE: {}}}})
    def run_result(run_id: str, full: bool = False) -> Response:
        run = state.runs.get(run_id)
        if run.state != "done" or run.result_npz is None:
            why = {"failed": f"it failed ({(run.error or {}).get('message', '')})",
                   "cancelled": "it was cancelled"}.get(run.state, f"it is {run.state}")
            raise ApiError(409, "run_not_done", f"run {run_id} has no result: {why}; follow it with "
                           f"GET /v1/runs/{run_id}?wait=30 until it is done")
        return _npz(full_result(run) if full else run.result_npz)

    return router


async def _follow(run: Run, state: ServiceState) -> AsyncIterator[bytes]:
    after = 0
    while True:
        snap = run.snapshot(after)
        for event in snap["events"]:
            yield (json.dumps(event) + "\n").encode()
        after = snap["next"]
        if state.runs.closing and not run.ended:
            # The service is stopping: the run is cancelled at its next slice and never resumes;
            # end the stream now rather than hold up the shutdown until that slice is done.
            snap["state"] = "cancelled"
        if snap["state"] in protocol.RUN_END_STATES:
            last = {"state": snap["state"]}
            if "error" in snap:
                last["error"] = snap["error"]
            yield (json.dumps(last) + "\n").encode()
            return
        await asyncio.sleep(POLL_S)
