"""Real SSS services for the server tests: ``python -m sss_lib serve --port 0`` in a subprocess,
found through its ready line, and raw HTTP through httpx (no client helper code).

``main_server``: default limits, a ``--models`` folder; ``tight_server``: a tiny memory budget
and a 1 MB upload limit. Both run LiteMedSAM on the CPU with one thread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from sss_lib.service import protocol

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 240  # the machine's cores are shared: importing torch can take a while


@dataclasses.dataclass
class Server:
    """A running service: its process, URL, token and an httpx client with the right headers."""

    proc: subprocess.Popen
    url: str
    token: str
    ready: dict[str, Any]
    stderr_path: Path
    home: Path

    def client(self, **headers: str) -> httpx.Client:
        base = {"Authorization": f"Bearer {self.token}", protocol.VERSION_HEADER: str(protocol.API_VERSION)}
        base.update(headers)
        return httpx.Client(base_url=self.url + "/v1", headers=base, timeout=120.0)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the service did not stop within {timeout} s of SIGTERM:\n{self.stderr()[-3000:]}")


def server_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, SSS_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_server(tmp: Path, *args: str) -> Server:
    """Start ``serve --port 0 --device cpu ARGS`` and wait for its ready line."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    err_path = tmp / "stderr.log"
    err = open(err_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "sss_lib", "-v", "serve", "--port", "0", "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=err, env=server_env(home), cwd=REPO)
    lines: list[str] = []

    def read() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            lines.append(raw.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready = next((r for r in map(protocol.parse_ready_line, lines) if r), None)
        if ready is not None:
            token = Path(ready["token_file"]).read_text().splitlines()[0].strip()
            return Server(proc, ready["url"], token, ready, err_path, home)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no ready line from the service (exit {proc.poll()}):\n{err_path.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def main_server(tmp_path_factory, models_dir) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("main"), "--models", str(models_dir))
    yield server
    assert server.stop() == 0, server.stderr()[-3000:]


@pytest.fixture(scope="session")
def tight_server(tmp_path_factory) -> Iterator[Server]:
    # 0.01 GB holds two LiteMedSAM slice embeddings (4 MiB each in float32).
    server = start_server(tmp_path_factory.mktemp("tight"), "--memory-budget", "0.01", "--max-upload", "1")
    yield server
    assert server.stop() == 0, server.stderr()[-3000:]


@pytest.fixture
def api(main_server) -> Iterator[httpx.Client]:
    with main_server.client() as client:
        yield client


