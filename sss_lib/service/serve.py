"""``serve(config)``: run the SSS service with uvicorn until SIGTERM / SIGINT (see docs/service_api.md).

The listening socket is bound here, before uvicorn starts, so ``--port 0`` gets a real free port
that the ready line can name. Once the app has started, one JSON line goes to stdout
(:func:`sss_lib.service.protocol.ready_line`); everything else is logging on stderr.

Without ``--token-file`` only a loopback address is accepted, and a fresh random token is written
to ``$SSS_HOME/service/token-PORT`` (mode 0600), named in the ready line as ``token_file``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from . import protocol
from .config import ServiceConfig, default_service_dir
from .runs import WORKER_STOP_S

log = logging.getLogger(__name__)

#: Seconds uvicorn waits for open requests (long-polls, streams) when stopping.
GRACEFUL_S = 10


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: Path) -> str:
    """The token in ``path`` (its first line, stripped).

    Raises:
        InputError: unreadable, or shorter than :data:`protocol.MIN_TOKEN_LENGTH` characters.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the token file ({e})", "Give a readable text file.") from None
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < protocol.MIN_TOKEN_LENGTH:
        raise InputError(path, f"the token (the file's first line) has {len(token)} characters, fewer than "
                         f"{protocol.MIN_TOKEN_LENGTH}", "Write a longer random token, e.g. "
                         "`python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE`.")
    return token


