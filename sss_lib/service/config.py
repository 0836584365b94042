"""``ServiceConfig``: everything ``python -m sss_lib serve`` takes (see docs/service_api.md).

Torch-free and fastapi-free, so the jobs part, the CLI and tests can build one cheaply.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

GB = 1024 ** 3
MB = 1024 ** 2

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MEMORY_BUDGET_GB = 4.0
DEFAULT_MAX_UPLOAD_MB = 2048.0
DEFAULT_SESSION_TTL_MIN = 60.0


def default_service_dir() -> Path:
    """``$SSS_HOME/service`` (else ``~/.cache/sss/service``): token files and the jobs folder."""
    from ..weights import sss_home

    return sss_home() / "service"


@dataclasses.dataclass
class ServiceConfig:
    """The service's settings.

    Attributes:
        host / port: where to listen; port 0 picks a free port.
        token: the bearer token every request must carry (filled in by :func:`serve` from
            ``token_file`` or a fresh random one).
        token_file: the file holding the token (its first line), or None.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps": where inference runs.
        models_dir: a folder of ``.ssstask`` files offered by name (the file's stem), or None.
        data_root: the folder client-named paths must lie inside (training data), or None (no paths).
        jobs_dir: where training jobs and uploads live; None: ``default_service_dir() / "jobs"``.
        memory_budget_bytes: one budget for the slice embeddings of every session.
        max_upload_bytes: the largest request body accepted (413 above it).
        session_ttl_s: sessions idle longer than this are closed.
        gpus: how many GPUs training jobs may use (None: every visible GPU).
        ssl_certfile / ssl_keyfile: TLS files handed to uvicorn (both or neither).
        prefetch: compute a session's embeddings ahead, between runs (stretch goal; see sessions.py).
        preload: backbone names ("auto" too) and task-model names from ``models_dir`` to build and
            warm up when the service starts (see preload.py), so the first run does not pay for it.
    """

    host: str = DEFAULT_HOST
    port: int = 0
    token: str = ""
    token_file: Path | None = None
    device: str = "auto"
    models_dir: Path | None = None
    data_root: Path | None = None
    jobs_dir: Path | None = None
    memory_budget_bytes: int = int(DEFAULT_MEMORY_BUDGET_GB * GB)
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MB)
    session_ttl_s: float = DEFAULT_SESSION_TTL_MIN * 60.0
    gpus: int | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    prefetch: bool = True
    preload: tuple[str, ...] = ()

    def resolved_jobs_dir(self) -> Path:
        """``jobs_dir``, or the default ``$SSS_HOME/service/jobs``."""
        return Path(self.jobs_dir) if self.jobs_dir is not None else default_service_dir() / "jobs"

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"
