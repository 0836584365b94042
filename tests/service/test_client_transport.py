"""The client's transport on real sockets: a refused connection, a kept-alive connection the server
closed while idle (reopened once), an answer cut off midway; LocalService's start failures.

The peers here are small raw-socket HTTP/1.1 servers, because uvicorn never cuts an answer in half
on purpose; the tests against the real service are in test_client_service.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import pytest

from sss_lib.service.client import ServiceClient, ServiceUnavailable
from sss_lib.service.local import LocalService, ServiceStartError

INFO = json.dumps({"api_version": 1, "sss_version": "test", "device": "cpu"}).encode()


class RawServer:
    """Accepts connections on a thread; ``answer(conn, n)`` serves the n-th connection."""

    def __init__(self, answer) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.requests: list[bytes] = []
        self.answer = answer
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self.answer(self, conn, self.connections)

    def read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return data
            data += chunk
        self.requests.append(data.split(b"\r\n", 1)[0])
        return data

    def close(self) -> None:
        self.sock.close()


def ok(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_refused_connection_is_service_unavailable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ServiceUnavailable) as e:
        ServiceClient(f"http://127.0.0.1:{port}", "x" * 20)
    assert f"the SSS service at http://127.0.0.1:{port} went away" in str(e.value)


def test_a_connection_closed_while_idle_is_reopened_once():
    def answer(server, conn, n):
        # Answer one request as if keeping the connection alive, then close it (an idle timeout).
        server.read_request(conn)
        conn.sendall(ok(INFO))

    server = RawServer(answer)
    try:
        client = ServiceClient(server.url, "x" * 20)  # request 1, connection 1
        assert client.info()["sss_version"] == "test"  # request 2: connection 1 is gone, connection 2
        assert client.info()["sss_version"] == "test"
        assert server.connections == 3 and len(server.requests) == 3
        assert all(r.startswith(b"GET /v1/info ") for r in server.requests)
    finally:
        server.close()


def test_an_answer_cut_off_midway_is_service_unavailable():
    def answer(server, conn, n):
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npz\r\nContent-Length: 1000\r\n\r\n" + b"PK" * 5)

    server = RawServer(answer)
    try:
        client = ServiceClient(server.url, "x" * 20, check=False)
        with pytest.raises(ServiceUnavailable) as e:
            client._request("GET", "/v1/runs/r1/result")
        assert "IncompleteRead" in str(e.value)
        assert server.connections == 1  # a fresh connection that failed is not retried
    finally:
        server.close()


def test_requests_carry_token_and_api_version():
    seen = {}

    def answer(server, conn, n):
        seen["request"] = server.read_request(conn)
        conn.sendall(ok(INFO))

    server = RawServer(answer)
    try:
        ServiceClient(server.url + "/v1", "secret-token-0123456789")
        head = seen["request"].decode().lower()
        assert "authorization: bearer secret-token-0123456789" in head and "x-sss-api-version: 1" in head
    finally:
        server.close()


def test_local_service_that_dies_before_ready_quotes_its_log(tmp_path):
    service = LocalService(["--no-such-option"], log_path=str(tmp_path / "service.log")).start()
    token_file = service.token_file
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    with open(token_file) as f:
        assert f.readline().strip() == service.token and len(service.token) >= 32
    with pytest.raises(ServiceStartError) as e:
        service.wait_ready(timeout=120)
    message = str(e.value)
    assert "exited with status 2" in message and str(tmp_path / "service.log") in message
    assert "--no-such-option" in message  # argparse's complaint, quoted from the log
    assert not service.alive()
    service.stop()
    assert not os.path.exists(token_file)


def test_https_with_the_servers_certificate_as_ca_file(tmp_path):
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))

    def answer(server, conn, n):
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                server.read_request(tls)
                tls.sendall(ok(INFO))
        except (ssl.SSLError, OSError):
            pass  # the untrusting client hangs up during the handshake

    server = RawServer(answer)
    url = server.url.replace("http://", "https://")
    try:
        assert ServiceClient(url, "x" * 20, ca_file=str(cert)).info()["sss_version"] == "test"
        with pytest.raises(ServiceUnavailable, match="TLS certificate is not trusted"):
            ServiceClient(url, "x" * 20)  # the system's trust store does not know it
    finally:
        server.close()


def test_cli_server_token_from_the_option_or_the_local_default(tmp_path, monkeypatch, capsys):
    from sss_lib.cli import main

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    monkeypatch.setenv("SSS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SSS_TOKEN_FILE", raising=False)
    args = ["segment", str(tmp_path / "image.nrrd"), "--prompts", str(tmp_path / "p.json"), "-o", str(tmp_path / "s.nrrd")]
    assert main([*args, "--server", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no token for the SSS service" in err and "--token-file" in err

    # A local service started without --token-file writes $SSS_HOME/service/token-PORT: found there.
    (tmp_path / "home" / "service").mkdir(parents=True)
    (tmp_path / "home" / "service" / f"token-{port}").write_text("t" * 32 + "\n")
    monkeypatch.setenv("SSS_SERVER", f"http://127.0.0.1:{port}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the SSS service at http://127.0.0.1:{port} went away") and err.count("\n") == 1
    assert not (tmp_path / "s.nrrd").exists()
