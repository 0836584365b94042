"""Uploaded datasets for training jobs: safe archive extraction and the upload store.

An upload is a ``.zip`` or ``.tar.gz`` (plain ``.tar`` too) of a dataset folder, normally an
nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``); any layout
:func:`sss_lib.datasets.open_dataset` reads is accepted (a folder of volumes serves as unlabeled
data). The dataset may sit at the archive's root or inside one top folder (``Dataset001_Heart/``).

Extraction trusts nothing in the archive (:func:`extract_archive`): member names must be relative
with no ``..`` part, only regular files and folders are written (no symlinks, hard links or
devices), encrypted zip members are refused, and the bytes actually written are counted against a
limit (a declared size can lie; a zip bomb stops at the limit). Everything is extracted into a
temporary folder and renamed into place, so an upload is either complete or absent.

Store layout (``UPLOADS = <jobs_dir>/uploads``)::

    UPLOADS/<upload_id>/upload.json   {upload_id, created, layout, cases, labeled, unlabeled, dataset}
    UPLOADS/<upload_id>/data/...      the extracted files; ``dataset`` is the dataset folder inside
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

from ..errors import InputError
from .http_errors import ApiError, not_found

log = logging.getLogger(__name__)

#: Members an archive may hold (folders included).
MAX_MEMBERS = 200_000
#: Extracted bytes allowed per uploaded byte limit (nnU-Net files are .nii.gz: little expansion).
EXTRACT_FACTOR = 4
_CHUNK = 1 << 20
_ID_RE = re.compile(r"^[0-9a-f]{16,64}$")
_SKIPPED_TOPS = ("__MACOSX",)  # macOS resource-fork folders, never data


class ArchiveError(ApiError):
    """An archive that cannot be used (HTTP 422 ``bad_archive``, or 413 ``archive_too_large`` when
    ``too_large``); the message says what is wrong and what to do."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(413 if too_large else 422, "archive_too_large" if too_large else "bad_archive", message)
        self.too_large = too_large


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path an archive member may be written to, or None for one to skip.

    Raises:
        ArchiveError: an absolute path, a drive letter, a ``..`` part or a NUL character.
    """
    text = name.replace("\\", "/")
    if "\x00" in text:
        raise ArchiveError(f"the archive member {name!r} has a NUL character in its name. Re-create the archive.")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ArchiveError(f"the archive member {name!r} has an absolute path. Archive the dataset folder with "
                           "relative paths (e.g. `tar czf data.tar.gz -C PARENT Dataset001_X`).")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"the archive member {name!r} points outside the archive (a '..' part). "
                           "Re-create the archive from the dataset folder.")
    if not parts or parts[0] in _SKIPPED_TOPS or parts[-1].startswith("._"):
        return None
    return PurePosixPath(*parts)


class _Budget:
    """Counts members and written bytes against the limits."""

    def __init__(self, max_bytes: int, max_members: int) -> None:
        self.max_bytes = int(max_bytes)
        self.max_members = int(max_members)
        self.bytes = 0
        self.members = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveError(f"the archive holds more than {self.max_members} files and folders. "
                               "Upload the dataset in parts or with fewer files.")

    def add(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ArchiveError(f"the archive expands to more than {self.max_bytes // (1 << 20)} MB. Upload a smaller "
                               "dataset, or put it under the server's --data-root and name its path instead.",
                               too_large=True)


def _write_member(dest: Path, rel: PurePosixPath, source: IO[bytes], budget: _Budget) -> None:
    target = dest.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "wb") as out:
            while True:
                chunk = source.read(_CHUNK)
                if not chunk:
                    break
                budget.add(len(chunk))
                out.write(chunk)
    except IsADirectoryError:
        raise ArchiveError(f"the archive has both a file and a folder called {rel}. Re-create the archive.") from None


def _extract_zip(src: Path, dest: Path, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as err:
        raise ArchiveError(f"the upload is not a readable zip file ({err}). Send a .zip or .tar.gz of the "
                           "dataset folder.") from None
    with zf:
        for info in zf.infolist():
            budget.member()
            rel = safe_member_path(info.filename)
            mode = (info.external_attr >> 16) & 0o170000
            if mode == stat.S_IFLNK:
                raise ArchiveError(f"the archive member {info.filename!r} is a symbolic link; links are not accepted. "
                                   "Archive the files themselves (zip without -y).")
            if mode not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"the archive member {info.filename!r} is not a file or a folder.")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"the archive member {info.filename!r} is encrypted. Upload an unencrypted archive.")
            if rel is None:
                continue
            if info.is_dir():
                dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                continue
            try:
                with zf.open(info) as source:
                    _write_member(dest, rel, source, budget)
            except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError) as err:
                raise ArchiveError(f"the archive member {info.filename!r} cannot be read ({err}). "
                                   "Re-create the archive.") from None


def _extract_tar(src: Path, dest: Path, budget: _Budget) -> None:
    try:
        tf = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ArchiveError(f"the upload is not a readable tar archive ({err}). Send a .zip or .tar.gz of the "
                           "dataset folder.") from None
    try:
        with tf:
            for member in tf:  # streams: members are checked and written one by one
                budget.member()
                rel = safe_member_path(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"the archive member {member.name!r} is a link; links are not accepted. "
                                       "Archive the files themselves (tar without -h is fine; remove the links).")
                if not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"the archive member {member.name!r} is not a file or a folder.")
                if rel is None:
                    continue
                if member.isdir():
                    dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                    continue
                source = tf.extractfile(member)
                if source is None:
                    raise ArchiveError(f"the archive member {member.name!r} cannot be read.")
                with source:
                    _write_member(dest, rel, source, budget)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ArchiveError(f"the tar archive is damaged or truncated ({err}). Upload it again.") from None


def archive_kind(path: Path) -> str:
    """``"zip"`` or ``"tar"`` from the file's first bytes (its name is not trusted).

    Raises:
        ArchiveError: neither a zip nor a (gzip-, bzip2- or xz-compressed) tar.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[257:262] == b"ustar":
        return "tar"
    if not head:
        raise ArchiveError("the upload is empty. Send a .zip or .tar.gz of the dataset folder.")
    raise ArchiveError("the upload is neither a zip nor a tar.gz archive. Send a .zip or .tar.gz of the dataset "
                       "folder (e.g. `tar czf data.tar.gz -C PARENT Dataset001_X`).")


