"""Runs an :class:`~SSSSegmentLib.dependencies.InstallPlan`: one subprocess per step, polled.

:class:`PlanRunner` is GUI-free: :meth:`PlanRunner.poll` never blocks, so Slicer calls it from a
``QTimer`` and its window stays responsive (a thread only reads the process's pipe, which waits in
C and so does not compete for the GIL). :func:`run_plan_with_dialog` is the thin Qt part: a progress
dialog, the timer, and a local event loop until the plan ends.

Cancelling kills the running step only while it downloads; once pip has started to install files,
the step is allowed to finish (a killed pip can leave a package half-written) and the plan stops
after it.
"""

import dataclasses
import os
import queue
import re
import subprocess
import sys
import threading
from typing import Dict, List, Optional

from .dependencies import OFFLINE_HELP, InstallPlan, InstallStep
from .errors import InstallationError

RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

_DOWNLOADING = re.compile(r"Downloading (\S+) \(([\d.]+) (kB|MB|GB)\)")
_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)")
_UNIT = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


class StepProgress:
    """Reads a pip (or light-the-torch) step's output and says how far it is.

    pip prints ``Downloading NAME (SIZE)`` when a file starts and, with ``--progress-bar raw``,
    ``Progress DONE of TOTAL`` (bytes) while it downloads; ``Installing collected packages`` and
    ``Building wheel`` mark the later phases.
    """

    def __init__(self, expected_mb: float) -> None:
        self.expected_bytes = max(expected_mb, 0.1) * 1e6
        self.finished_bytes = 0.0  # files completely downloaded
        self.current_total = 0.0
        self.current_done = 0.0
        self.current_file = ""
        self.phase = "preparing"  # preparing, downloading, building, installing

    def feed(self, line: str) -> None:
        text = line.strip()
        m = _DOWNLOADING.search(text)
        if m:
            self.finished_bytes += self.current_total  # the previous file is complete
            self.current_file = m.group(1)
            self.current_total = float(m.group(2)) * _UNIT[m.group(3)]
            self.current_done = 0.0
            self.phase = "downloading"
            return
        m = _PROGRESS.match(text)
        if m:
            self.current_done = float(m.group(1))
            return
        if text.startswith("Building wheel") or text.startswith("Building wheels"):
            self.phase = "building"
        elif text.startswith("Installing collected packages"):
            self.phase = "installing"

    @property
    def downloaded_bytes(self) -> float:
        return self.finished_bytes + self.current_done

    @property
    def fraction(self) -> float:
        """0..1 within the step; downloads fill up to 0.9, installing is the rest."""
        if self.phase == "installing":
            return 0.95
        return min(0.9, 0.9 * self.downloaded_bytes / self.expected_bytes)

    def describe(self) -> str:
        if self.phase == "downloading" and self.current_file:
            done = self.current_done if self.current_done else 0.0
            return f"Downloading {self.current_file}: {done / 1e6:.0f} of {self.current_total / 1e6:.0f} MB"
        return {"building": "Building", "installing": "Installing files", "preparing": "Looking up packages"}.get(
            self.phase, self.phase
        )


@dataclasses.dataclass
class RunnerStatus:
    """What :meth:`PlanRunner.poll` reports. ``fraction`` is 0..1 over the whole plan, by download size."""

    state: str
    fraction: float
    text: str
    step: int  # 1-based index of the running (or last) step
    steps: int


