"""``serve --preload``: backbones and task models built and warmed at start, reported in /v1/info,
and the very objects the sessions then use; a bad name stops the service at start, a failed
preload is reported and the service goes on."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, server_env, start_server
from server_helpers import open_session, prompts_doc, run_to_end, two_squares, upload

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SETTLED = ("ready", "failed")


def _settled_preload(client, timeout: float = 420.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        preload = client.get("/info").json()["preload"]
        if all(p["state"] in SETTLED for p in preload):
            return {p["name"]: p for p in preload}
        time.sleep(0.5)
    raise AssertionError(f"preload did not settle in {timeout} s: {preload}")


def test_preloaded_models_are_ready_and_used_by_sessions(tmp_path_factory, heart_task_model):
    tmp = tmp_path_factory.mktemp("preload")
    models = tmp / "models"
    models.mkdir()
    shutil.copy(heart_task_model, models / "heart.ssstask")
    # SAM-2.1 large has no weights in this fresh SSS_HOME: its preload must fail and say how to fix it.
    server = start_server(tmp, "--models", str(models), "--preload", "litemedsam", "heart", "sam2.1_hiera_large")
    try:
        with server.client() as c:
            preload = _settled_preload(c)
            assert list(preload) == ["litemedsam", "heart", "sam2.1_hiera_large"]
            assert preload["litemedsam"]["state"] == "ready" and preload["litemedsam"]["seconds"] > 0
            assert preload["heart"]["state"] == "ready" and preload["heart"]["error"] is None
            failed = preload["sam2.1_hiera_large"]
            assert failed["state"] == "failed" and "not in the cache" in failed["error"]

            volume = upload(c, two_squares(n_slices=4, seed=70))
            sid = open_session(c, volume["volume_id"], backbone="litemedsam")["session_id"]
            status, _ = run_to_end(c, sid, "segment", prompts=prompts_doc())
            assert status["state"] == "done"
            task = open_session(c, volume["volume_id"], task_model="heart")["session_id"]
            status, _ = run_to_end(c, task, "auto-segment")
            assert status["state"] == "done"
    finally:
        assert server.stop() == 0, server.stderr()[-3000:]
    log = server.stderr()
    # Built once each, by the preload: the sessions got the warmed objects.
    assert log.count("building backbone litemedsam on cpu") == 1, log[-3000:]
    assert log.count("building task model heart on cpu") == 1, log[-3000:]
    assert "preloaded litemedsam in" in log and "preloaded heart in" in log


def test_an_unknown_preload_name_stops_the_service_at_start(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run([sys.executable, "-m", "sss_lib", "serve", "--port", "0", "--device", "cpu",
                           "--preload", "litemedsam", "lightmedsam"], capture_output=True, text=True,
                          env=server_env(home), cwd=REPO, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--preload 'lightmedsam' is neither a backbone nor a task model" in proc.stderr
    assert "litemedsam" in proc.stderr and "--models DIR" in proc.stderr  # what can be preloaded, and how
    assert not proc.stdout.strip()  # never got as far as its ready line
