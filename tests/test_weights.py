"""Checkpoint cache, resumable verified download (against a real local HTTP server) and safe loading."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import random
import re
import socket
import sys
import threading
from pathlib import Path

import pytest

from sss_lib import download, weights
from sss_lib.errors import WeightsError

NAME = "test_ckpt"
PAYLOAD_BYTES = 1_000_003  # not a multiple of the chunk size


class _ServerState:
    """What the test server serves and what it saw."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.cut_after: int | None = None  # next response stops after this many body bytes
        self.ignore_range = False
        self.range_headers: list[str | None] = []
        self.paths: list[str] = []
        self.body_bytes_sent = 0
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        state: _ServerState = self.server.state  # type: ignore[attr-defined]
        data = state.payload
        requested = self.headers.get("Range")
        with state.lock:
            state.range_headers.append(requested)
            state.paths.append(self.path)
            cut, state.cut_after = state.cut_after, None
        start = 0
        if requested and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cut is not None:
            body = body[:cut]
        self.wfile.write(body)
        self.wfile.flush()
        with state.lock:
            state.body_bytes_sent += len(body)
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture()
def payload() -> bytes:
    return random.Random(PAYLOAD_BYTES).randbytes(PAYLOAD_BYTES)


@pytest.fixture()
def server(payload: bytes):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _ServerState(payload)  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def sss_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    monkeypatch.setattr(download, "CHUNK_BYTES", 64 * 1024)  # several progress calls per test file
    yield tmp_path / "home"
    weights.unregister_weights(NAME)


def _register(url: str, **kw: object) -> weights.WeightsSpec:
    spec = weights.WeightsSpec(NAME, url, **kw)  # type: ignore[arg-type]
    weights.register_weights(spec, replace=True)
    return spec


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}.pt"


def test_registry_has_the_four_sam21_checkpoints() -> None:
    for short, config in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l")):
        spec = weights.get_spec(f"sam2.1_hiera_{short}")
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{short}.pt"
        assert spec.config == f"configs/sam2.1/sam2.1_hiera_{config}.yaml"
        assert spec.image_size == 1024
    with pytest.raises(WeightsError, match="known: sam2.1_hiera_tiny"):
        weights.get_spec("sam3")
    with pytest.raises(ValueError):
        weights.WeightsSpec("../evil", "http://x/y.pt")