def extract_archive(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, max_bytes: int,
                    max_members: int = MAX_MEMBERS) -> Path:
    """Extract the zip or tar archive ``src`` into the new folder ``dest``, safely (module docstring).

    Returns ``dest``. On any error nothing is left at ``dest``.

    Raises:
        ArchiveError: a malformed archive, an unsafe member, or more than ``max_bytes`` written.
        FileExistsError: ``dest`` exists.
    """
    src, dest = Path(src), Path(dest)
    kind = archive_kind(src)
    tmp = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        budget = _Budget(max_bytes, max_members)
        (_extract_zip if kind == "zip" else _extract_tar)(src, tmp, budget)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("extracted %s (%s, %d members, %d bytes) to %s", src.name, kind, budget.members, budget.bytes, dest)
    return dest


def find_dataset_root(folder: Path) -> Path:
    """The dataset folder inside an extracted archive: ``folder`` itself, or its one sub-folder
    (followed down while a folder holds nothing but one sub-folder) when ``folder`` holds no
    ``dataset.json`` and no files of its own."""
    root = folder
    for _ in range(8):
        if (root / "dataset.json").is_file():
            return root
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        dirs = [p for p in entries if p.is_dir()]
        if len(dirs) == 1 and len(entries) == 1:
            root = dirs[0]
            continue
        return root
    return root


def describe_dataset(path: Path, layout: str = "auto") -> dict[str, Any]:
    """``{layout, cases, labeled, unlabeled, classes}`` of the dataset at ``path``.

    Raises:
        InputError: not a dataset the trainer reads (the message says why).
    """
    from ..datasets import open_dataset

    cases = open_dataset(path, layout=layout)  # type: ignore[arg-type]
    return {"layout": cases.layout, "cases": len(cases), "labeled": len(cases.labeled),
            "unlabeled": len(cases.unlabeled), "classes": {str(k): v for k, v in sorted(cases.class_names.items())}}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class UploadStore:
    """Uploaded datasets under ``root`` (see the module docstring).

    Args:
        root: the store's folder (created).
        max_extract: most bytes one archive may expand to.
    """

    def __init__(self, root: str | os.PathLike[str], *, max_extract: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming = self.root / ".incoming"
        self.incoming.mkdir(exist_ok=True)
        self.max_extract = int(max_extract)
        # Bodies and extractions a killed server never finished (an upload is whole once its
        # upload.json exists; the caller holds the jobs folder, so nothing else writes here).
        for stale in self.incoming.iterdir():
            stale.unlink(missing_ok=True) if stale.is_file() else shutil.rmtree(stale, ignore_errors=True)
        for folder in self.root.iterdir():
            if _ID_RE.match(folder.name) and not (folder / "upload.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)

    def new_body_file(self) -> tuple[Path, IO[bytes]]:
        """A fresh file for an incoming request body: ``(path, open binary file)``."""
        path = self.incoming / f"body-{secrets.token_hex(8)}"
        return path, open(path, "xb")

    def add_archive(self, archive: Path) -> dict[str, Any]:
        """Extract ``archive`` (deleted afterwards) into a new upload and describe it.

        Returns:
            ``{upload_id, cases, labeled, unlabeled, layout, classes}``.

        Raises:
            ArchiveError: unsafe or malformed archive, or too large once extracted; or no dataset
                inside (the message says what was found).
        """
        upload_id = secrets.token_hex(12)
        folder = self.root / upload_id
        try:
            extract_archive(archive, folder / "data", max_bytes=self.max_extract)
            dataset = find_dataset_root(folder / "data")
            try:
                info = describe_dataset(dataset)
            except InputError as err:
                raise ArchiveError(f"the archive holds no dataset the trainer can read: {err} Upload a .zip or "
                                   ".tar.gz of an nnU-Net v2 raw dataset folder (dataset.json, imagesTr/, "
                                   "labelsTr/).") from None
            record = {"upload_id": upload_id, "created": time.time(),
                      "dataset": dataset.relative_to(folder).as_posix(), **info}
            write_json_atomic(folder / "upload.json", record)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            Path(archive).unlink(missing_ok=True)
        log.info("upload %s: %s dataset, %d cases (%d labeled)", upload_id, info["layout"], info["cases"],
                 info["labeled"])
        return {k: record[k] for k in ("upload_id", "cases", "labeled", "unlabeled", "layout", "classes")}

    def get(self, upload_id: str) -> dict[str, Any]:
        """The record of ``upload_id`` with ``path``: the dataset folder.

        Raises:
            ApiError: 404 ``unknown_upload``.
        """
        meta = self.root / str(upload_id) / "upload.json"
        if not _ID_RE.match(str(upload_id)) or not meta.is_file():
            raise not_found("upload", str(upload_id), "upload the dataset (POST /v1/uploads) and use the "
                            "upload_id it returns")
        record = json.loads(meta.read_text(encoding="utf-8"))
        record["path"] = str(self.root / str(upload_id) / record["dataset"])
        return record

    def __iter__(self) -> Iterator[str]:
        return (p.name for p in self.root.iterdir() if _ID_RE.match(p.name) and (p / "upload.json").is_file())
