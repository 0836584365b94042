"""Resumable download of one file over HTTP(S) into a ``.part`` file (standard library only).

The caller owns what happens next (checking the hash, renaming into place): this module only
guarantees that, when :func:`fetch_resumable` returns, the ``.part`` file holds the whole body the
server announced, flushed to disk, together with its SHA-256.

Resuming: when a ``.part`` file already exists, the request carries ``Range: bytes=N-``. A server
that honours it answers ``206`` with a matching ``Content-Range`` and the bytes are appended; one that
ignores it answers ``200`` with the whole file, and the ``.part`` file is restarted from zero. A
stream that breaks in the middle (connection reset, early close, read timeout) is resumed the same
way, up to ``retries`` times within one call; after that the ``.part`` file is kept so that a later
call resumes where this one stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import WeightsError

log = logging.getLogger(__name__)

#: ``progress(bytes_on_disk, total_bytes_or_None)``. Counts only go back to 0 when a server ignores
#: ``Range`` and the download restarts. An exception raised by the callback (e.g. ``Cancelled``)
#: stops the download and keeps the ``.part`` file for a later resume.
ProgressCallback = Callable[[int, "int | None"], None]

CHUNK_BYTES = 1 << 20
HASH_CHUNK_BYTES = 4 << 20
# Seconds to wait before the n-th resume of a broken stream (capped), so a flapping link is not hammered.
RETRY_BACKOFF_S = 0.5
RETRY_BACKOFF_MAX_S = 5.0

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


class FetchError(WeightsError):
    """A download failed. ``offline`` is True when the server could not be reached at all."""

    def __init__(self, url: str, reason: str, *, offline: bool = False, partial_bytes: int = 0) -> None:
        self.url = url
        self.reason = reason
        self.offline = offline
        self.partial_bytes = partial_bytes
        super().__init__(f"{url}: {reason}")


class _Broken(Exception):
    """The stream ended early; the ``.part`` file holds what arrived and can be resumed."""


@dataclasses.dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_resumable` left in the ``.part`` file."""

    size: int
    sha256: str
    #: requests made, including resumes after a broken stream.
    requests: int
    #: bytes that were already on disk when this call started (0 for a fresh download).
    resumed_from: int


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_resumable(
    url: str,
    part: Path,
    *,
    expected_size: int | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> FetchResult:
    """Download ``url`` into ``part``, resuming what is already there.

    Args:
        url: ``http``, ``https`` or ``file`` URL.
        part: the ``.part`` file; its folder is created if needed.
        expected_size: size in bytes the file must have (from a registry), or None.
        progress: see :data:`ProgressCallback`.
        timeout: seconds allowed for connecting and for each read.
        retries: resumes allowed after a broken stream within this call.

    Raises:
        FetchError: the server is unreachable (``offline``), answered an HTTP error, announced a size
            other than ``expected_size``, or the stream kept breaking. The ``.part`` file is kept
            whenever it can be resumed, and deleted when its content is known to be wrong.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    started_with = part.stat().st_size if part.exists() else 0
    reporter = _MonotoneReporter(progress)
    requests = 0
    broken = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have > expected_size:
            log.warning("%s is larger than the expected %d bytes; restarting the download", part, expected_size)
            part.unlink()
            have = 0
        if expected_size is not None and have == expected_size and have > 0:
            break  # an earlier call got every byte but stopped before checking them
        requests += 1
        try:
            if _stream_once(url, part, have, expected_size, reporter, timeout, reached_before=requests > 1):
                break
        except _Broken as error:
            broken += 1
            kept = part.stat().st_size if part.exists() else 0
            if broken > retries:
                raise FetchError(url, f"the download kept breaking ({error})", partial_bytes=kept) from error
            wait = min(RETRY_BACKOFF_S * (broken - 1), RETRY_BACKOFF_MAX_S)
            log.warning("download of %s broke at %d bytes (%s); resuming in %.1f s", url, kept, error, wait)
            time.sleep(wait)
    _flush_to_disk(part)
    size = part.stat().st_size
    return FetchResult(size=size, sha256=file_sha256(part), requests=requests, resumed_from=started_with)


class _MonotoneReporter:
    """Forwards progress only when the byte count changes, so a resume does not repeat a count."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._last: tuple[int, int | None] | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._callback is None or self._last == (done, total):
            return
        self._last = (done, total)
        self._callback(done, total)


def _stream_once(
    url: str,
    part: Path,
    have: int,
    expected_size: int | None,
    report: _MonotoneReporter,
    timeout: float,
    *,
    reached_before: bool,
) -> bool:
    """One request; appends to or rewrites ``part``. Returns True when the body is complete."""
    headers = {"User-Agent": f"sss-lib/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            return _handle_unsatisfiable_range(url, part, have, error)
        raise FetchError(url, f"the server answered HTTP {error.code} {error.reason}", partial_bytes=have) from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        if reached_before:
            # The server answered earlier in this call: treat it as a flapping link and resume.
            raise _Broken(f"reconnecting failed: {_reason(error)}") from error
        raise FetchError(url, _reason(error), offline=True, partial_bytes=have) from error

    with response:
        status = getattr(response, "status", None) or 200  # file:// responses carry no status
        if status == 206:
            start, total = _parse_content_range(url, response.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Broken(f"the server resumed at byte {start} instead of {have}")
            mode = "ab"
        elif status == 200:
            if have:
                log.info("%s ignores Range requests; downloading it again from the start", url)
                have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise FetchError(url, f"unexpected HTTP status {status}", partial_bytes=have)
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise FetchError(
                url, f"the server announces {total} bytes but {expected_size} bytes are expected; "
                "the URL points at a different file"
            )
        done = have
        with open(part, mode) as sink:
            report(done, total)
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (http.client.IncompleteRead, OSError, http.client.HTTPException) as error:
                    raise _Broken(_reason(error)) from error
                if not chunk:
                    break
                sink.write(chunk)
                done += len(chunk)
                report(done, total)
    if total is not None and done < total:
        raise _Broken(f"the connection closed after {done} of {total} bytes")
    if total is not None and done > total:
        part.unlink(missing_ok=True)
        raise FetchError(url, f"the server sent {done} bytes after announcing {total}")
    return True


def _handle_unsatisfiable_range(url: str, part: Path, have: int, error: urllib.error.HTTPError) -> bool:
    """416: our ``.part`` is at least as long as the file. Complete if equal, else start over."""
    match = _UNSATISFIED_RANGE.search(error.headers.get("Content-Range", "") if error.headers else "")
    if match and int(match.group(1)) == have:
        return True
    log.warning("%s: the partial download (%d bytes) does not fit the file; restarting", url, have)
    part.unlink(missing_ok=True)
    raise _Broken("the partial download did not match the file on the server")


def _parse_content_range(url: str, value: str | None) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not match:
        raise FetchError(url, f"the server answered 206 with an unreadable Content-Range {value!r}")
    start, end, total = match.groups()
    return int(start), (None if total == "*" else int(total))


def _flush_to_disk(path: Path) -> None:
    # The caller renames the file into place next; without fsync a crash could leave a renamed but
    # empty file on some filesystems.
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        inner = error.reason
        if isinstance(inner, socket.gaierror):
            return f"the host name could not be resolved ({inner})"
        if isinstance(inner, (TimeoutError, socket.timeout)):
            return "the connection timed out"
        if isinstance(inner, ConnectionRefusedError):
            return "the connection was refused"
        return str(inner)
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "the connection timed out"
    if isinstance(error, http.client.IncompleteRead):
        return f"the connection closed early ({len(error.partial)} bytes in the last read)"
    return f"{type(error).__name__}: {error}"
