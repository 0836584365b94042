"""Helpers of the server tests (tests/service/test_server_*.py): test volumes, prompts documents,
and raw HTTP calls through httpx that check each answer."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np

from sss_lib.service import protocol


def two_squares(n_slices: int = 4, seed: int = 0, size: int = 48) -> dict[str, np.ndarray]:
    """A ``[k, j, i]`` volume with two bright squares far apart (classes 1 and 2) on every slice."""
    rng = np.random.default_rng(seed)
    vox = rng.normal(100, 10, (n_slices, size, size)).astype(np.float32)
    vox[:, 6:18, 6:18] += 400
    vox[:, 28:42, 26:40] += 400
    return {"voxels": vox, "spacing": np.array([1.0, 1.0, 3.0]), "origin": np.array([0.0, 0.0, 0.0]),
            "direction": np.eye(3)}


def prompts_doc(box2: tuple[float, float, float, float] = (26, 28, 39, 41), key: int = 1,
                with_class1: bool = True) -> dict[str, Any]:
    classes = []
    if with_class1:
        classes.append({"label": 1, "name": "a", "prompts": [{"key_slice": key, "box": [6, 6, 17, 17]}]})
    classes.append({"label": 2, "name": "b", "prompts": [{"key_slice": key, "box": list(box2)}]})
    return {"format": "sss-prompts", "version": 1, "coordinates": "voxel", "slice_axis": "k", "classes": classes}


def upload(client: httpx.Client, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    r = client.post("/volumes", content=protocol.encode_arrays(arrays), headers={"Content-Type": protocol.NPZ_TYPE})
    assert r.status_code == 200, r.text
    return r.json()


def open_session(client: httpx.Client, volume_id: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/sessions", json={"volume_id": volume_id, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def wait_run(client: httpx.Client, run_id: str, timeout: float = 600.0) -> dict[str, Any]:
    """Long-poll a run to its end; returns the last status with every event."""
    events: list[dict[str, Any]] = []
    after = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/runs/{run_id}", params={"after": after, "wait": 10})
        assert r.status_code == 200, r.text
        status = r.json()
        events += status["events"]
        after = status["next"]
        if status["state"] in protocol.RUN_END_STATES:
            return dict(status, events=events)
    raise AssertionError(f"run {run_id} did not end within {timeout} s")


def result(client: httpx.Client, run_id: str, full: bool = False):
    r = client.get(f"/runs/{run_id}/result", params={"full": "1"} if full else None)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == protocol.NPZ_TYPE
    return protocol.decode_result(r.content)


def run_to_end(client: httpx.Client, session_id: str, kind: str = "segment", **body: Any):
    """Start a run, wait for it, return ``(status, (patch, start, meta))``."""
    r = client.post(f"/sessions/{session_id}/{kind}", json=body)
    assert r.status_code == 202, r.text
    status = wait_run(client, r.json()["run_id"])
    assert status["state"] == "done", status
    return status, result(client, status["run_id"])


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    """The answer is ``status`` with the JSON error body of ``code``, and no traceback."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in response.text and len(body["error"]["message"]) > 10
    return body["error"]


def raw_http(url: str, head: str, chunks: list[bytes] = (), timeout: float = 60.0) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, CRLF-terminated lines without the blank line) and
    ``chunks`` on a plain socket, then read the answer to its end: ``(status, body)``."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n")
        for chunk in chunks:
            sock.sendall(chunk)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    header, _, body = data.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    return status, body
