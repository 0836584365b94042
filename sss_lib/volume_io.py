"""Reading and writing volume files with their exact geometry.

Formats: NIfTI-1 (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) and DICOM series (a folder;
see :mod:`sss_lib.dicom_io`). Everything goes through SimpleITK, imported lazily.

Coordinate convention: inside the library every position is **LPS** (see :mod:`sss_lib.volume`).
SimpleITK already reports all three formats in LPS: NIfTI stores a RAS affine (qform/sform) and ITK
negates its first two rows on reading and again on writing; NRRD files in RAS space are converted
by ITK too; DICOM is LPS by definition. So conversion happens only at this file boundary, inside
SimpleITK, and a :class:`~sss_lib.volume.Volume` never holds RAS.

Geometry is copied unchanged: ``spacing``, ``origin`` and ``direction`` (column ``a`` = LPS unit
vector of index axis ``a``, i.e. ITK's direction matrix) and voxels as ``[k, j, i]`` arrays in the
file's own dtype. Precision limits of the formats: NIfTI keeps its affine in float32 (about 1e-7
relative; an origin near 300 mm is kept to about 2e-5 mm); NRRD keeps the full double; DICOM keeps
decimal strings of 16 characters (about 1e-12 relative).

Every problem with a user's file raises :class:`~sss_lib.errors.InputError` naming the file and the
problem (never a raw SimpleITK traceback).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .volume import Volume

if TYPE_CHECKING:
    import SimpleITK

log = logging.getLogger(__name__)

#: File name endings this module reads and writes (besides a DICOM series folder).
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
_SUPPORTED_TEXT = ".nii, .nii.gz, .nrrd, .nhdr, or a folder holding one DICOM series"
_GRID_TOL = 1e-4  # mm (and direction cosine): far below any voxel, above decimal-string noise


# -- public API --------------------------------------------------------------------------------
def read_volume(path: str | Path, *, frame: int | None = None, series_uid: str | None = None) -> Volume:
    """Read a 3D volume (NIfTI, NRRD, or a DICOM series folder) with its LPS geometry.

    Args:
        path: a ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr`` file, or a folder holding a DICOM series.
        frame: which frame of a 4D file (a time series, or an NRRD ``list`` axis) to read, from 0.
            Required when the file holds more than one frame; ``0`` is accepted for a 3D file.
        series_uid: which SeriesInstanceUID to read when a DICOM folder holds several series.

    Returns:
        A :class:`Volume` whose ``voxels`` are ``[k, j, i]`` in the file's dtype.

    Raises:
        InputError: missing, unreadable, truncated, 2D, 4D without ``frame``, empty, or with NaN/inf
            voxels; the message names the file and the problem.
    """
    path = Path(path)
    image = _read_image(path, frame=frame, series_uid=series_uid)
    volume = _to_volume(image, path)
    _check_finite(volume)
    return volume


def read_label(
    path: str | Path,
    reference: Volume | None = None,
    *,
    frame: int | None = None,
    series_uid: str | None = None,
) -> Volume:
    """Read a label map (integer values) and, with ``reference``, check that it shares its grid.

    Float files whose values are all whole numbers are converted to the smallest integer dtype
    that holds them (uint8, uint16, int16, int32, then int64); boolean maps become uint8.

    Raises:
        InputError: as :func:`read_volume`, plus non-integer values (with how many), or a grid
            (shape, spacing, origin, direction) other than ``reference``'s (the message gives both).
    """
    label = read_volume(path, frame=frame, series_uid=series_uid)
    label.voxels = _as_integer_labels(label.voxels, Path(path))
    if reference is not None and not reference.same_grid(label, tol=_GRID_TOL):
        image_name = f"image {reference.source}" if reference.source else "image"
        raise InputError(
            path,
            f"label map grid differs from the image's ({_grid_difference(label, reference)}): "
            f"label has {describe_grid(label)}; "
            f"{image_name} has {describe_grid(reference)}",
            "Use a label map made on this image, or resample it onto the image's grid first.",
        )
    return label


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``volume`` to ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` with its exact geometry.

    Integer (label) maps stay integers (bool becomes uint8, float16 becomes float32). ``compress``
    gzips NRRD data; ``.nii.gz`` is always compressed and ``.nii`` never. Single-file formats are
    written to a temporary file beside ``path`` and renamed, so ``path`` is never left half written.
    Missing parent folders are created.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        InputError: unsupported extension, empty volume, or a write failure (naming the file).
    """
    sitk = _sitk()
    path = Path(path)
    fmt = _format_of(path)
    if fmt is None or path.is_dir():
        raise InputError(path, f"cannot write this file type ({_suffix_of(path) or 'no extension'})",
                         f"Supported: {', '.join(SUPPORTED_SUFFIXES)} (DICOM: use write_dicom_series).")
    image = to_sitk(volume, path)
    atomic = path.suffix.lower() != ".nhdr"  # a .nhdr names its data file: it cannot be renamed
    target = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if atomic:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_suffix_of(path), dir=path.parent)
            os.close(fd)
            target = Path(tmp)
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(target))
        writer.SetImageIO("NiftiImageIO" if fmt == "NIfTI" else "NrrdImageIO")
        writer.SetUseCompression(bool(compress) or path.name.lower().endswith(".gz"))
        writer.Execute(image)
        if atomic:
            os.replace(target, path)
    except (RuntimeError, OSError) as err:
        raise InputError(path, f"cannot be written: {_itk_reason(err)}",
                         "Check that the folder exists and is writable, and that the disk has room.") from None
    finally:
        if atomic and target != path and target.exists():
            target.unlink()
    log.debug("wrote %s (%s, %s)", path, fmt, volume.voxels.dtype)
    return path


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str = "CT",
    series_description: str = "SSS volume",
    **kwargs: object,
) -> list[Path]:
    """Write ``volume`` as a DICOM series, one file per ``k`` slice; see :func:`dicom_io.write_series`."""
    from .dicom_io import write_series

    return write_series(volume, folder, modality=modality, series_description=series_description, **kwargs)


