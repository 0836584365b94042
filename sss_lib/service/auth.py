"""Who may talk to the service: the bearer token (constant-time compare) and the API version.

:class:`AuthMiddleware` is plain ASGI, so it answers before any route runs or any body is parsed:
no ``Authorization: Bearer TOKEN`` -> 401, a wrong token -> 403, ``X-SSS-API-Version`` naming
another major version -> 409. The OpenAPI schema and its docs page are readable without a token
(a browser cannot send one; they hold no data).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable

from . import protocol

#: Paths answered without a token (no data in them).
PUBLIC_PATHS = frozenset({f"{protocol.API_PREFIX}/openapi.json", f"{protocol.API_PREFIX}/docs",
                          f"{protocol.API_PREFIX}/docs/oauth2-redirect"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: How much of a refused request's body is read and dropped before answering, at most.
DISCARD_BYTES = 64 * 1024 * 1024
DISCARD_S = 5.0


def check_token(authorization: str | None, token: str) -> tuple[int, str, str] | None:
    """None when ``authorization`` (the header's value) carries ``token``, else ``(status, code, message)``."""
    if not authorization:
        return (401, "missing_token", "this request carries no token: send 'Authorization: Bearer TOKEN' with "
                "the token from the server's token file")
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != protocol.AUTH_SCHEME.lower() or not given.strip():
        return (401, "missing_token", "the Authorization header is not 'Bearer TOKEN': send the token from "
                "the server's token file")
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        return (403, "bad_token", "the token is wrong: use the token from the token file this server was "
                "started with (a restarted server may have a new one)")
    return None


def header(scope: Scope, name: str) -> str | None:
    """The value of request header ``name`` (case-insensitive), or None."""
    key = name.lower().encode("latin-1")
    for k, v in scope.get("headers", ()):
        if k == key:
            return v.decode("latin-1")
    return None


async def send_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    """Answer with the JSON error body (before anything else was sent)."""
    body = json.dumps(protocol.error_body(code, message)).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def discard_body(receive: Receive) -> None:
    """Read and drop what the client is still sending (at most :data:`DISCARD_BYTES` or
    :data:`DISCARD_S`), nothing kept: closing a socket with unread data resets the connection,
    and the client would lose the error answer before reading it."""
    dropped = 0
    deadline = asyncio.get_running_loop().time() + DISCARD_S
    while dropped < DISCARD_BYTES:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class AuthMiddleware:
    """ASGI middleware: token, then API version, on every HTTP request but :data:`PUBLIC_PATHS`."""

    def __init__(self, app: Any, token: str) -> None:
        if len(token) < protocol.MIN_TOKEN_LENGTH:
            raise ValueError(f"the service token must have at least {protocol.MIN_TOKEN_LENGTH} characters")
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        refused = check_token(header(scope, protocol.AUTH_HEADER), self.token)
        if refused is None:
            mismatch = protocol.check_api_version(header(scope, protocol.VERSION_HEADER))
            if mismatch is not None:
                refused = (409, "version_mismatch", mismatch)
        if refused is not None:
            has_body = header(scope, "content-length") not in (None, "0") or \
                header(scope, "transfer-encoding") is not None
            if has_body:
                # Drained (bounded, never kept) so that the client reads the answer instead of a
                # connection reset; the connection is closed after it all the same.
                await discard_body(receive)
            await send_error(send, *refused, close=has_body)
            return
        await self.app(scope, receive, send)
