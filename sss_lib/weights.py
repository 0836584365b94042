"""Checkpoint registry, cache folder, verified download and safe loading.

Layout of the cache folder (:func:`cache_dir`)::

    NAME.pt          the checkpoint, only ever created by an atomic rename
    NAME.pt.part     an unfinished download, resumed by the next download call
    NAME.pt.sha256   JSON sidecar: size, sha256, url, recorded_at, source

Trust model: Meta publishes neither sizes nor SHA-256 sums for the SAM-2.1 checkpoints, so the
registry leaves them ``None`` and the hash is *recorded* when the file first arrives (download or
copied by hand) and checked again at every :func:`ensure_weights`. Where a spec does carry a
published size or hash, a file that disagrees is refused. Loading never unpickles code
(``torch.load(weights_only=True)``).

torch is imported only inside the loading functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from .download import FetchError, ProgressCallback, fetch_resumable, file_sha256
from .errors import WeightsError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Folder that holds everything SSS caches; ``weights/`` lives below it.
SSS_HOME_ENV = "SSS_HOME"
#: Base URL of a mirror holding the checkpoints under their original file names.
MIRROR_ENV = "SSS_WEIGHTS_MIRROR"
DOWNLOAD_HINT = "python -m sss_lib weights download"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class WeightsSpec:
    """A known checkpoint.

    Attributes:
        name: registry name; also the cache file name ``NAME.pt``.
        url: where to download it.
        config: sam2 Hydra config name (e.g. ``"configs/sam2.1/sam2.1_hiera_t.yaml"``), or None for
            checkpoints that are not built by sam2.
        image_size: side of the square network input the checkpoint was trained at.
        size_bytes: published file size, or None when not published.
        sha256: published lowercase hex SHA-256, or None ("record at first download").
        description: one line for listings.
    """

    name: str
    url: str
    config: str | None = None
    image_size: int = 1024
    size_bytes: int | None = None
    sha256: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"weights name {self.name!r} must be letters, digits and . _ + - (it becomes a file name)")
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"{self.name}: size_bytes must be positive")

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"


_META_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


def _sam21(name: str, config: str, description: str) -> WeightsSpec:
    # Sizes and hashes stay None: Meta's README and download_ckpts.sh publish neither.
    return WeightsSpec(name, f"{_META_BASE}/{name}.pt", f"configs/sam2.1/{config}", 1024, None, None, description)


_REGISTRY: dict[str, WeightsSpec] = {
    spec.name: spec
    for spec in (
        _sam21("sam2.1_hiera_tiny", "sam2.1_hiera_t.yaml", "SAM-2.1 Hiera-T (38.9 M parameters)"),
        _sam21("sam2.1_hiera_small", "sam2.1_hiera_s.yaml", "SAM-2.1 Hiera-S (46 M parameters)"),
        _sam21("sam2.1_hiera_base_plus", "sam2.1_hiera_b+.yaml", "SAM-2.1 Hiera-B+ (80.8 M parameters)"),
        _sam21("sam2.1_hiera_large", "sam2.1_hiera_l.yaml", "SAM-2.1 Hiera-L (224.4 M parameters)"),
    )
}


def register_weights(spec: WeightsSpec, *, replace: bool = False) -> None:
    """Add a checkpoint (e.g. a 512-trained fine-tune) to the registry of this process."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise WeightsError(f"weights {spec.name!r} are already registered with other values; pass replace=True")
    _REGISTRY[spec.name] = spec


def unregister_weights(name: str) -> None:
    """Remove a registry entry (no effect on files in the cache)."""
    _REGISTRY.pop(name, None)


def known_weights() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> WeightsSpec:
    """The registry entry for ``name``; WeightsError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(_REGISTRY)}") from None


def weights_url(spec: WeightsSpec) -> str:
    """Download URL of ``spec``, through ``$SSS_WEIGHTS_MIRROR`` when set."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return spec.url
    return f"{mirror.rstrip('/')}/{spec.url.rsplit('/', 1)[-1]}"


