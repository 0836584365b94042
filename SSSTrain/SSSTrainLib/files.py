"""Small file helpers of the panel's run-folder records: atomic writes (a reader, the panel or SSS
Segment, never sees half a file), a dataclass read back from its JSON file, and a file watched for
changes. Python 3.9 compatible, no Qt.
"""

import dataclasses
import json
import os
from typing import Any, Optional, Type, TypeVar

T = TypeVar("T")


def write_bytes_atomically(path: str, data: bytes) -> None:
    """``data`` into ``path`` (its folder made if missing), through a temporary file and a rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_dataclass(path: str, record: Any) -> str:
    """The dataclass instance ``record`` as indented JSON into ``path``, atomically; returns ``path``."""
    write_bytes_atomically(path, json.dumps(dataclasses.asdict(record), indent=2).encode("utf-8"))
    return path


def read_dataclass(path: str, cls: Type[T]) -> Optional[T]:
    """The ``cls`` instance stored in ``path`` by :func:`write_dataclass`, or None when the file is
    missing or damaged. Keys ``cls`` does not know (written by a newer version) are ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError):  # AttributeError: JSON that is not an object
        return None


class FileWatch:
    """Tells whether the file at ``path`` changed (its modification time) since the last look."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: Optional[int] = None

    def changed(self) -> bool:
        """True when the file exists and is new or modified since the last call that returned True."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        return True
