"""The run-state file: which process trains in a run folder, so a reopened panel (or a restarted
Slicer) finds a run still going and follows it.

``RUN/slicer/run_state.json`` holds the training process's pid, the host it runs on, its command
line and when it started. The pid alone is not proof: a pid is only trusted on the same host, and
:mod:`SSSTrainLib.monitor` also reads the run's own reports. Python 3.9 compatible, no Qt.
"""

import dataclasses
import os
import socket
import time
from typing import List, Optional

from . import constants as C
from .files import read_dataclass, write_dataclass


@dataclasses.dataclass
class RunState:
    """One launch of the trainer in ``run_dir``.

    Attributes:
        run_dir: the run folder.
        pid: the process started (on Slicer, the PythonSlicer launcher; it leads its own process group).
        host: ``socket.gethostname()`` of the computer it runs on.
        command: its command line.
        started: ``time.time()`` at launch.
        resumed: True when launched with ``--resume``.
        panel_pid: the Slicer process that launched it.
    """

    run_dir: str
    pid: int
    host: str
    command: List[str]
    started: float
    resumed: bool = False
    panel_pid: int = 0

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()


def panel_dir(run_dir: str) -> str:
    return os.path.join(run_dir, C.PANEL_DIR)


def state_path(run_dir: str) -> str:
    return os.path.join(panel_dir(run_dir), C.STATE_FILE)


def new_state(run_dir: str, pid: int, command: List[str], resumed: bool) -> RunState:
    return RunState(run_dir=os.path.abspath(run_dir), pid=int(pid), host=socket.gethostname(), command=list(command),
                    started=time.time(), resumed=bool(resumed), panel_pid=os.getpid())


def write_state(state: RunState) -> str:
    """Write ``state`` atomically (a reader never sees half a file); returns the file."""
    return write_dataclass(state_path(state.run_dir), state)


def read_state(run_dir: str) -> Optional[RunState]:
    """The last launch recorded in ``run_dir``, or None (no file, or a damaged one)."""
    return read_dataclass(state_path(run_dir), RunState)