# --------------------------------------------------------------------------------------------- cache


def sss_home() -> Path:
    """Root of SSS's cache: ``$SSS_HOME``, else the platform's user cache folder + ``sss``.

    Linux ``$XDG_CACHE_HOME/sss`` (``~/.cache/sss``), macOS ``~/Library/Caches/sss``, Windows
    ``%LOCALAPPDATA%\\sss\\Cache``. Not created here.
    """
    home = os.environ.get(SSS_HOME_ENV, "").strip()
    if home:
        return Path(home).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA", "").strip()
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "sss" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sss"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "sss"


def cache_dir() -> Path:
    """Folder holding the checkpoints (``sss_home()/weights``). Created by downloads, not here."""
    return sss_home() / "weights"


def weights_path(name: str) -> Path:
    """Where checkpoint ``name`` lives (or must be put by hand). The file may not exist."""
    return cache_dir() / get_spec(name).filename


def sidecar_path(path: Path) -> Path:
    """The JSON record next to a checkpoint: ``NAME.pt.sha256``."""
    return path.with_name(path.name + ".sha256")


# ------------------------------------------------------------------------------------ verification


@dataclasses.dataclass(frozen=True)
class WeightsRecord:
    """The content of a sidecar: what a checkpoint was when it arrived."""

    size: int
    sha256: str
    url: str | None
    recorded_at: str
    #: "download" or "placed" (found in the cache without a record, copied by hand).
    source: str


def read_record(path: Path) -> WeightsRecord | None:
    """The sidecar of checkpoint ``path``, or None when there is none."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
        return WeightsRecord(
            size=int(data["size"]), sha256=str(data["sha256"]).lower(), url=data.get("url"),
            recorded_at=str(data.get("recorded_at", "")), source=str(data.get("source", "")),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsError(
            f"{side}: the checksum record is unreadable ({error}). Delete {path} and {side} and download again."
        ) from error


def recorded_sha256(path: Path) -> str | None:
    """SHA-256 recorded for ``path`` (no hashing; call :func:`verify_file` first)."""
    record = read_record(Path(path))
    return record.sha256 if record else None


def _write_record(path: Path, record: WeightsRecord) -> None:
    side = sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, side)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def verify_file(
    path: Path,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    url: str | None = None,
) -> WeightsRecord:
    """Check a checkpoint against its published size/hash and its sidecar; write the sidecar if absent.

    Hashes the whole file (about 1 s per GB). A file with no sidecar is accepted (its hash is
    recorded, ``source="placed"``) unless it contradicts a published size or hash.

    Raises:
        WeightsError: missing file, wrong size, wrong hash, or a file changed since its hash was
            recorded. The message says to delete the file (and its sidecar) and download again.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    redo = f"Delete {path} and {sidecar_path(path)} and download it again"
    size = path.stat().st_size
    record = read_record(path)
    if expected_size is not None and size != expected_size:
        raise WeightsError(
            f"{path}: the file is {size} bytes but the published size is {expected_size} bytes (incomplete or a "
            f"different file). {redo}."
        )
    if record is not None and record.size != size:
        raise WeightsError(
            f"{path}: the file was modified after it was recorded on {record.recorded_at} "
            f"({size} bytes now, {record.size} then). {redo}."
        )
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise WeightsError(
            f"{path}: SHA-256 {sha} does not match the published {expected_sha256} "
            f"(corrupt or a different file). {redo}."
        )
    if record is not None:
        if sha != record.sha256:
            raise WeightsError(
                f"{path}: the file was modified after it was recorded on {record.recorded_at} "
                f"(SHA-256 {sha} now, {record.sha256} then). {redo}."
            )
        return record
    record = WeightsRecord(size=size, sha256=sha, url=url, recorded_at=_now(), source="placed")
    _write_record(path, record)
    log.info("recorded SHA-256 %s for %s (found without a record)", sha, path)
    return record


