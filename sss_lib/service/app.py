"""``create_app(config) -> FastAPI``: the service's routes, error answers, token check and upload limit.

Layers, outermost first: :class:`~sss_lib.service.auth.AuthMiddleware` (token, API version),
:class:`BodyLimitMiddleware` (``--max-upload``: Content-Length checked before anything is read, a
body without a length counted while it is read), then the routes (routes.py and the jobs router).
Every error is answered as ``{"error": {"code", "message"}}``; an unexpected exception is logged
with its traceback on the server and answered 500 ``internal_error`` without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import SSSError
from . import protocol
from .auth import AuthMiddleware, Receive, Scope, Send, discard_body, header, send_error
from .config import MB, ServiceConfig
from .http_errors import ApiError, from_library_error
from .state import ServiceState

log = logging.getLogger(__name__)

_STATUS_CODES = {400: "bad_request", 401: "missing_token", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                 422: "invalid_request"}


#: After a body passes the limit, what is still sent is read and dropped, up to these bounds.


class BodyTooLarge(StarletteHTTPException):
    """A request body passed ``--max-upload`` while being read (413)."""


def too_large_message(limit: int) -> str:
    return (f"the request body is larger than this server's upload limit of {limit / MB:g} MB: send less "
            f"(or restart the service with a larger --max-upload)")


class BodyLimitMiddleware:
    """413 for bodies above ``max_bytes``: by Content-Length before reading, else while reading."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, "content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_error(send, 400, "bad_request", f"Content-Length {declared!r} is not a number", close=True)
                return
            if length > self.max_bytes:
                await send_error(send, 413, "too_large", too_large_message(self.max_bytes), close=True)
                return
        received = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await discard_body(receive)
                    raise BodyTooLarge(413, too_large_message(self.max_bytes))
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, 413, "too_large", too_large_message(self.max_bytes), close=True)


def _error_response(status: int, code: str, message: str) -> JSONResponse:
    # After a 413 the rest of the body is not read: close the connection, or a client still
    # sending (a chunked body) and the server waiting for its end would wait for each other.
    headers = {"Connection": "close"} if status == 413 else None
    return JSONResponse(protocol.error_body(code, message), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.status, err.code, err.message)

    @app.exception_handler(SSSError)
    async def library_error(_: Request, err: SSSError) -> JSONResponse:
        api = from_library_error(err)
        return _error_response(api.status, api.code, api.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for problem in err.errors()[:5]:
            where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {problem.get('msg', 'invalid')}")
        return _error_response(422, "invalid_request", "the request is invalid (" + "; ".join(parts) +
                               "): see /v1/openapi.json for the expected form")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(err.status_code, "http_error")
        if err.status_code == 404 and err.detail == "Not Found":
            message = f"no endpoint {request.method} {request.url.path}: see /v1/openapi.json"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see /v1/openapi.json"
        else:
            message = str(err.detail)
        return _error_response(err.status_code, code, message)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        log.error("unexpected error while answering a request", exc_info=err)
        return _error_response(500, "internal_error", f"the server hit an error ({type(err).__name__}); "
                               "see the server's log, and report it if it repeats")


def resolve_service_device(requested: str) -> str:
    """The device string inference runs on ("cpu", "cuda:0", "mps"). Raises DeviceError."""
    from ..device import resolve_device

    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None:
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def create_app(config: ServiceConfig, *, device: str | None = None) -> FastAPI:
    """The service's ASGI app for ``config`` (whose ``token`` must be set).

    Args:
        config: the settings.
        device: the resolved inference device; None resolves ``config.device`` (imports torch).
    """
    from .job_routes import build_jobs_router
    from .routes import build_router

    state = ServiceState(config, device or resolve_service_device(config.device))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.shutdown()

    app = FastAPI(title="SSS service", version=__version__, lifespan=lifespan,
                  openapi_url=f"{protocol.API_PREFIX}/openapi.json", docs_url=f"{protocol.API_PREFIX}/docs",
                  redoc_url=None,
                  description="SAM-2 / LiteMedSAM volume segmentation and training (see docs/service_api.md).")
    app.state.service = state
    _install_error_handlers(app)
    app.include_router(build_router(state), prefix=protocol.API_PREFIX)
    app.include_router(build_jobs_router(config))
    # Added last = outermost: the token is checked before the body limit, and both before any route.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_upload_bytes)
    app.add_middleware(AuthMiddleware, token=config.token)
    return app
