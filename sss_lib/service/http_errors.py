"""Errors the service answers on purpose: :class:`ApiError` and the mapping of library errors.

Every error reaches the client as ``{"error": {"code", "message"}}`` (see
:func:`sss_lib.service.protocol.error_body`) with the status given here; never a traceback.
fastapi-free, so the jobs part and tests can raise and inspect these without a server.
"""

from __future__ import annotations

from ..errors import Cancelled, DeviceError, InputError, PromptError, SSSError, WeightsError


class ApiError(SSSError):
    """An error answer: HTTP ``status``, a snake_case ``code`` and a message that says what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found(kind: str, ident: str, what_to_do: str) -> ApiError:
    """404 ``unknown_<kind>``: ``"unknown session 'x': <what_to_do>"``."""
    return ApiError(404, f"unknown_{kind}", f"unknown {kind} {ident!r}: {what_to_do}")


def from_library_error(err: SSSError) -> ApiError:
    """The answer for an error the library raised on purpose."""
    if isinstance(err, ApiError):
        return err
    from ..task_model import TaskModelError
    from .paths import PathRefused

    message = str(err)
    if isinstance(err, PathRefused):
        status = {"bad_path": 400, "path_not_found": 404}.get(err.code, 403)
        return ApiError(status, err.code, message)
    if isinstance(err, PromptError):
        return ApiError(422, "bad_prompts", message)
    if isinstance(err, TaskModelError):
        return ApiError(422, "bad_model", message)
    if isinstance(err, WeightsError):
        return ApiError(503, "weights_unavailable", message)
    if isinstance(err, DeviceError):
        return ApiError(503, "device_unavailable", message)
    if isinstance(err, Cancelled):
        return ApiError(409, "cancelled", message)
    if isinstance(err, InputError):
        return ApiError(422, "bad_input", message)
    return ApiError(400, "bad_request", message)
