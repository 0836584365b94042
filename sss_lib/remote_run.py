"""``segment`` and ``auto-segment`` on an SSS service (``--server URL``): the typed API of the CLI.

The volume is read here, uploaded, segmented on the server, and the label map (and auto-segment's
prompts) written here, atomically, on the input's exact grid, so the files equal those of the
local commands. Nothing is written when the run fails, is cancelled or the service goes away.

Prompts files are parsed here (voxel or physical coordinates, with this volume's geometry) and sent
in voxel coordinates, so a bad file gets the local commands' error before anything is uploaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import urllib.parse
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, SSSError
from .prompts import PromptSet
from .service.client import RemoteResult, RunEvent, RunHandle, ServiceClient, read_token_file
from .volume import Volume

log = logging.getLogger(__name__)

SERVER_ENV = "SSS_SERVER"
TOKEN_FILE_ENV = "SSS_TOKEN_FILE"
Progress = Callable[[RunEvent], None]


def server_from_env(server: str | None, token_file: str | None) -> tuple[str | None, str | None]:
    """``(url, token_file)`` from the options, else ``$SSS_SERVER`` / ``$SSS_TOKEN_FILE`` (url None: run locally)."""
    server = server or os.environ.get(SERVER_ENV, "").strip() or None
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV, "").strip() or None
    return server, token_file


def connect(url: str, token_file: str | Path | None = None, *, ca_file: str | None = None,
            timeout: float = 60.0) -> ServiceClient:
    """A checked client for the service at ``url``.

    Without ``token_file`` a loopback URL uses the token file a server started without
    ``--token-file`` writes (``$SSS_HOME/service/token-PORT``).

    Raises:
        InputError: no token file given and none found. AuthError / VersionMismatch /
        ServiceUnavailable: as :class:`ServiceClient`.
    """
    if token_file is None:
        token_file = _default_token_file(url)
        if token_file is None:
            raise InputError(None, f"no token for the SSS service at {url}",
                             f"Give --token-file F (or set {TOKEN_FILE_ENV}): the file the server was started with.")
    return ServiceClient(url, read_token_file(token_file), timeout, ca_file=ca_file)


def _default_token_file(url: str) -> Path | None:
    from .service.config import default_service_dir

    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return None
    path = default_service_dir() / f"token-{parts.port}"
    return path if path.is_file() else None


def run_to_end(run: RunHandle, progress: Progress | None) -> RemoteResult:
    """Follow ``run`` to its end, reporting events, and return its result. Interrupted (Ctrl+C),
    the run is cancelled on the server before the interrupt goes on."""
    try:
        for event in run.events():
            if progress is not None:
                progress(event)
        return run.result()
    except KeyboardInterrupt:
        try:
            run.cancel()
        except SSSError:
            pass
        raise


def segment_remote(
    client: ServiceClient,
    image: str | Path,
    prompts: str | Path,
    output: str | Path,
    *,
    backbone: str = "auto",
    frame: int | None = None,
    series_uid: str | None = None,
    modality: str = "auto",
    window: tuple[float, float] | None = None,
    progress: Progress | None = None,
) -> RemoteResult:
    """:func:`sss_lib.segment_file.segment_file` on the service: same inputs, same output file.

    Raises:
        InputError: unreadable image or prompts, output is a folder. ServiceError / RunFailed /
        ServiceUnavailable: from the service; ``output`` is then left untouched.
    """
    from .volume_io import read_volume, write_volume

    output = _check_output(output)
    volume = read_volume(image, frame=frame, series_uid=series_uid)
    prompt_set = PromptSet.load(prompts, volume)
    remote = client.upload_volume(volume)
    session = client.open_session(remote.volume_id, backbone=backbone, slice_axis="ijk"[prompt_set.slice_axis.axis],
                                  modality=modality, window=window)
    try:
        result = run_to_end(session.segment(prompt_set), progress)
    finally:
        _close_quietly(session)
    write_volume(volume.with_voxels(result.labels), output)  # atomic: temp file + rename
    log.info("wrote %s", output)
    return result


@dataclasses.dataclass
class RemoteAutoResult:
    """What :func:`auto_segment_remote` produced; the fields the CLI reads have the names of
    :class:`sss_lib.auto_segment.AutoSegmentResult` (``pcsw`` values carry ``status`` and ``reason``)."""

    labels: Volume
    prompts: PromptSet
    pcsw: dict[int, Any]
    user_classes: list[int]
    absent: list[int]
    recomputed: list[int]
    reused: list[int]
    seconds: float
    remote: RemoteResult
    from_coarse: list[int] = dataclasses.field(default_factory=list)


def auto_segment_remote(
    client: ServiceClient,
    image: str | Path,
    model: str | Path,
    output: str | Path,
    prompts_out: str | Path,
    *,
    prompts_in: str | Path | None = None,
    frame: int | None = None,
    prompt_points: bool | None = None,
    progress: Progress | None = None,
) -> RemoteAutoResult:
    """:func:`sss_lib.auto_segment.auto_segment` on the service: the task model is uploaded (its
    id is its hash: the same file is loaded once), the label map and prompts written here.

    Raises:
        InputError: unreadable image, model or prompts; output is a folder. ServiceError /
        RunFailed / ServiceUnavailable: from the service; nothing is written then.
    """
    from .auto_segment import write_prompts_atomic
    from .volume_io import read_volume, write_volume

    output = _check_output(output)
    volume = read_volume(image, frame=frame)
    edited = PromptSet.load(prompts_in, volume) if prompts_in is not None else None
    model_path = Path(model)
    if not model_path.is_file():
        raise InputError(model_path, "task-model file not found", "Give the .ssstask file written by `train`.")
    model_id = client.upload_task_model(model_path)["model_id"]
    remote = client.upload_volume(volume)
    session = client.open_session(remote.volume_id, task_model=model_id)
    axis = session.slice_axis
    axis = "ijk"[axis] if isinstance(axis, int) else axis
    if edited is not None and axis not in (None, "ijk"[edited.slice_axis.axis]):
        _close_quietly(session)
        raise InputError(prompts_in, f"the edited prompts lie along slice axis {'ijk'[edited.slice_axis.axis]} but the "
                         f"task model slices along {axis}",
                         "Edit the prompts file the last run wrote, without changing its slice_axis.")
    try:
        result = run_to_end(session.auto_segment(edited, prompt_points=prompt_points), progress)
    finally:
        _close_quietly(session)
    if result.prompts_json is None:
        raise SSSError("the service's auto-segment result carries no prompts; update the server to this SSS version")
    used = PromptSet.from_json(result.prompts_json, volume, source="the service's prompts")
    labels = volume.with_voxels(result.labels)
    write_volume(labels, output)  # atomic: temp file + rename
    write_prompts_atomic(used, prompts_out)
    log.info("wrote %s and %s", output, prompts_out)
    pcsw = {label: types.SimpleNamespace(status=d.get("status", "?"), reason=d.get("reason", ""))
            for label, d in result.pcsw.items()}
    return RemoteAutoResult(labels, used, pcsw, result.user_classes, result.absent, result.recomputed,
                            result.reused, result.seconds, result, result.from_coarse)


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.is_dir():
        raise InputError(output, "is a folder", "Give a file name such as seg.nii.gz or seg.nrrd.")
    return output


def _close_quietly(session: Any) -> None:
    """Close a remote session; a service that is gone by now has closed it anyway."""
    try:
        session.close()
    except SSSError as err:
        log.debug("closing session %s: %s", session.session_id, err)
