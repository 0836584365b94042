"""DICOM series: read one series from a folder, write a volume as a series (through SimpleITK/GDCM).

Reading picks the series by SeriesInstanceUID, lets GDCM sort its files along the slice normal,
and checks what ITK only warns about: every file has the same orientation, slice positions are
evenly spaced (no missing slice) and lie along the normal (no gantry tilt). The slice spacing is
the mean gap between the first and last positions. Positions are LPS, as in DICOM itself.

Writing stores one file per ``k`` slice with ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, SpacingBetweenSlices, RescaleSlope/Intercept and fresh UIDs
(``2.25.<uuid>``). Pixels are 16-bit: integer volumes whose values fit int16 are stored as int16
unchanged (read back identical, as int16); other whole numbers spanning at most 65536 values are
stored unsigned with slope 1 and an intercept (identical values, possibly a wider dtype on
reading); anything else is int16 quantised to 65000 steps with RescaleSlope/RescaleIntercept
(error at most half a step, i.e. half the RescaleSlope). Geometry is written as 16-character
decimal strings, about 1e-12 relative.

DICOM has no left-handed grids: slices are stacked along row x column. A volume whose direction
has determinant -1 is written unchanged, and reads back as the same physical volume with ``k``
reversed (origin at the last slice, third direction column negated).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import InputError
from .volume import Volume

if TYPE_CHECKING:
    import SimpleITK

log = logging.getLogger(__name__)

SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_ORIENTATION_TOL = 1e-4  # direction cosine
_INT16 = (-32768, 32767)
_QUANT_STEPS = 65000.0  # below 65535 so decimal rounding of slope/intercept cannot overflow int16


# -- reading -----------------------------------------------------------------------------------
def list_series(folder: str | Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> its files sorted along the slice normal, for the files right in ``folder``."""
    sitk = _sitk()
    folder = str(folder)
    with _quiet_itk():  # ITK warns "No Series were found"; the caller says it better
        return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
                for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}


def read_series(folder: str | Path, *, series_uid: str | None = None) -> "SimpleITK.Image":
    """Read one DICOM series from ``folder`` (not its subfolders) as a SimpleITK image (LPS).

    Raises:
        InputError: no series, several series and no ``series_uid`` (the message lists each UID
            with its file count and description), an unknown ``series_uid``, unreadable files,
            mixed orientations, uneven slice spacing (a missing slice) or a tilted stack.
    """
    sitk = _sitk()
    folder = Path(folder)
    series = list_series(folder)
    if not series:
        raise InputError(folder, "holds no DICOM series (subfolders are not searched)",
                         "Pass the folder that directly holds the series' files.")
    if series_uid is None and len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series: {_describe_series(series)}",
                         "Choose one with series_uid=UID (--series-uid UID on the command line).")
    if series_uid is not None and series_uid not in series:
        raise InputError(folder, f"holds no DICOM series {series_uid}; it holds {_describe_series(series)}",
                         "Pick one of these series_uid values.")
    uid = series_uid or next(iter(series))
    files = series[uid]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _quiet_itk():  # ITK only warns on uneven slices; _check_stack refuses them
            image = reader.Execute()
    except RuntimeError as err:
        from .volume_io import _itk_reason

        raise InputError(folder, f"DICOM series {uid} cannot be read: {_itk_reason(err)}",
                         "The files may be damaged or compressed in a way GDCM cannot decode.") from None
    if len(files) > 1 and image.GetDimension() == 3:
        spacing = _check_stack(reader, len(files), folder, uid)
        image.SetSpacing(image.GetSpacing()[:2] + (spacing,))
    log.debug("read DICOM series %s: %d files from %s", uid, len(files), folder)
    return image


def _describe_series(series: dict[str, list[str]]) -> str:
    sitk = _sitk()
    parts = []
    for uid, files in series.items():
        description = ""
        try:
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            if reader.HasMetaDataKey("0008|103e"):
                description = reader.GetMetaData("0008|103e").strip()
        except RuntimeError:
            pass
        label = f", {description!r}" if description else ""
        parts.append(f"{uid} ({len(files)} files{label})")
    return "; ".join(parts)


