"""Errors the library raises on purpose. Each carries a message that says what to do.

The CLI prints ``str(error)`` on one line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class SSSError(Exception):
    """Base of every error the library raises on purpose (never a bug)."""


class InputError(SSSError):
    """A user-supplied file or value is unusable. The message names the file and the problem."""

    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path = str(path) if path is not None else ""
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        tail = f" {fix}" if fix else ""
        super().__init__(f"{where}{problem}.{tail}".replace("..", "."))


class PromptError(SSSError):
    """A prompt is malformed or lies outside the volume."""


class WeightsError(SSSError):
    """A checkpoint is missing, damaged, does not match its model, or cannot be downloaded."""


class DeviceError(SSSError):
    """The requested compute device is not available."""


class Cancelled(SSSError):
    """A run was cancelled by its caller; nothing was written."""
