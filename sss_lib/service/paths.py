"""Client-named paths: they must lie inside the service's ``--data-root``.

Torch-free and fastapi-free; the jobs part imports :func:`resolve_under_root` for ``{path}``
datasets.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import SSSError


class PathRefused(SSSError):
    """A client-named path that the service will not open (HTTP 403 ``path_refused`` / 400 when malformed).

    Attributes:
        code: ``path_refused`` (outside the data root, or no data root), ``bad_path`` (malformed).
    """

    def __init__(self, message: str, code: str = "path_refused") -> None:
        super().__init__(message)
        self.code = code


def resolve_under_root(relative: str, data_root: str | Path | None, *, must_exist: bool = True) -> Path:
    """The real path of ``relative`` (a client-named path, relative to ``data_root``).

    Symbolic links are resolved before the check, so a link inside the root that points outside
    it is refused like a ``..`` that climbs out. Absolute paths are refused.

    Raises:
        PathRefused: no data root configured; the path is empty, absolute, holds a NUL byte,
        leads outside the root, or (``must_exist``) does not exist.
    """
    if data_root is None:
        raise PathRefused("this service accepts no paths (it was started without --data-root): "
                          "upload the data instead, or restart the service with --data-root DIR")
    if not isinstance(relative, str) or not relative.strip():
        raise PathRefused("the path is empty: give a path relative to the service's data root", "bad_path")
    if "\x00" in relative:
        raise PathRefused("the path holds a NUL byte", "bad_path")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or relative.startswith("~"):
        raise PathRefused(f"{relative!r} is absolute: give a path relative to the service's data root",
                          "bad_path")
    root = Path(data_root).resolve(strict=False)
    candidate = (root / relative).resolve(strict=False)
    if candidate != root and root not in candidate.parents:
        raise PathRefused(f"{relative!r} leads outside the service's data root: give a path inside it "
                          "(symbolic links are followed before this check)")
    if must_exist and not os.path.exists(candidate):
        raise PathRefused(f"{relative!r} does not exist under the service's data root", "path_not_found")
    return candidate