def _check_stack(reader: "SimpleITK.ImageSeriesReader", n: int, folder: Path, uid: str) -> float:
    """Check orientation, even spacing and no tilt across the sorted files; return the slice gap."""
    def numbers(i: int, tag: str, count: int) -> np.ndarray | None:
        if not reader.HasMetaDataKey(i, tag):
            return None
        try:
            values = np.array([float(v) for v in reader.GetMetaData(i, tag).split("\\")])
        except ValueError:
            return None
        return values if values.size == count else None

    positions, orientations = [], []
    for i in range(n):
        pos, iop = numbers(i, "0020|0032", 3), numbers(i, "0020|0037", 6)
        if pos is None or iop is None:
            raise InputError(folder, f"DICOM series {uid}: a file lacks ImagePositionPatient or "
                             "ImageOrientationPatient, so its geometry is unknown",
                             "Export the series with its geometry, or as NIfTI/NRRD.")
        positions.append(pos)
        orientations.append(iop)
    positions_a, iops = np.array(positions), np.array(orientations)
    if np.abs(iops - iops[0]).max() > _ORIENTATION_TOL:
        raise InputError(folder, f"DICOM series {uid} mixes slice orientations",
                         "It holds several stacks; split them into separate series.")
    normal = np.cross(iops[0, :3], iops[0, 3:])
    normal /= np.linalg.norm(normal)
    depth = positions_a @ normal
    gaps = np.diff(depth)
    step = (depth[-1] - depth[0]) / (n - 1)
    if abs(step) < 1e-6 or np.abs(gaps - step).max() > 1e-3 + 0.01 * abs(step):
        raise InputError(
            folder,
            f"DICOM series {uid} has uneven slice gaps ({gaps.min():.4g} to {gaps.max():.4g} mm)",
            "A slice is missing or repeated; export the complete series.",
        )
    lateral = positions_a - positions_a[0] - np.outer(depth - depth[0], normal)
    if np.linalg.norm(lateral, axis=1).max() > 1e-3 + 0.01 * abs(depth[-1] - depth[0]):
        raise InputError(folder, f"DICOM series {uid} is tilted (gantry tilt): slices are not stacked "
                         "along their normal", "Resample it onto a regular grid (e.g. in Slicer) first.")
    return float(abs(step))