def describe_grid(volume: Volume) -> str:
    """One line: size ``i x j x k``, spacing, origin and direction rows (LPS, mm)."""
    def vec(v: np.ndarray) -> str:
        return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"

    size = "x".join(str(n) for n in volume.shape_ijk)
    rows = " ".join(vec(r) for r in volume.direction)
    return f"size {size}, spacing {vec(volume.spacing)} mm, origin {vec(volume.origin)} mm, direction {rows}"


def _grid_difference(a: Volume, b: Volume) -> str:
    if a.voxels.shape != b.voxels.shape:
        return "size"
    parts = []
    for name, unit in (("spacing", " mm"), ("origin", " mm"), ("direction", "")):
        delta = float(np.abs(getattr(a, name) - getattr(b, name)).max())
        if delta > _GRID_TOL:
            parts.append(f"{name} by up to {delta:.3g}{unit}")
    return ", ".join(parts) or "geometry"


# -- SimpleITK <-> Volume ----------------------------------------------------------------------
def to_sitk(volume: Volume, path: str | Path | None = None) -> "SimpleITK.Image":
    """A SimpleITK image with ``volume``'s voxels and geometry (bool -> uint8, float16 -> float32)."""
    sitk = _sitk()
    voxels = np.asarray(volume.voxels)
    if voxels.size == 0:
        raise InputError(path or volume.source, f"volume is empty (size {'x'.join(map(str, volume.shape_ijk))})")
    if voxels.dtype == bool:
        voxels = voxels.astype(np.uint8)
    elif voxels.dtype == np.float16:
        voxels = voxels.astype(np.float32)
    elif voxels.dtype.kind not in "iuf":
        raise InputError(path or volume.source, f"cannot store voxels of dtype {voxels.dtype}",
                         "Convert them to an integer or float array.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels), isVector=False)
    image.SetSpacing([float(x) for x in volume.spacing])
    image.SetOrigin([float(x) for x in volume.origin])
    image.SetDirection([float(x) for x in volume.direction.ravel()])
    return image


def _to_volume(image: "SimpleITK.Image", path: Path) -> Volume:
    sitk = _sitk()
    return Volume(
        voxels=sitk.GetArrayFromImage(image),
        spacing=np.array(image.GetSpacing(), dtype=float),
        origin=np.array(image.GetOrigin(), dtype=float),
        direction=np.array(image.GetDirection(), dtype=float).reshape(3, 3),
        source=str(path),
    )


# -- reading -----------------------------------------------------------------------------------
def _read_image(path: Path, *, frame: int | None, series_uid: str | None) -> "SimpleITK.Image":
    if not path.exists():
        raise InputError(path, "not found (no such file or folder)", "Check the path.")
    if path.is_dir():
        from .dicom_io import read_series

        image = read_series(path, series_uid=series_uid)
        return _select_frame(image, path, frame)
    fmt = _format_of(path)
    if fmt is None:
        if path.suffix.lower() in (".dcm", ".ima") or _looks_like_dicom(path):
            raise InputError(path, "is a single DICOM file", "Pass the folder that holds the whole series.")
        raise InputError(path, f"unsupported file type ({_suffix_of(path) or 'no extension'})",
                         f"Supported: {_SUPPORTED_TEXT}.")
    if fmt == "NIfTI":
        _check_nifti_file(path, frame)
    else:
        _check_nrrd_header(path)
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("NiftiImageIO" if fmt == "NIfTI" else "NrrdImageIO")
    try:
        reader.ReadImageInformation()
        size = list(reader.GetSize())
        frames = _frame_count(size, reader.GetNumberOfComponents())
        _check_shape(path, size, reader.GetNumberOfComponents(), frames, frame)
        if len(size) == 4 and frames > 1:
            # Read just the chosen frame; extract size 0 collapses the time axis to a 3D image.
            reader.SetExtractIndex([0, 0, 0, int(frame)])  # type: ignore[arg-type]
            reader.SetExtractSize(size[:3] + [0])
            frame = None  # chosen already
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(path, f"cannot be read as {fmt}: {_itk_reason(err)}",
                         f"The file is damaged, truncated or not {fmt}; export it again.") from None
    if image.GetDimension() == 4:  # a 4D file with a single frame
        image = image[:, :, :, 0]
    return _select_frame(image, path, frame)


def _frame_count(size: list[int], components: int) -> int:
    if len(size) == 4:
        return size[3]
    return components if components > 1 else 1


def _check_shape(path: Path, size: list[int], components: int, frames: int, frame: int | None) -> None:
    """Refuse 2D, 5D+, empty, vector-4D and frame choices that do not fit, before reading voxels."""
    dims = len(size)
    if any(n == 0 for n in size):
        raise InputError(path, f"is empty: size {'x'.join(map(str, size))} has a zero-size dimension",
                         "Export the volume again.")
    if dims < 3:
        raise InputError(path, f"is a 2D image ({'x'.join(map(str, size))}); a 3D volume is needed",
                         "Pass a 3D volume (a stack of slices).")
    if dims > 4 or (dims == 4 and components > 1):
        raise InputError(path, f"has {dims} dimensions and {components} component(s) per voxel; "
                         "only 3D volumes and 4D frame series are supported",
                         "Split it into 3D volumes first.")
    _check_frame(path, frames, frame)


def _check_frame(path: Path, frames: int, frame: int | None) -> None:
    if frame is None:
        if frames > 1:
            raise InputError(path, f"holds {frames} frames (a 4D image)",
                             f"Choose one with frame=N (--frame N on the command line), N from 0 to {frames - 1}.")
        return
    if not 0 <= int(frame) < frames:
        held = f"{frames} frames (0 to {frames - 1})" if frames > 1 else "1 frame (a 3D volume: use frame 0 or none)"
        raise InputError(path, f"frame {frame} is out of range: the image holds {held}")


def _select_frame(image: "SimpleITK.Image", path: Path, frame: int | None) -> "SimpleITK.Image":
    """Pick one component of a multi-component 3D image (an NRRD ``list`` axis); check the rest."""
    sitk = _sitk()
    size = list(image.GetSize())
    components = image.GetNumberOfComponentsPerPixel()
    frames = _frame_count(size, components)
    _check_shape(path, size, components, frames, frame)
    if components > 1:
        image = sitk.VectorIndexSelectionCast(image, int(frame or 0))
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(path, "has complex voxels; a real-valued volume is needed", "Convert it to magnitude first.")
    return image


def _check_finite(volume: Volume) -> None:
    if volume.voxels.dtype.kind != "f":
        return
    finite = np.isfinite(volume.voxels)
    if finite.all():
        return
    n_nan = int(np.isnan(volume.voxels).sum())
    raise _nonfinite_error(volume.source, n_nan, int(volume.voxels.size - finite.sum()) - n_nan, volume.voxels.size)


def _nonfinite_error(path: object, nan: int, inf: int, total: int) -> InputError:
    return InputError(path, f"holds {nan} NaN and {inf} infinite voxels (of {total})",
                      "Replace them with finite values (e.g. 0) before segmenting.")


def _as_integer_labels(voxels: np.ndarray, path: Path) -> np.ndarray:
    if voxels.dtype == bool:
        return voxels.astype(np.uint8)
    if voxels.dtype.kind in "iu":
        return voxels
    if voxels.dtype.kind != "f":
        raise InputError(path, f"is not a label map: voxels are of type {voxels.dtype}", "Pass an integer label map.")
    fractional = voxels != np.round(voxels)
    if fractional.any():
        example = float(voxels[fractional].flat[0])
        raise InputError(
            path,
            f"is not a label map: {int(fractional.sum())} voxels hold non-integer values (e.g. {example:g})",
            "Pass a label map of whole numbers (0 = background), not an image or a probability map.",
        )
    lo, hi = (float(voxels.min()), float(voxels.max())) if voxels.size else (0.0, 0.0)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return voxels.astype(dtype)
    raise InputError(path, f"label values {lo:g}..{hi:g} do not fit a 64-bit integer")


# -- file checks SimpleITK does not do ---------------------------------------------------------
def _check_nifti_file(path: Path, frame: int | None) -> None:
    """Refuse what ITK's NIfTI reader would accept silently.

    ITK pads a truncated file, turns a zero size into 1, and replaces NaN/inf voxels with 0; so
    this reads the file once: the header, then the data, counting its bytes and (for float data,
    within the chosen frame) its non-finite values. NIfTI-2 is refused with a way out.
    """
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            header = f.read(348)
            layout = _nifti_layout(path, header)
            have, nan, inf = _scan_nifti_data(f, len(header), layout, frame)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InputError(path, f"is a damaged or truncated gzip file ({err})",
                         "The download or copy was cut short; copy the file again.") from None
    except OSError as err:
        raise InputError(path, f"cannot be opened ({err.strerror or err})") from None
    if have < layout["need"]:
        raise InputError(path, f"is truncated: it holds {have} bytes but its header needs {layout['need']}",
                         "The download or copy was cut short; copy the file again.")
    if nan or inf:
        raise _nonfinite_error(path, nan, inf, layout["scanned"])


def _nifti_layout(path: Path, header: bytes) -> dict:
    if len(header) < 348:
        raise InputError(path, f"is not a NIfTI file: only {len(header)} bytes", "Copy the file again.")
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr in (348, 540):
            break
    else:
        raise InputError(path, "is not a NIfTI-1 file (bad header size)", f"Supported: {_SUPPORTED_TEXT}.")
    if sizeof_hdr == 540:
        raise InputError(path, "is a NIfTI-2 file, which SimpleITK cannot read",
                         "Save it as NIfTI-1 (e.g. nibabel.Nifti1Image) or NRRD.")
    dim = struct.unpack(endian + "8h", header[40:56])
    datatype, bitpix = struct.unpack(endian + "hh", header[70:74])
    vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
    if not 1 <= dim[0] <= 7:
        raise InputError(path, f"has a damaged NIfTI header (dim[0] = {dim[0]})", "Export the volume again.")
    sizes = [int(n) for n in dim[1 : dim[0] + 1]]
    if any(n <= 0 for n in sizes):
        raise InputError(path, f"is empty: size {'x'.join(map(str, sizes))} has a zero-size dimension",
                         "Export the volume again.")
    item = max(int(bitpix), 8) // 8
    count = int(np.prod(sizes, dtype=np.int64))
    floats = {16: "f4", 64: "f8"}.get(int(datatype))
    return {"sizes": sizes, "offset": vox_offset, "item": item, "need": vox_offset + count * item,
            "dtype": np.dtype(endian + floats) if floats else None, "scanned": 0}


def _scan_nifti_data(f: object, start: int, layout: dict, frame: int | None) -> tuple[int, int, int]:
    """Read the rest of the file: its total length, and NaN/inf counts in the voxels ITK will return."""
    sizes, item = layout["sizes"], layout["item"]
    per_frame = int(np.prod(sizes[:3], dtype=np.int64)) * item
    frames = int(np.prod(sizes[3:], dtype=np.int64)) if len(sizes) > 3 else 1
    lo = hi = 0  # byte range whose floats to count; none unless the voxels ITK returns are known
    if layout["dtype"] is not None:
        if frames == 1:
            lo, hi = layout["offset"], layout["need"]
        elif frame is not None and 0 <= frame < frames and sum(n > 1 for n in sizes[3:]) == 1:
            lo = layout["offset"] + frame * per_frame
            hi = lo + per_frame
    layout["scanned"] = (hi - lo) // item
    pos, nan, inf = start, 0, 0
    carry = b""
    while chunk := f.read(1 << 22):  # type: ignore[attr-defined]
        a, b = max(lo, pos), min(hi, pos + len(chunk))
        if a < b:
            data = carry + chunk[a - pos : b - pos]
            usable = len(data) - len(data) % item
            values = np.frombuffer(data[:usable], dtype=layout["dtype"])
            bad = ~np.isfinite(values)
            if bad.any():
                n_nan = int(np.isnan(values[bad]).sum())
                nan, inf = nan + n_nan, inf + int(bad.sum()) - n_nan
            carry = data[usable:]
        pos += len(chunk)
    return pos, nan, inf


def _check_nrrd_header(path: Path) -> None:
    """Give empty NRRDs (a size of 0) their own message instead of teem's parser error."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(1 << 16)
        end = head.find(b"\n\n")
        text = head[: end if end >= 0 else len(head)].decode("latin-1")
        match = re.search(r"^sizes:\s*([^\n]*)$", text, flags=re.MULTILINE)
        if match:
            sizes = match.group(1).split()
            if "0" in sizes:
                raise InputError(path, f"is empty: size {'x'.join(sizes)} has a zero-size dimension",
                                 "Export the volume again.")


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError as err:
        raise InputError(path, f"cannot be opened ({err.strerror or err})") from None


def _looks_like_dicom(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"
    return False


# -- helpers -----------------------------------------------------------------------------------
def _sitk():  # noqa: ANN202 - the module, imported on first use to keep ``import sss_lib`` light
    import SimpleITK

    return SimpleITK


def _suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _format_of(path: Path) -> str | None:
    suffix = _suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        return "NIfTI"
    if suffix in NRRD_SUFFIXES:
        return "NRRD"
    return None


def _itk_reason(err: BaseException) -> str:
    """The informative last line of a SimpleITK/ITK/teem error, without source paths and addresses."""
    if isinstance(err, OSError) and not isinstance(err, RuntimeError):
        return err.strerror or str(err)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK") and not ln.endswith(":")] or lines
    reason = lines[-1] if lines else "unknown error"
    reason = re.sub(r"^(ITK ERROR|itk::ERROR|sitk::ERROR):\s*", "", reason)
    reason = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)  # "NrrdImageIO(0x55...): "
    reason = re.sub(r"^(ReadImageInformation|Read|Write):\s*", "", reason)
    reason = re.sub(r"^\[\w+\]\s*\w+:\s*", "", reason)  # "[nrrd] _nrrdEncodingGzip_read: "
    reason = re.sub(r"\s+", " ", reason).strip().rstrip(".")
    return reason[:240] or "unknown error"