def verify_weights(name: str) -> WeightsRecord:
    """:func:`verify_file` for the cached checkpoint of registry entry ``name``."""
    spec = get_spec(name)
    path = weights_path(name)
    return verify_file(path, expected_size=spec.size_bytes, expected_sha256=spec.sha256, url=weights_url(spec))


# ---------------------------------------------------------------------------------------- download


def _put_it_there(url: str, path: Path) -> str:
    return (
        f"Without internet access, download {url} on another machine and copy it to exactly {path} "
        f"(it is checked on first use), or set {MIRROR_ENV} to a mirror that holds it"
    )


def download_weights(
    name: str,
    *,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
    """Download checkpoint ``name`` into the cache and return its path.

    Streams to ``NAME.pt.part`` (resuming a previous partial download with an HTTP Range request),
    checks the announced/published size and the published SHA-256, records the SHA-256 in the
    sidecar and only then renames the file into place, so ``NAME.pt`` is never half-written. A file
    already in place is verified and returned without downloading.

    Args:
        name: a registry name (:func:`known_weights`).
        progress: ``progress(bytes_done, total_or_None)``; see :data:`sss_lib.download.ProgressCallback`.
        timeout: seconds allowed for connecting and for each read.
        retries: resumes allowed after a broken stream within this call.

    Raises:
        WeightsError: unknown name; server unreachable or failing (the message gives the URL and the
            exact path to put the file at); wrong size or checksum (the partial file is deleted).
    """
    spec = get_spec(name)
    final = weights_path(name)
    if final.exists():
        verify_weights(name)
        log.info("%s is already in the cache at %s", name, final)
        return final
    url = weights_url(spec)
    part = final.with_name(final.name + ".part")
    log.info("downloading %s from %s to %s", name, url, final)
    try:
        result = fetch_resumable(
            url, part, expected_size=spec.size_bytes, progress=progress, timeout=timeout, retries=retries
        )
    except FetchError as error:
        kept = (
            f" The partial download ({error.partial_bytes} bytes) is kept at {part}; run the download again to resume."
            if error.partial_bytes and part.exists() else ""
        )
        what = f"Cannot reach {url} to download {name}" if error.offline else f"Downloading {name} from {url} failed"
        raise WeightsError(f"{what}: {error.reason}. {_put_it_there(url, final)}.{kept}") from error
    if spec.sha256 is not None and result.sha256 != spec.sha256:
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"Downloaded {name} from {url} but its SHA-256 {result.sha256} does not match the published "
            f"{spec.sha256}; the download was deleted. Try again later, or check {MIRROR_ENV} if you use a mirror."
        )
    _write_record(final, WeightsRecord(result.size, result.sha256, url, _now(), "download"))
    os.replace(part, final)
    log.info("%s: %d bytes, SHA-256 %s -> %s", name, result.size, result.sha256, final)
    return final


def ensure_weights(
    name: str,
    download: bool = False,
    *,
    progress: ProgressCallback | None = None,
    timeout: float = 30.0,
) -> Path:
    """Path of a verified checkpoint ``name``, downloading it first when allowed.

    Every call re-hashes the file against its sidecar (and any published hash), so a checkpoint
    modified after it arrived is refused.

    Raises:
        WeightsError: not in the cache and ``download`` is False (the message gives the command, the URL
            and the exact path), or any failure of :func:`download_weights` / :func:`verify_file`.
    """
    spec = get_spec(name)
    path = weights_path(name)
    if path.exists():
        verify_weights(name)
        return path
    if download:
        return download_weights(name, progress=progress, timeout=timeout)
    url = weights_url(spec)
    raise WeightsError(
        f"Weights {name} are not in the cache ({path}). Run `{DOWNLOAD_HINT} {name}`. {_put_it_there(url, path)}."
    )


