"""Run the SSS service on this machine as a child process (Slicer, the CLI, tests).

``LocalService`` starts ``python -m sss_lib serve --port 0 --token-file F ...`` with a fresh random
token in a file only the user can read, reads the JSON ready line from the child's stdout (on a
thread, so nothing ever blocks past a timeout), and stops the child with SIGTERM, then a kill after
a grace period. The child's stderr (its log) goes to a file whose path :attr:`LocalService.log_path`
names; a child that dies before it is ready raises :class:`ServiceStartError` quoting that log.

Standard library only, Python 3.9 compatible; nothing heavy is imported here.

::

    service = LocalService(["--device", "cpu"]).start().wait_ready(timeout=120)
    client = service.client()
    ...
    service.stop()

From a Qt timer: ``start()`` once, then call ``poll_ready()`` (never blocks) until it returns True.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Dict, List, Optional, Sequence

from ..errors import SSSError
from . import protocol

log = logging.getLogger(__name__)

#: Lines of the service's log quoted when it dies before it is ready.
LOG_TAIL_LINES = 20


class ServiceStartError(SSSError):
    """The service process exited, or did not report ready in time; the message quotes its log."""


class LocalService:
    """A service child process on the loopback interface.

    Args:
        args: extra ``serve`` arguments, e.g. ``["--device", "cpu", "--memory-budget", "2"]``.
        python: the interpreter to run (default: this one, ``sys.executable``).
        env: the child's environment (default: this process's).
        log_path: where the child's stderr goes (default: a new temporary file, kept after stop).
        ready_timeout: seconds :meth:`wait_ready` waits by default.
    """

    def __init__(self, args: Sequence[str] = (), *, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, log_path: Optional[str] = None,
                 ready_timeout: float = 180.0) -> None:
        self.args = [str(a) for a in args]
        self.python = python or sys.executable
        self.env = env
        self.ready_timeout = float(ready_timeout)
        self.log_path = log_path
        self.token: Optional[str] = None
        self.token_file: Optional[str] = None
        self.ready_info: Optional[Dict[str, Any]] = None
        self._proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[bytes]] = None
        self._ready = threading.Event()
        self._stdout_tail: "collections.deque[str]" = collections.deque(maxlen=LOG_TAIL_LINES)

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self) -> List[str]:
        """The child's command line (the token file is made by :meth:`start`)."""
        return [self.python, "-m", "sss_lib", "serve", "--host", "127.0.0.1", "--port", "0",
                "--token-file", str(self.token_file), *self.args]

    def start(self) -> "LocalService":
        """Start the child and return at once (see :meth:`poll_ready` / :meth:`wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError("this LocalService was started already")
        self.token = secrets.token_urlsafe(32)
        fd, self.token_file = tempfile.mkstemp(prefix="sss-token-", suffix=".txt")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="sss-service-", suffix=".log")
            os.close(fd)
        self._log = open(self.log_path, "ab")
        kwargs: Dict[str, Any] = {}
        if os.name != "nt":
            kwargs["start_new_session"] = True  # Ctrl+C in a terminal reaches us, not the service
        self._proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._log, env=self.env, **kwargs)
        threading.Thread(target=self._read_stdout, name="sss-service-stdout", daemon=True).start()
        log.info("started the SSS service (pid %d), log %s", self._proc.pid, self.log_path)
        return self

    def _read_stdout(self) -> None:
        """Find the ready line, then keep draining stdout so the child never blocks on a full pipe."""
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            if not self._ready.is_set():
                info = protocol.parse_ready_line(line)
                if info is not None:
                    self.ready_info = info
                    self._ready.set()
                    continue
            self._stdout_tail.append(line.rstrip())
        proc.stdout.close()

    def poll_ready(self) -> bool:
        """True once the service is listening; False while it starts. Never blocks.

        Raises:
            ServiceStartError: the child exited before it was ready (the message quotes its log).
        """
        if self._proc is None:
            raise RuntimeError("call start() first")
        if self._ready.is_set():
            return True
        if self._proc.poll() is not None:
            self._ready.wait(0.5)  # the reader thread may still hold the ready line
            if self._ready.is_set():
                return True
            raise ServiceStartError(self._died_message(f"exited with status {self._proc.returncode}"))
        return False

    def wait_ready(self, timeout: Optional[float] = None) -> "LocalService":
        """Block until the service is ready (at most ``timeout`` s, default ``ready_timeout``).

        Raises:
            ServiceStartError: the child exited first, or was not ready in time (then it is stopped).
        """
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else float(timeout))
        while not self.poll_ready():
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise ServiceStartError(self._died_message(
                    f"did not report ready within {self.ready_timeout if timeout is None else timeout:.0f} s"))
            self._ready.wait(min(0.2, left))
        return self

    def alive(self) -> bool:
        """True while the child process runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace: float = 30.0) -> Optional[int]:
        """Stop the service: SIGTERM (Windows: terminate), then kill after ``grace`` seconds.

        Returns the child's exit status (None if it was never started). The token file is removed.
        """
        proc = self._proc
        code: Optional[int] = None
        if proc is not None:
            if proc.poll() is None:
                if os.name == "nt":
                    proc.terminate()
                else:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    log.warning("the SSS service (pid %d) did not stop within %.0f s: killing it", proc.pid, grace)
                    proc.kill()
                    proc.wait()
            code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.token_file and os.path.exists(self.token_file):
            os.unlink(self.token_file)
        return code

    def __enter__(self) -> "LocalService":
        if self._proc is None:
            self.start()
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what callers use ------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` from the ready line."""
        if self.ready_info is None:
            raise RuntimeError("the service is not ready yet (wait_ready() or poll_ready())")
        return str(self.ready_info["url"])

    def client(self, timeout: float = 30.0, **kwargs: Any):  # noqa: ANN201 - ServiceClient
        """A :class:`~sss_lib.service.client.ServiceClient` for this service (checks its API version)."""
        from .client import ServiceClient

        return ServiceClient(self.url, str(self.token), timeout, **kwargs)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> List[str]:
        """The last ``lines`` lines of the service's log (stderr)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return []
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        return [ln for ln in text.splitlines() if ln.strip()][-lines:]

    def _died_message(self, what: str) -> str:
        tail = self.log_tail() or list(self._stdout_tail)
        quoted = "\n".join("  | " + ln for ln in tail) if tail else "  (the log is empty)"
        return (f"the SSS service ({' '.join(self.command()[:4])} ...) {what}. "
                f"Its log {self.log_path} ends with:\n{quoted}")
