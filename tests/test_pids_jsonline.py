"""The two standard-library helpers shared by the service, the trainer and the client side:
``sss_lib.runs.pids.pid_alive`` and ``sss_lib.jsonline.parse_json_object``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sss_lib.jsonline import parse_json_object
from sss_lib.runs.pids import pid_alive


def test_running_ended_and_invalid_pids():
    assert pid_alive(os.getpid()) is True
    assert pid_alive(None) is False and pid_alive(0) is False and pid_alive(-1) is False
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is gone
    assert pid_alive(proc.pid) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are read from /proc")
def test_a_zombie_counts_as_ended():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # ended but not reaped (no wait()): a zombie
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                break
        time.sleep(0.02)
    else:
        pytest.fail("the child did not end")
    assert pid_alive(proc.pid) is False
    proc.wait()


@pytest.mark.parametrize("line, expected", [
    ('{"event": "ready", "url": "http://x"}\n', {"event": "ready", "url": "http://x"}),
    ('   {"a": 1}   ', {"a": 1}),
    ("step 3 of 10", None),
    ('{"a": 1', None),  # a partial line
    ("[1, 2]", None),
    ("", None),
])
def test_json_object_lines(line, expected):
    assert parse_json_object(line) == expected