def write_token(path: Path, token: str) -> Path:
    """Write ``token`` to ``path``, readable by the user alone (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_config(config: ServiceConfig) -> None:
    """Refuse settings that cannot work, before anything is bound.

    Raises:
        InputError: a non-loopback host without a token file; one TLS file without the other;
        a missing folder or TLS file; a non-positive limit; a ``--preload`` name that is neither a
        backbone nor a task model in ``--models``.
    """
    if config.token_file is None and not is_loopback(config.host):
        raise InputError(None, f"give --token-file to listen on {config.host}",
                         "Without a token file the service listens on a loopback address only (127.0.0.1).")
    if (config.ssl_certfile is None) != (config.ssl_keyfile is None):
        raise InputError(None, "TLS needs both --ssl-certfile and --ssl-keyfile", "Give both, or neither.")
    for path in (config.ssl_certfile, config.ssl_keyfile):
        if path is not None and not Path(path).is_file():
            raise InputError(path, "TLS file not found")
    for name, folder in (("--models", config.models_dir), ("--data-root", config.data_root)):
        if folder is not None and not Path(folder).is_dir():
            raise InputError(folder, f"the {name} folder does not exist", "Give an existing folder.")
    if config.memory_budget_bytes <= 0 or config.max_upload_bytes <= 0 or config.session_ttl_s <= 0:
        raise InputError(None, "--memory-budget, --max-upload and --session-ttl must be positive")
    if not 0 <= config.port <= 65535:
        raise InputError(None, f"port {config.port} is out of range", "Give 0 (a free port) to 65535.")
    if config.preload:
        from .preload import check_preload_names

        check_preload_names(config.preload, Path(config.models_dir) if config.models_dir is not None else None)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        InputError: the address cannot be bound (in use, not this machine's).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise InputError(None, f"cannot listen on {host}:{port} ({e.strerror or e})",
                         "Choose another --port (0 picks a free one) or --host.") from None
    sock.set_inheritable(True)
    return sock


def _url(config: ServiceConfig, port: int) -> str:
    host = config.host.strip("[]")
    shown = f"[{host}]" if ":" in host else host
    return f"{config.scheme}://{shown}:{port}"


def serve(config: ServiceConfig) -> int:
    """Run the service until SIGTERM or SIGINT; returns 0 after a clean stop.

    Raises:
        InputError: bad settings (see :func:`check_config`), an unreadable or short token file,
        an address that cannot be bound. DeviceError: the device is absent.
    """
    import uvicorn

    from .app import create_app, resolve_service_device

    check_config(config)
    token = read_token(Path(config.token_file)) if config.token_file is not None else secrets.token_urlsafe(32)
    device = resolve_service_device(config.device)
    sock = bind(config.host, config.port)
    port = int(sock.getsockname()[1])
    token_file = Path(config.token_file) if config.token_file is not None else \
        write_token(default_service_dir() / f"token-{port}", token)
    config = dataclasses.replace(config, token=token, port=port)
    app = create_app(config, device=device)
    ready = protocol.ready_line(_url(config, port), sss_version=__version__, device=device, pid=os.getpid(),
                                token_file=str(token_file))

    uv_config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                               timeout_graceful_shutdown=GRACEFUL_S,
                               ssl_certfile=str(config.ssl_certfile) if config.ssl_certfile else None,
                               ssl_keyfile=str(config.ssl_keyfile) if config.ssl_keyfile else None)
    server = _make_server(uv_config, ready, app)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if config.token_file is None:
            token_file.unlink(missing_ok=True)  # the token dies with the server
    log.info("SSS service stopped")
    exit_code = 0 if server.started else 1
    if not getattr(app.state.service, "stopped_cleanly", True):
        # A worker thread is still inside one step (torch or an encoder runtime): letting the
        # interpreter finalise under it aborts the process ("terminate called without an active
        # exception"). Its run is already marked cancelled; nothing is left to save.
        log.warning("a run was still inside a step after %g s; exiting without waiting for it", WORKER_STOP_S)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


def _make_server(config: Any, ready: str, app: Any) -> Any:
    """uvicorn's server, printing the ready line once started and stopping cleanly on a signal."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                sys.stdout.write(ready + "\n")
                sys.stdout.flush()

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Cancel the runs first (no waiting here), so open streams and long-polls end
            # instead of holding up the graceful stop.
            app.state.service.runs.cancel_all()
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after a graceful stop (the process would die of
            # it); a stop on SIGTERM/SIGINT is the normal end here and exits 0.
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._captured_signals.clear()

    return Server(config)


def add_serve_arguments(parser: Any) -> None:
    """The ``serve`` subcommand's options (argparse)."""
    from .config import DEFAULT_HOST, DEFAULT_MAX_UPLOAD_MB, DEFAULT_MEMORY_BUDGET_GB, DEFAULT_SESSION_TTL_MIN

    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}; others need --token-file)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default 0)")
    parser.add_argument("--token-file", default=None, metavar="F",
                        help="file whose first line is the token clients must send (at least 16 characters); "
                             "without it a random token is written to $SSS_HOME/service/token-PORT")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--models", default=None, metavar="DIR", help="folder of .ssstask models offered by name")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder that client-named training-data paths must lie in (default: no paths)")
    parser.add_argument("--jobs-dir", default=None, metavar="DIR",
                        help="training jobs and uploads (default: $SSS_HOME/service/jobs)")
    parser.add_argument("--memory-budget", type=float, default=DEFAULT_MEMORY_BUDGET_GB, metavar="GB",
                        help=f"memory for slice embeddings of all sessions together (default {DEFAULT_MEMORY_BUDGET_GB:g})")
    parser.add_argument("--max-upload", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                        help=f"largest request body accepted (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--session-ttl", type=float, default=DEFAULT_SESSION_TTL_MIN, metavar="MIN",
                        help=f"close sessions idle this many minutes (default {DEFAULT_SESSION_TTL_MIN:g})")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="GPUs training jobs may use (default: every visible GPU)")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                        help="do not embed a session's other slices in the background after a run")
    parser.add_argument("--preload", nargs="+", default=None, metavar="NAME",
                        help="backbones (auto, litemedsam, sam2.1_hiera_...) or task models from --models (by "
                             "file name) to build and warm up at start, so the first run does not wait for them")
    parser.add_argument("--ssl-certfile", default=None, metavar="F", help="TLS certificate (with --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile", default=None, metavar="F", help="TLS private key (with --ssl-certfile)")


def config_from_args(args: Any) -> ServiceConfig:
    """A :class:`ServiceConfig` from the parsed ``serve`` options."""
    from .config import GB, MB

    def path(value: str | None) -> Path | None:
        return Path(value).expanduser() if value else None

    return ServiceConfig(
        host=args.host, port=args.port, token_file=path(args.token_file), device=args.device,
        models_dir=path(args.models), data_root=path(args.data_root), jobs_dir=path(args.jobs_dir),
        memory_budget_bytes=int(args.memory_budget * GB), max_upload_bytes=int(args.max_upload * MB),
        session_ttl_s=float(args.session_ttl) * 60.0, gpus=args.gpus,
        ssl_certfile=path(args.ssl_certfile), ssl_keyfile=path(args.ssl_keyfile), prefetch=args.prefetch,
        preload=tuple(args.preload or ()),
    )
