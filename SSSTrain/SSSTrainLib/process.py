"""Start the training process detached from Slicer, follow its output files, stop it.

Training takes hours, so the process must outlive the panel, and even Slicer: it runs in its own
session (process group), reads nothing from Slicer, and writes its stdout (progress records, JSON
lines) and stderr (the readable console view) to files in ``RUN/slicer/`` instead of pipes. Any
panel, the one that started it or a later one, follows a run the same way: by reading those
files (:class:`FileTail`) and checking the process (:func:`pid_alive`).

Stopping is the run contract's stop file ``RUN/STOP`` (also named by ``$SSS_STOP_FILE``): the
trainer ends at a clean point with a checkpoint. PythonSlicer is a launcher that starts the real
interpreter as a child, so a signal to the launcher alone would miss the trainer;
:func:`kill_process_tree` ends the whole group, for a run that no longer answers.

Python 3.9 compatible, no Qt.
"""

import os
import signal
import subprocess
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import constants as C
from .runstate import RunState, new_state, panel_dir, write_state


def stop_file(run_dir: str) -> str:
    return os.path.join(run_dir, C.STOP_FILE)


def stdout_file(run_dir: str) -> str:
    return os.path.join(panel_dir(run_dir), C.STDOUT_FILE)


def console_file(run_dir: str) -> str:
    return os.path.join(panel_dir(run_dir), C.CONSOLE_FILE)


def launch(
    command: Sequence[str],
    run_dir: str,
    env_update: Optional[Mapping[str, str]] = None,
    base_env: Optional[Mapping[str, str]] = None,
    resumed: bool = False,
) -> Tuple["subprocess.Popen", RunState]:
    """Start ``command`` for the run in ``run_dir``, detached, and record it in the run-state file.

    Args:
        command: the full command line (interpreter first).
        run_dir: the run folder (created if missing); also the process's working folder.
        env_update: variables added to the environment.
        base_env: the environment to start from (inside Slicer: ``slicer.util.startupEnvironment()``,
            so PythonSlicer sets up its own paths); default ``os.environ``.
        resumed: the command continues an earlier run (recorded in the state file).

    Returns:
        The process and its :class:`RunState`. Its stdout and stderr are appended to
        ``RUN/slicer/stdout.jsonl`` and ``RUN/slicer/console.log``; a stale ``RUN/STOP`` is removed
        first (it would end the new run at once).
    """
    os.makedirs(panel_dir(run_dir), exist_ok=True)
    env = dict(os.environ if base_env is None else base_env)
    env.update(env_update or {})
    env[C.STOP_FILE_ENV] = os.path.abspath(stop_file(run_dir))
    env["PYTHONUNBUFFERED"] = "1"  # progress records must reach the file as they happen
    if os.path.exists(stop_file(run_dir)):
        os.remove(stop_file(run_dir))
    kwargs: Dict[str, object] = {}
    if sys.platform == "win32":
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # no console window
        info.wShowWindow = 0
        kwargs["startupinfo"] = info
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000  # CREATE_NO_WINDOW
    else:
        kwargs["start_new_session"] = True  # survives Slicer; its group can be ended as one
    out = open(stdout_file(run_dir), "ab")
    err = open(console_file(run_dir), "ab")
    try:
        proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=run_dir, env=env, **kwargs)
    finally:
        out.close()
        err.close()
    state = new_state(run_dir, proc.pid, list(command), resumed)
    write_state(state)
    return proc, state


def request_stop(run_dir: str) -> str:
    """Create the stop file; the trainer stops at its next clean point. Returns the file."""
    path = stop_file(run_dir)
    with open(path, "w") as f:
        f.write("stop requested by the SSS Train panel\n")
    return path


#: Seconds a process may seem to have started after its launch was recorded (Linux keeps the boot
#: time in whole seconds and start times in clock ticks).
START_TIME_SLACK_S = 2.0


def pid_alive(pid: int, launched_at: Optional[float] = None) -> bool:
    """True while process ``pid`` exists on this computer (a zombie child of ours counts as ended).

    ``launched_at`` (``time.time()`` just after the launch, as the run-state file records it): on
    Linux a process with that pid that started later is another one that got the number after the
    run ended (pids are reused, often within minutes where ``pid_max`` is 32768 and threads take
    numbers too), so the run counts as ended.
    """
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    if launched_at is not None:
        started = process_start_time(pid)
        if started is not None and started > launched_at + START_TIME_SLACK_S:
            return False
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel below
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch), on Linux; None elsewhere, or when it
    does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/{}/stat".format(pid), "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return False
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def kill_process_tree(pid: int) -> None:
    """End process ``pid`` and everything it started, at once (no checkpoint is written)."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    try:
        if os.getpgid(pid) == pid:  # launch() made it a group leader: the group holds the real trainer
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class FileTail:
    """The complete lines appended to a file since the last read (the last, unfinished line waits).

    Args:
        path: the file (it may not exist yet).
        backlog: start this many bytes before the end (None: at the beginning; 0: at the end), at
            the start of a line.

    A file that shrinks or is replaced (another inode) is read again from its beginning.
    """

    def __init__(self, path: str, backlog: Optional[int] = None) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._ident: Optional[Tuple[int, int]] = None
        self._skip_first = False
        if backlog is not None:
            try:
                st = os.stat(path)
            except OSError:
                return
            self._ident = (st.st_dev, st.st_ino)
            self._offset = max(0, st.st_size - backlog)
            self._skip_first = self._offset > 0 and not self._at_line_start()

    def _at_line_start(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset - 1)
                return f.read(1) == b"\n"
        except OSError:
            return False

    def read_lines(self) -> List[str]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        ident = (st.st_dev, st.st_ino)
        if (self._ident is not None and ident != self._ident) or st.st_size < self._offset:
            self._offset, self._partial, self._skip_first = 0, b"", False
        self._ident = ident
        if st.st_size == self._offset:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(st.st_size - self._offset)
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if self._skip_first and lines:
            lines.pop(0)  # started mid-line
            self._skip_first = False
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
