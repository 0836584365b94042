"""A service's life: the ready line and its token file, idle sessions expiring after the TTL, and
SIGTERM during a run (the run is cancelled, its stream ends, the process exits 0)."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from conftest import start_server
from server_helpers import assert_error, open_session, prompts_doc, two_squares, upload


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("short"), "--session-ttl", "0.05")  # 3 s
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_ready_line_and_token_file(short_lived):
    ready = short_lived.ready
    assert ready["event"] == "ready" and ready["api_version"] == 1 and ready["pid"] == short_lived.proc.pid
    assert ready["url"].startswith("http://127.0.0.1:") and int(ready["url"].rsplit(":", 1)[1]) > 0
    token_file = Path(ready["token_file"])
    assert token_file.parent == short_lived.home / "service"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(short_lived.token) >= 16


def test_idle_sessions_expire(short_lived):
    with short_lived.client() as c:
        ttl = c.get("/info").json()["session_ttl_s"]
        assert ttl == 3.0
        volume = upload(c, two_squares(n_slices=1, seed=50))
        sid = open_session(c, volume["volume_id"], backbone="litemedsam")["session_id"]
        time.sleep(ttl / 2)
        assert c.get(f"/sessions/{sid}").status_code == 200  # used: its idle time starts again
        time.sleep(ttl / 2 + 0.5)
        assert c.get(f"/sessions/{sid}").status_code == 200
        time.sleep(ttl + 1.0)
        err = assert_error(c.get(f"/sessions/{sid}"), 404, "unknown_session")
        assert "expired" in err["message"]
        assert_error(c.post(f"/sessions/{sid}/segment", json={"prompts": prompts_doc(key=0)}), 404, "unknown_session")
        assert c.get("/info").json()["sessions"] == 0


def test_sigterm_during_a_run_cancels_it_and_exits_0(short_lived):
    token_file = Path(short_lived.ready["token_file"])
    with short_lived.client() as c:
        sid = open_session(c, upload(c, two_squares(n_slices=8, seed=51))["volume_id"], backbone="litemedsam")["session_id"]
        run_id = c.post(f"/sessions/{sid}/segment", json={"prompts": prompts_doc()}).json()["run_id"]
        with c.stream("GET", f"/runs/{run_id}/stream") as stream:
            lines = stream.iter_lines()
            first = json.loads(next(lines))
            assert first["stage"] in ("embed", "propagate")
            os.kill(short_lived.proc.pid, signal.SIGTERM)
            rest = [json.loads(line) for line in lines if line.strip()]
    assert rest[-1] == {"state": "cancelled"}
    assert short_lived.proc.wait(120) == 0
    log = short_lived.stderr()
    assert "Traceback" not in log and "SSS service stopped" in log
    assert not token_file.exists()  # a token it made dies with it


def test_tls_with_a_self_signed_certificate(tmp_path):
    import shutil
    import ssl
    import subprocess

    import httpx

    openssl = shutil.which("openssl")
    assert openssl, "the TLS test needs the openssl command to make a certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = start_server(tmp_path / "tls", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        headers = {"Authorization": f"Bearer {server.token}"}
        r = httpx.get(server.url + "/v1/info", headers=headers, verify=context, timeout=60)
        assert r.status_code == 200 and r.json()["api_version"] == 1
        with pytest.raises(httpx.HTTPError):  # an unknown certificate is refused by the client
            httpx.get(server.url + "/v1/info", headers=headers, timeout=60)
    finally:
        assert server.stop() == 0
