"""Run a long job (training) in a separate Python process and follow it from the GUI thread.

Training takes hours and needs all of a GPU, so it runs outside Slicer's process (SLICER_API.md
section 5): ``PythonSlicer -m sss_lib <command> ...``. A reader thread moves the child's output lines
to a queue that the panel drains with a QTimer.

Contract with the child process:

* progress: a stdout line ``SSS_PROGRESS {"fraction": 0.25, "message": "epoch 3/12"}`` (JSON object;
  ``fraction`` in 0..1 or null); every other line is log text;
* stop: the child polls the file named by the environment variable ``SSS_STOP_FILE`` and, once it
  exists, finishes the current step, saves what it must and exits with status 0. After
  ``grace_seconds`` the runner terminates the process (PythonSlicer is a launcher: killing it may
  leave the real interpreter running, which is why the stop file comes first).
"""

import dataclasses
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

PROGRESS_PREFIX = "SSS_PROGRESS "
STOP_FILE_ENV = "SSS_STOP_FILE"

LOG = "log"
PROGRESS = "progress"
FINISHED = "finished"


@dataclasses.dataclass
class ProcessMessage:
    """``kind`` LOG (``text``), PROGRESS (``fraction`` or None, ``text``) or FINISHED (``returncode``;
    ``stopped`` when the user asked to stop)."""

    kind: str
    text: str = ""
    fraction: Optional[float] = None
    returncode: Optional[int] = None
    stopped: bool = False


def parse_line(line: str) -> ProcessMessage:
    """One output line as a message; a malformed progress line is kept as log text."""
    line = line.rstrip("\r\n")
    if line.startswith(PROGRESS_PREFIX):
        try:
            data = json.loads(line[len(PROGRESS_PREFIX):])
            fraction = data.get("fraction")
            fraction = None if fraction is None else min(1.0, max(0.0, float(fraction)))
            return ProcessMessage(PROGRESS, text=str(data.get("message", "")), fraction=fraction)
        except (ValueError, TypeError, AttributeError):
            pass
    return ProcessMessage(LOG, text=line)


Launcher = Callable[[List[str], Dict[str, str]], "subprocess.Popen"]


def default_launcher(args: List[str], env_update: Dict[str, str]) -> "subprocess.Popen":
    """Plain ``subprocess.Popen`` with text output, stderr merged (Slicer: launchConsoleProcess)."""
    env = dict(os.environ)
    env.update(env_update)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)


class ProcessRun:
    """One child process, its reader thread and its stop file.

    Args:
        args: the command line.
        env: variables added to the child's environment (``SSS_STOP_FILE`` is added here).
        launcher: starts the process; inside Slicer pass one based on ``slicer.util.launchConsoleProcess``.
    """

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, launcher: Optional[Launcher] = None) -> None:
        self.args = list(args)
        self._env = dict(env or {})
        fd, self.stop_file = tempfile.mkstemp(prefix="sss_stop_", suffix=".flag")
        os.close(fd)
        os.unlink(self.stop_file)  # the file's *existence* is the signal
        self._env[STOP_FILE_ENV] = self.stop_file
        self._launcher = launcher or default_launcher
        self._queue: "queue.Queue[ProcessMessage]" = queue.Queue()
        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._stop_requested_at: Optional[float] = None
        self.finished = False

    def start(self) -> "ProcessRun":
        self._proc = self._launcher(self.args, self._env)
        self._reader = threading.Thread(target=self._read, name="SSS process reader", daemon=True)
        self._reader.start()
        return self

    def stop(self) -> None:
        """Ask the child to stop (stop file); :meth:`poll` terminates it after the grace period."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
            with open(self.stop_file, "w") as f:
                f.write("stop\n")

    def poll(self, grace_seconds: float = 30.0) -> List[ProcessMessage]:
        """Messages since the last poll (main thread); terminates a child that ignores the stop file."""
        if (
            self._stop_requested_at is not None
            and self._proc is not None
            and self._proc.poll() is None
            and time.monotonic() - self._stop_requested_at > grace_seconds
        ):
            self._proc.terminate()
        out = []
        while True:
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                return out
            if msg.kind == FINISHED:
                self.finished = True
                self._cleanup()
            out.append(msg)

    def wait(self, timeout: float = 60.0, grace_seconds: float = 30.0) -> List[ProcessMessage]:
        """Poll until the child ends (tests, scripts)."""
        deadline = time.monotonic() + timeout
        out: List[ProcessMessage] = []
        while not self.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[:3]} did not finish in {timeout} s")
            out += self.poll(grace_seconds)
            time.sleep(0.02)
        return out

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(parse_line(line))
        code = self._proc.wait()
        self._queue.put(ProcessMessage(FINISHED, returncode=code, stopped=self._stop_requested_at is not None))

    def _cleanup(self) -> None:
        if os.path.exists(self.stop_file):
            os.unlink(self.stop_file)