class PlanRunner:
    """Runs the steps of ``plan`` one after another as subprocesses of ``python``.

    Args:
        plan: the steps.
        python: the interpreter to run them with (default ``sys.executable``, which is the
            PythonSlicer launcher inside Slicer).
        base_env: the environment the steps start from (default ``os.environ``); each step's
            ``env`` is added to it.
    """

    def __init__(self, plan: InstallPlan, python: Optional[str] = None, base_env: Optional[Dict[str, str]] = None) -> None:
        self.plan = plan
        self.python = python or sys.executable
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.log: List[str] = []
        self.state = RUNNING
        self.error: Optional[InstallationError] = None
        self._index = -1
        self._proc: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._progress = StepProgress(0.0)
        self._cancel_requested = False
        self._total_mb = max(plan.download_mb, 0.1)

    # -- control -------------------------------------------------------------------------------------
    def start(self) -> "PlanRunner":
        if not self.plan.steps:
            self.state = DONE
            return self
        self._start_step(0)
        return self

    def cancel(self) -> None:
        """Stop now while downloading; during installation, after the running step."""
        self._cancel_requested = True
        if self._proc is not None and self._proc.poll() is None and self._progress.phase != "installing":
            _kill_tree(self._proc)

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def wait(self, timeout_per_poll: float = 0.1) -> RunnerStatus:
        """Poll until the plan ends (tests and command-line use; Slicer polls from a timer)."""
        import time

        status = self.poll()
        while not self.finished:
            time.sleep(timeout_per_poll)
            status = self.poll()
        return status

    # -- polling ---------------------------------------------------------------------------------------
    def poll(self) -> RunnerStatus:
        """Read new output, start the next step when one ends; never blocks."""
        while self.state == RUNNING:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:  # the step's output ended: the process is exiting
                self._end_step()
                continue
            self.log.append(line.rstrip("\n"))
            self._progress.feed(line)
        return self.status()

    def status(self) -> RunnerStatus:
        steps = len(self.plan.steps)
        if self.state == DONE:
            return RunnerStatus(DONE, 1.0, "Installation finished.", steps, steps)
        if self.state in (FAILED, CANCELLED):
            text = str(self.error) if self.error is not None else "Installation cancelled."
            return RunnerStatus(self.state, self._fraction(), text, self._index + 1, steps)
        step = self.plan.steps[self._index]
        text = f"Step {self._index + 1} of {steps}: {step.title}\n{self._progress.describe()}"
        if self._cancel_requested:
            text += "\n(cancelling after this step: pip is writing files)"
        return RunnerStatus(RUNNING, self._fraction(), text, self._index + 1, steps)

    def _fraction(self) -> float:
        done = sum(s.download_mb for s in self.plan.steps[: max(self._index, 0)])
        current = self.plan.steps[self._index].download_mb * self._progress.fraction if self._index >= 0 else 0.0
        return min(1.0, (done + current) / self._total_mb)

    def _start_step(self, index: int) -> None:
        step = self.plan.steps[index]
        self._index = index
        self._progress = StepProgress(step.download_mb)
        env = dict(self.base_env)
        env.update(step.env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"  # pip's output, whatever the console's code page
        self.log.append(f"$ {step.command_line(self.python)}")
        try:
            self._proc = subprocess.Popen(
                [self.python] + step.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, **_new_group_kwargs(),
            )
        except OSError as e:
            self._fail(f"Could not start '{self.python}': {e}.")
            return
        self._lines = queue.Queue()
        self._reader = threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True)
        self._reader.start()

    def _end_step(self) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        step = self.plan.steps[self._index]
        if self._cancel_requested:
            self.state = CANCELLED
            self.log.append("cancelled")
        elif code != 0:
            self._fail(explain_failure(step, code, self.log))
        elif self._index + 1 < len(self.plan.steps):
            self._start_step(self._index + 1)
        else:
            self.state = DONE

    def _fail(self, message: str) -> None:
        self.state = FAILED
        self.error = InstallationError(message)


def _pump(stream, lines: "queue.Queue[Optional[str]]") -> None:
    try:
        for line in iter(stream.readline, ""):
            lines.put(line)
    finally:
        stream.close()
        lines.put(None)


def _new_group_kwargs() -> Dict[str, object]:
    """Start a step in its own process group, so cancelling ends the launcher's child too."""
    if sys.platform.startswith("win"):
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000}  # CREATE_NO_WINDOW
    return {"start_new_session": True}


def _kill_tree(proc: subprocess.Popen) -> None:
    # PythonSlicer is a launcher: killing it alone would leave pip running (SLICER_API.md section 5).
    if sys.platform.startswith("win"):
        subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def explain_failure(step: InstallStep, code: int, log: List[str]) -> str:
    """A message for a failed step: the likely cause, what to do, and pip's last lines."""
    tail = "\n".join(log[-15:])
    text = tail.lower()
    if "no space left" in text or "errno 28" in text:
        cause = ("The disk is full. PyTorch with CUDA needs about 6 GB on the drive of Slicer's Python and, while "
                 "downloading, about 3 GB in the temporary folder (set TMPDIR/TEMP to a larger drive before starting "
                 "Slicer). Free space and try again.")
    elif any(s in text for s in ("could not find a version", "connection", "name resolution", "timed out",
                                 "network is unreachable", "proxy", "ssl")):
        cause = "The package index could not be reached. " + OFFLINE_HELP.format(reqs=" ".join(step.requirements))
    else:
        cause = "See the output below. " + OFFLINE_HELP.format(reqs=" ".join(step.requirements))
    return f"Installing {step.title} failed (exit code {code}). {cause}\n\nLast output:\n{tail}"


def run_plan_with_dialog(plan: InstallPlan, parent=None) -> bool:
    """Run ``plan`` with a progress dialog while Slicer's event loop keeps running (Slicer only).

    Returns True when every step succeeded, False when the user cancelled.

    Raises:
        InstallationError: a step failed (the message says why and what to do).
    """
    import shutil

    import qt
    import slicer.util

    # As slicer.util.pip_install does (executePythonModule): the PythonSlicer launcher on Slicer's
    # PATH, started with Slicer's current environment.
    runner = PlanRunner(plan, python=shutil.which("PythonSlicer") or sys.executable).start()
    dialog = slicer.util.createProgressDialog(parent=parent, value=0, maximum=1000, windowTitle="Installing SSS packages")
    dialog.labelText = "Starting..."
    dialog.minimumDuration = 0
    loop = qt.QEventLoop()
    timer = qt.QTimer()
    timer.setInterval(200)

    def tick() -> None:
        if dialog.wasCanceled:
            runner.cancel()
        status = runner.poll()
        dialog.value = int(round(1000 * status.fraction))
        dialog.labelText = status.text
        if runner.finished:
            timer.stop()
            loop.quit()

    timer.connect("timeout()", tick)
    timer.start()
    tick()
    if not runner.finished:
        loop.exec_()
    dialog.close()
    if runner.state == FAILED:
        raise runner.error  # type: ignore[misc]
    return runner.state == DONE