@dataclasses.dataclass(frozen=True)
class WeightsStatus:
    """One row of :func:`list_weights`."""

    name: str
    url: str
    path: Path
    present: bool
    #: present and matching its sidecar (size always; hash too when listed with ``check_hash``).
    verified: bool
    size: int | None
    sha256: str | None
    detail: str


def list_weights(*, check_hash: bool = False) -> list[WeightsStatus]:
    """State of every registered checkpoint in the cache.

    Without ``check_hash`` this only compares sizes with the sidecar (fast); with it, every present
    file is hashed as :func:`ensure_weights` would (and a hand-placed file gets its sidecar).
    """
    rows = []
    for name, spec in _REGISTRY.items():
        path = weights_path(name)
        url = weights_url(spec)
        if not path.is_file():
            partial = path.with_name(path.name + ".part")
            detail = f"partial download: {partial.stat().st_size} bytes" if partial.exists() else "not downloaded"
            rows.append(WeightsStatus(name, url, path, False, False, None, None, detail))
            continue
        size = path.stat().st_size
        try:
            if check_hash:
                record = verify_weights(name)
                verified, detail = True, "hash checked"
            else:
                record = read_record(path)
                if record is None:
                    verified, detail = False, "placed by hand; checked on first use"
                elif record.size != size or (spec.size_bytes is not None and size != spec.size_bytes):
                    verified, detail = False, "size differs from its record; delete and download again"
                else:
                    verified, detail = True, f"recorded {record.recorded_at}"
        except WeightsError as error:
            record, verified, detail = None, False, str(error)
        rows.append(WeightsStatus(name, url, path, True, verified, size, record.sha256 if record else None, detail))
    return rows


@contextlib.contextmanager
def tqdm_progress(desc: str, *, file: Any = None, disable: bool | None = False) -> Iterator[ProgressCallback]:
    """A byte-counting tqdm bar as a :data:`ProgressCallback`; the bar is closed on exit.

    Usage: ``with tqdm_progress(name) as cb: download_weights(name, progress=cb)``.
    """
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=file, disable=disable)

    def update(done: int, total: int | None) -> None:
        if done < bar.n:  # the server ignored Range and the download restarted
            bar.reset(total=total)
        elif total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------- loading


def load_state_dict(path: Path | str) -> dict[str, "torch.Tensor"]:
    """Read a checkpoint's tensors on the CPU without executing any pickled code.

    Unwraps ``{"model": state_dict}`` (SAM-2's layout) and ``{"state_dict": ...}``. Does not hash the
    file: call :func:`ensure_weights` (registry) or :func:`verify_file` first.

    Raises:
        WeightsError: unreadable or truncated file, a pickle that needs code to load, or a payload
            that is not a flat mapping of names to tensors.
    """
    import pickle

    import torch

    path = Path(path)
    redo = f"Delete {path} (and {sidecar_path(path).name} if present) and download it again"
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"{path}: refused to load: the file contains objects other than tensors, which could run code "
            f"({str(error).splitlines()[0] if str(error) else 'unpickling error'}). Use a plain state-dict checkpoint."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({error}). {redo}.") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
            break
    if not isinstance(payload, Mapping):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors, found {type(payload).__name__}")
    bad = [str(k) for k, v in payload.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not named tensors: {_few(bad)}")
    return dict(payload)


def load_weights_into(model: "torch.nn.Module", state_dict: Mapping[str, "torch.Tensor"], source: str) -> None:
    """Copy ``state_dict`` into ``model`` only if the keys and shapes match exactly.

    Args:
        model: the network; its parameters and persistent buffers define the expected keys.
        state_dict: from :func:`load_state_dict`.
        source: where the tensors came from (a path or a name), quoted in errors.

    Raises:
        WeightsError: missing keys, unexpected keys or shape mismatches (up to 10 of each listed), so
            a checkpoint for another model size or image size never loads half-way.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}")
    if problems:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Check that the checkpoint matches the model size (and image size for fine-tunes)."
        )
    model.load_state_dict(dict(state_dict), strict=True)


def _few(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