def test_cache_folder_follows_sss_home_then_platform(
    sss_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert weights.cache_dir() == sss_home / "weights"
    assert weights.weights_path("sam2.1_hiera_tiny") == sss_home / "weights" / "sam2.1_hiera_tiny.pt"
    assert not (sss_home / "weights").exists()  # created on demand only
    monkeypatch.delenv("SSS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "sss" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert weights.cache_dir() == tmp_path / "user" / ".cache" / "sss" / "weights"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert weights.cache_dir() == tmp_path / "user" / "Library" / "Caches" / "sss" / "weights"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert weights.cache_dir() == tmp_path / "local" / "sss" / "Cache" / "weights"


def test_download_streams_with_progress_and_records_hash(server, payload: bytes) -> None:
    state, base = server
    _register(f"{base}/{NAME}.pt")
    seen: list[tuple[int, int | None]] = []
    path = weights.download_weights(NAME, progress=lambda done, total: seen.append((done, total)))
    assert path == weights.weights_path(NAME) and path.read_bytes() == payload
    counts = [done for done, _ in seen]
    assert counts == sorted(set(counts)) and len(counts) > 10
    assert seen[-1] == (len(payload), len(payload))
    record = json.loads(weights.sidecar_path(path).read_text())
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert record["size"] == len(payload) and record["url"] == f"{base}/{NAME}.pt" and record["source"] == "download"
    assert not path.with_name(path.name + ".part").exists()
    assert state.range_headers == [None]
    # Already present: verified, not downloaded again.
    assert weights.ensure_weights(NAME, download=True) == path
    assert len(state.range_headers) == 1


def test_broken_stream_is_resumed_with_range(server, payload: bytes) -> None:
    state, base = server
    _register(f"{base}/{NAME}.pt")
    state.cut_after = 300_000
    path = weights.download_weights(NAME, retries=2)
    assert path.read_bytes() == payload
    assert state.range_headers == [None, "bytes=300000-"]
    assert state.body_bytes_sent == len(payload) < 2 * len(payload)


def test_partial_download_is_kept_and_resumed_by_the_next_call(server, payload: bytes) -> None:
    state, base = server
    _register(f"{base}/{NAME}.pt")
    state.cut_after = 123_456
    final = weights.weights_path(NAME)
    part = final.with_name(final.name + ".part")
    with pytest.raises(WeightsError, match="kept at") as caught:
        weights.download_weights(NAME, retries=0)
    assert str(part) in str(caught.value)
    assert part.stat().st_size == 123_456 and not final.exists()
    seen: list[int] = []
    weights.download_weights(NAME, progress=lambda done, total: seen.append(done))
    assert final.read_bytes() == payload
    assert state.range_headers[-1] == "bytes=123456-"
    assert seen[0] == 123_456  # progress continues from the bytes on disk
    assert state.body_bytes_sent < 2 * len(payload)


def test_server_that_ignores_range_restarts_from_zero(server, payload: bytes) -> None:
    state, base = server
    _register(f"{base}/{NAME}.pt")
    state.ignore_range = True
    final = weights.weights_path(NAME)
    final.parent.mkdir(parents=True)
    # Garbage that would corrupt the file if a 200 answer were appended to it.
    final.with_name(final.name + ".part").write_bytes(b"\xff" * 5000)
    weights.download_weights(NAME)
    assert state.range_headers == ["bytes=5000-"]
    assert final.read_bytes() == payload


def test_wrong_published_checksum_is_rejected_and_deleted(server, payload: bytes) -> None:
    _, base = server
    _register(f"{base}/{NAME}.pt", sha256="0" * 64)
    with pytest.raises(WeightsError, match="does not match the published"):
        weights.download_weights(NAME)
    final = weights.weights_path(NAME)
    assert not final.exists()
    assert not final.with_name(final.name + ".part").exists()
    assert not weights.sidecar_path(final).exists()


def test_correct_published_checksum_and_size_are_accepted(server, payload: bytes) -> None:
    _, base = server
    _register(f"{base}/{NAME}.pt", sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload))
    assert weights.download_weights(NAME).read_bytes() == payload


def test_size_announced_by_server_must_match_registry(server, payload: bytes) -> None:
    _, base = server
    _register(f"{base}/{NAME}.pt", size_bytes=len(payload) + 1)
    with pytest.raises(WeightsError, match=f"announces {len(payload)} bytes"):
        weights.download_weights(NAME)
    assert not weights.weights_path(NAME).exists()


def test_offline_error_names_the_url_and_the_exact_path() -> None:
    url = _closed_port_url()
    _register(url)
    with pytest.raises(WeightsError) as caught:
        weights.download_weights(NAME, timeout=5)
    message = str(caught.value)
    assert url in message and str(weights.weights_path(NAME)) in message
    assert "refused" in message
    with pytest.raises(WeightsError) as caught:
        weights.ensure_weights(NAME, download=False)
    message = str(caught.value)
    assert url in message and str(weights.weights_path(NAME)) in message and f"download {NAME}" in message


def test_mirror_env_var_replaces_the_host(server, payload: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    state, base = server
    _register(f"https://unreachable.invalid/some/dir/{NAME}.pt")
    monkeypatch.setenv(weights.MIRROR_ENV, f"{base}/mirror/")
    assert weights.download_weights(NAME).read_bytes() == payload
    assert state.paths == [f"/mirror/{NAME}.pt"]


def test_hand_placed_file_is_accepted_then_tampering_is_refused(payload: bytes) -> None:
    _register(_closed_port_url())
    path = weights.weights_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    assert weights.ensure_weights(NAME) == path
    record = weights.read_record(path)
    assert record is not None and record.source == "placed"
    assert record.sha256 == hashlib.sha256(payload).hexdigest()
    assert weights.recorded_sha256(path) == record.sha256
    status = {row.name: row for row in weights.list_weights()}[NAME]
    assert status.present and status.verified and status.size == len(payload)

    tampered = bytearray(payload)
    tampered[len(payload) // 2] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(tampered))
    with pytest.raises(WeightsError, match="modified after it was recorded") as caught:
        weights.ensure_weights(NAME)
    assert f"Delete {path}" in str(caught.value)
    assert not {row.name: row for row in weights.list_weights(check_hash=True)}[NAME].verified


def test_hand_placed_file_must_match_a_published_hash(payload: bytes) -> None:
    _register(_closed_port_url(), sha256=hashlib.sha256(payload).hexdigest())
    path = weights.weights_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload[:-1] + b"\x00")
    with pytest.raises(WeightsError, match="does not match the published"):
        weights.ensure_weights(NAME)
    assert not weights.sidecar_path(path).exists()
    path.write_bytes(payload)
    assert weights.ensure_weights(NAME) == path


def test_tqdm_progress_draws_a_byte_bar() -> None:
    out = io.StringIO()
    with weights.tqdm_progress("ckpt", file=out) as progress:
        progress(0, 2048)
        progress(1024, 2048)
        progress(2048, 2048)
        progress(512, 2048)  # a server ignored Range: the bar starts over
        progress(2048, 2048)
    text = out.getvalue()
    last_draw = text.rsplit("\r", 1)[-1]
    assert last_draw.startswith("ckpt: 100%") and "2.00k/2.00k" in last_draw
    assert "| 0.00/2.00k" in text  # reset() redrew the bar at the restart


# --------------------------------------------------------------------------------------- loading


def _tiny_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_load_state_dict_unwraps_model_and_loads_strictly(tmp_path: Path) -> None:
    import torch

    source = _tiny_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    state = weights.load_state_dict(path)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    weights.load_weights_into(target, state, str(path))
    assert torch.equal(target[0].weight, source[0].weight)


def test_load_weights_into_refuses_missing_unexpected_and_misshapen_keys() -> None:
    import torch

    model = _tiny_model()
    good = model.state_dict()
    before = model[0].weight.detach().clone()

    missing = {k: v for k, v in good.items() if k != "2.bias"}
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): 2.bias") as caught:
        weights.load_weights_into(model, missing, "ckpt-A")
    assert "ckpt-A" in str(caught.value)

    extra = dict(good) | {f"extra.{i}": torch.zeros(1) for i in range(12)}
    with pytest.raises(WeightsError, match=r"12 unexpected key\(s\): extra.0, .*\(2 more\)"):
        weights.load_weights_into(model, extra, "ckpt-B")

    misshapen = dict(good) | {"0.weight": torch.zeros(4, 5) + 7}
    with pytest.raises(WeightsError, match=r"0.weight: checkpoint \(4, 5\) vs model \(4, 3\)"):
        weights.load_weights_into(model, misshapen, "ckpt-C")
    assert torch.equal(model[0].weight, before)  # nothing was half-loaded


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_state_dict_never_unpickles_code(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2), "payload": _RunsCode(marker)}}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        weights.load_state_dict(path)
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)["model"]["payload"].close()
    assert marker.exists()


def test_load_state_dict_reports_truncated_files(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "cut.pt"
    torch.save(_tiny_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint.*download it again"):
        weights.load_state_dict(path)


def test_complete_part_file_is_finished_without_downloading_again(server, payload: bytes) -> None:
    state, base = server
    _register(f"{base}/{NAME}.pt")
    final = weights.weights_path(NAME)
    final.parent.mkdir(parents=True)
    final.with_name(final.name + ".part").write_bytes(payload)  # a run stopped just before the rename
    assert weights.download_weights(NAME).read_bytes() == payload
    assert state.range_headers == [f"bytes={len(payload)}-"] and state.body_bytes_sent == 0
    assert weights.read_record(final).sha256 == hashlib.sha256(payload).hexdigest()
