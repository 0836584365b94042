"""Whether a process still runs, from its pid: standard library only (no torch), so the service's
job manager and the checkpoint writer share it.

On Windows there is no cheap check here (``os.kill(pid, 0)`` would send it CTRL_C_EVENT), so every
positive pid counts as running: callers then keep what a live process may still own.
"""

from __future__ import annotations

import os
import sys


def pid_alive(pid: int | None) -> bool:
    """True while process ``pid`` runs on this computer. None, 0 and negative pids are not running; on
    Linux a zombie (ended, not yet reaped by its parent) counts as ended; a process of another user
    (no permission to signal it) counts as running."""
    if not pid or pid <= 0:
        return False
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):
        try:  # a zombie no longer runs anything
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
        except OSError:
            return False  # it ended between the two checks
    return True