# -- writing -----------------------------------------------------------------------------------
def write_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str = "CT",
    series_description: str = "SSS volume",
    patient_name: str = "Anonymous",
    patient_id: str = "SSS",
    series_number: int = 1,
    study_uid: str | None = None,
) -> list[Path]:
    """Write ``volume`` into the new or empty ``folder`` as one series; return the files by ``k``.

    Raises:
        InputError: modality other than CT/MR, empty or non-finite voxels, a non-orthonormal
            direction, a non-empty folder, or a write failure (files written so far are removed).
    """
    sitk = _sitk()
    folder = Path(folder)
    modality = modality.upper()
    if modality not in SOP_CLASS:
        raise InputError(None, f"DICOM modality must be CT or MR, got {modality!r}")
    where = volume.source or folder
    if volume.voxels.size == 0:
        raise InputError(where, "volume is empty; nothing to write as DICOM")
    if volume.voxels.dtype.kind == "f" and not np.isfinite(volume.voxels).all():
        raise InputError(where, "holds NaN or infinite voxels, which DICOM cannot store",
                         "Replace them with finite values first.")
    _check_direction(volume, where)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(folder, "is not an empty folder", "Write a DICOM series into a new or empty folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(folder, f"cannot be created ({err.strerror or err})", "Choose a writable location.") from None

    pixels, slope, intercept, signed = _storage(volume.voxels)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing([float(x) for x in volume.spacing])
    image.SetOrigin([float(x) for x in volume.origin])
    image.SetDirection([float(x) for x in volume.direction.ravel()])

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid = study_uid or new_uid()
    series_uid, frame_uid = new_uid(), new_uid()
    d = volume.direction
    normal = np.cross(d[:, 0], d[:, 1])
    common = {
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|0016": SOP_CLASS[modality],
        "0008|0020": date, "0008|0021": date, "0008|0023": date,
        "0008|0030": time, "0008|0031": time, "0008|0033": time,
        "0008|0060": modality,
        "0008|103e": series_description[:64],
        "0010|0010": patient_name,
        "0010|0020": patient_id,
        "0020|000d": study_uid,
        "0020|000e": series_uid,
        "0020|0011": str(int(series_number)),
        "0020|0052": frame_uid,
        "0020|0037": "\\".join(ds(x) for x in np.r_[d[:, 0], d[:, 1]]),
        "0028|0030": f"{ds(volume.spacing[1])}\\{ds(volume.spacing[0])}",  # row gap (j), column gap (i)
        "0018|0050": ds(volume.spacing[2]),
        "0018|0088": ds(volume.spacing[2]),
        "0028|1052": ds(intercept),
        "0028|1053": ds(slope),
    }
    if modality == "CT":
        common["0028|1054"] = "HU"
    if pixels.dtype.kind == "f":  # GDCM quantises float input to this stored type with the rescale
        common.update({"0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1" if signed else "0"})

    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    written: list[Path] = []
    try:
        for k in range(pixels.shape[0]):
            slice_image = image[:, :, k : k + 1]
            position = np.asarray(slice_image.GetOrigin())
            for tag, value in common.items():
                slice_image.SetMetaData(tag, value)
            slice_image.SetMetaData("0008|0018", new_uid())
            slice_image.SetMetaData("0020|0013", str(k + 1))
            slice_image.SetMetaData("0020|0032", "\\".join(ds(x) for x in position))
            slice_image.SetMetaData("0020|1041", ds(float(position @ normal)))
            path = folder / f"IM{k + 1:05d}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(slice_image)
            written.append(path)
    except RuntimeError as err:
        for path in written:
            path.unlink(missing_ok=True)
        from .volume_io import _itk_reason

        raise InputError(folder, f"cannot write the DICOM series: {_itk_reason(err)}",
                         "Check that the folder is writable and the disk has room.") from None
    log.debug("wrote DICOM series %s: %d files to %s", series_uid, len(written), folder)
    return written


def _check_direction(volume: Volume, where: object) -> None:
    d = volume.direction
    if np.abs(d.T @ d - np.eye(3)).max() > 1e-6:
        raise InputError(where, "direction matrix is not orthonormal; DICOM cannot store it",
                         "Resample the volume onto an orthonormal grid first.")


def _storage(voxels: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """Pixels for GDCM, the rescale ``value = stored * slope + intercept``, and whether stored is signed.

    int16 input is stored as is. float64 input is quantised by GDCM with the given rescale into
    16-bit stored values: unsigned (exact) for whole numbers spanning at most 65536 values, signed
    int16 otherwise. (GDCM cannot read back int16 stored values whose rescale leaves int16's
    range with slope 1, hence unsigned storage for wide integers.)
    """
    values = voxels.astype(np.uint8) if voxels.dtype == bool else voxels
    lo, hi = float(values.min()), float(values.max())
    whole = values.dtype.kind in "iu" or bool(np.all(values == np.round(values)))
    if whole and _INT16[0] <= lo and hi <= _INT16[1]:
        return values.astype(np.int16), 1.0, 0.0, True
    if whole and hi - lo <= 65535:
        intercept = 0.0 if 0 <= lo and hi <= 65535 else lo
        return values.astype(np.float64), 1.0, intercept, False
    slope = float(ds((hi - lo) / _QUANT_STEPS)) if hi > lo else 1.0
    intercept = float(ds((hi + lo) / 2))
    log.info("DICOM: storing values %g..%g as int16 with slope %g (quantised)", lo, hi, slope)
    return values.astype(np.float64), slope, intercept, True


# -- helpers -----------------------------------------------------------------------------------
def ds(value: float) -> str:
    """``value`` as a DICOM decimal string: the most digits that fit its 16 characters."""
    value = float(value)
    if value == 0:
        return "0"
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value!r} has no 16-character decimal form")


def new_uid() -> str:
    """A new DICOM UID of the UUID form ``2.25.<128-bit decimal>`` (at most 44 characters)."""
    return f"2.25.{uuid.uuid4().int}"


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's stderr warnings for a moment (they are global), restoring the previous state."""
    sitk = _sitk()
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _sitk():  # noqa: ANN202 - imported on first use to keep ``import sss_lib`` light
    import SimpleITK

    return SimpleITK
