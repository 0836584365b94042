"""Every bad request gets its status and a JSON error body (no traceback), and the service keeps
answering afterwards: token, API version, upload limit (by Content-Length and counted in a chunked
body), bad volumes, models and prompts, unknown ids; ``serve`` refuses a non-loopback address
without a token file and a short token."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sss_lib.service import protocol

from conftest import REPO, server_env
from server_helpers import assert_error, open_session, prompts_doc, raw_http, two_squares, upload


@pytest.fixture(autouse=True)
def still_answers(main_server):
    """After each test the main service still answers /v1/info."""
    yield
    with main_server.client() as c:
        assert c.get("/info").status_code == 200


def test_token_and_version_are_checked(main_server):
    with main_server.client(Authorization="") as c:
        assert_error(c.get("/info"), 401, "missing_token")
    with main_server.client(Authorization="Basic abc") as c:
        assert_error(c.get("/info"), 401, "missing_token")
    with main_server.client(Authorization="Bearer " + "x" * 43) as c:
        assert_error(c.get("/info"), 403, "bad_token")
        assert_error(c.post("/volumes", content=b"whatever"), 403, "bad_token")  # before the body is looked at
        # A refused upload's body is drained, not left unread: the client gets the 403, never a reset.
        for _ in range(5):
            assert_error(c.post("/volumes", content=b"x" * (2 << 20)), 403, "bad_token")
    with main_server.client(**{protocol.VERSION_HEADER: "2"}) as c:
        err = assert_error(c.get("/info"), 409, "version_mismatch")
        assert "SSS API 1, the client 2" in err["message"]
    with main_server.client() as c:
        info = c.get("/info").json()
    assert info["api_version"] == protocol.API_VERSION and info["device"] == "cpu"
    assert "litemedsam" in info["backbones"] and info["data_root"] is False


def test_openapi_lists_every_endpoint_without_a_token(main_server):
    import httpx

    schema = httpx.get(main_server.url + "/v1/openapi.json", timeout=60).json()
    paths = set(schema["paths"])
    assert {"/v1/info", "/v1/volumes", "/v1/models", "/v1/sessions", "/v1/sessions/{session_id}",
            "/v1/sessions/{session_id}/segment", "/v1/sessions/{session_id}/auto-segment", "/v1/runs/{run_id}",
            "/v1/runs/{run_id}/stream", "/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/result",
            "/v1/jobs", "/v1/uploads"} <= paths


def test_uploads_over_the_limit_are_refused_before_being_read(tight_server):
    limit = 1 << 20
    auth = f"Authorization: Bearer {tight_server.token}\r\n{protocol.VERSION_HEADER}: 1\r\n"
    # Content-Length above the limit: answered at once, without sending a byte of the body.
    status, body = raw_http(tight_server.url, f"POST /v1/volumes HTTP/1.1\r\nHost: x\r\n{auth}"
                            f"Content-Type: {protocol.NPZ_TYPE}\r\nContent-Length: {50 * limit}\r\n")
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    # No length (chunked): counted while read, refused as soon as it passes the limit.
    chunk = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 1)] + [b"0\r\n\r\n"]
    status, body = raw_http(tight_server.url, f"POST /v1/volumes HTTP/1.1\r\nHost: x\r\n{auth}"
                            f"Content-Type: {protocol.NPZ_TYPE}\r\nTransfer-Encoding: chunked\r\n", chunks)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    with tight_server.client() as c:
        assert c.get("/info").json()["max_upload_bytes"] == limit
        # A chunked body under the limit is accepted.
        arrays = two_squares(n_slices=1, seed=30)
        r = c.post("/volumes", content=iter([protocol.encode_arrays(arrays)]),
                   headers={"Content-Type": protocol.NPZ_TYPE})
        assert r.status_code == 200 and r.json()["shape_kji"] == [1, 48, 48]


def test_bad_volumes_and_models(api):
    assert_error(api.post("/volumes", content=b"not an npz"), 400, "bad_volume")
    partial = protocol.encode_arrays({"voxels": np.zeros((2, 4, 4), np.float32)})
    err = assert_error(api.post("/volumes", content=partial), 400, "bad_volume")
    assert "spacing" in err["message"]
    flat = protocol.encode_arrays(dict(two_squares(n_slices=1), voxels=np.zeros((4, 4), np.float32)))
    assert_error(api.post("/volumes", content=flat), 400, "bad_volume")
    assert_error(api.post("/models", content=b"PK\x03\x04 not a task model"), 422, "bad_model")


def test_malformed_prompts_and_requests(api):
    volume = upload(api, two_squares(n_slices=2, seed=31))
    sid = open_session(api, volume["volume_id"], backbone="litemedsam")["session_id"]
    outside = prompts_doc(key=5)
    err = assert_error(api.post(f"/sessions/{sid}/segment", json={"prompts": outside}), 422, "bad_prompts")
    assert "outside" in err["message"]
    no_classes = {"format": "sss-prompts", "version": 1}
    assert_error(api.post(f"/sessions/{sid}/segment", json={"prompts": no_classes}), 422, "bad_prompts")
    no_box = prompts_doc()
    no_box["classes"][0]["prompts"][0]["box"] = None
    err = assert_error(api.post(f"/sessions/{sid}/segment", json={"prompts": no_box}), 422, "bad_prompts")
    assert "needs a box or a positive point" in err["message"]
    other_axis = dict(prompts_doc(), slice_axis="i")
    assert_error(api.post(f"/sessions/{sid}/segment", json={"prompts": other_axis}), 422, "bad_prompts")
    assert_error(api.post(f"/sessions/{sid}/segment", json={"prompts": [1, 2]}), 422, "invalid_request")
    assert_error(api.post(f"/sessions/{sid}/segment", content=b"{not json",
                          headers={"Content-Type": "application/json"}), 422, "invalid_request")
    assert_error(api.post(f"/sessions/{sid}/auto-segment", json={}), 409, "wrong_session_kind")
    assert_error(api.post("/sessions", json={"volume_id": volume["volume_id"], "backbone": "resnet"}), 422, "bad_input")
    assert_error(api.post("/sessions", json={"volume_id": volume["volume_id"], "slice_axis": "x"}), 422,
                 "invalid_request")
    assert_error(api.post("/sessions", json={"volume_id": volume["volume_id"], "window": [100, -100]}), 422,
                 "bad_input")
    assert_error(api.get("/runs/abc", params={"wait": 99}), 422, "invalid_request")
    # Nothing ran: the session has no run.
    assert api.get(f"/sessions/{sid}").json()["last_run_id"] is None


def test_unknown_ids_say_what_to_do(api):
    err = assert_error(api.get("/sessions/nope"), 404, "unknown_session")
    assert "upload the volume again and open a session" in err["message"]
    assert_error(api.delete("/sessions/nope"), 404, "unknown_session")
    assert_error(api.post("/sessions/nope/segment", json={"prompts": prompts_doc()}), 404, "unknown_session")
    assert_error(api.get("/runs/nope"), 404, "unknown_run")
    assert_error(api.get("/runs/nope/result"), 404, "unknown_run")
    assert_error(api.post("/runs/nope/cancel"), 404, "unknown_run")
    assert_error(api.get("/runs/nope/stream"), 404, "unknown_run")
    assert_error(api.post("/sessions", json={"volume_id": "0" * 64}), 404, "unknown_volume")
    volume = upload(api, two_squares(n_slices=1, seed=32))
    err = assert_error(api.post("/sessions", json={"volume_id": volume["volume_id"], "task_model": "nope"}), 404,
                       "unknown_model")
    assert "POST /v1/models" in err["message"]
    assert_error(api.get("/nothing-here"), 404, "not_found")
    assert_error(api.delete("/info"), 405, "method_not_allowed")
    # A closed session is gone.
    sid = open_session(api, volume["volume_id"], backbone="litemedsam")["session_id"]
    assert api.delete(f"/sessions/{sid}").status_code == 204
    assert_error(api.get(f"/sessions/{sid}"), 404, "unknown_session")


def _serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sss_lib", "serve", "--port", "0", *args], capture_output=True,
                          text=True, timeout=300, env=server_env(tmp_path), cwd=REPO)


def test_serve_refuses_a_public_address_without_a_token_file_and_short_tokens(tmp_path):
    done = _serve(tmp_path, "--host", "0.0.0.0")
    assert done.returncode == 2 and done.stdout == ""
    assert "give --token-file to listen on 0.0.0.0" in done.stderr and "Traceback" not in done.stderr
    short = tmp_path / "token.txt"
    short.write_text("tooshort\n")
    done = _serve(tmp_path, "--token-file", str(short))
    assert done.returncode == 2 and "fewer than 16" in done.stderr and done.stdout == ""
    done = _serve(tmp_path, "--ssl-certfile", str(short))
    assert done.returncode == 2 and "--ssl-keyfile" in done.stderr
