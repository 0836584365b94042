"""Volume file I/O on the real samples in Testing/Data: geometry, round trips, and every refusal."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sss_lib.dicom_io import SOP_CLASS, ds, list_series
from sss_lib.errors import InputError
from sss_lib.volume import Volume
from sss_lib.volume_io import read_label, read_volume, write_dicom_series, write_volume

REAL_VOLUMES = ["lung1_crop_image.nrrd", "brain1_image.nrrd", "ch2_crop.nii.gz", "aal_crop.nii.gz"]
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# -- helpers -----------------------------------------------------------------------------------
def assert_same_volume(a: Volume, b: Volume, tol: float = 1e-5) -> None:
    assert a.voxels.shape == b.voxels.shape
    np.testing.assert_allclose(b.spacing, a.spacing, rtol=0, atol=tol)
    np.testing.assert_allclose(b.origin, a.origin, rtol=0, atol=tol)
    np.testing.assert_allclose(b.direction, a.direction, rtol=0, atol=tol)
    np.testing.assert_array_equal(b.voxels, a.voxels)


def nifti_sform(path: Path) -> tuple[int, np.ndarray]:
    """``(sform_code, 4x4 RAS affine)`` parsed from the header bytes, without ITK."""
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        header = f.read(348)
    assert struct.unpack("<i", header[:4])[0] == 348
    affine = np.eye(4)
    affine[:3] = np.array(struct.unpack("<12f", header[280:328])).reshape(3, 4)
    return struct.unpack("<h", header[254:256])[0], affine


def write_nifti_by_hand(path: Path, voxels: np.ndarray, ras_affine: np.ndarray, dim: tuple | None = None) -> None:
    """A minimal NIfTI-1 (.nii) with only an sform, written without ITK: ``voxels`` is ``[k, j, i]``."""
    codes = {np.dtype(np.int16): (4, 16), np.dtype(np.float32): (16, 32), np.dtype(np.uint8): (2, 8)}
    datatype, bitpix = codes[voxels.dtype]
    shape = dim or tuple(reversed(voxels.shape))
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    spacing = np.linalg.norm(ras_affine[:3, :3], axis=0)
    struct.pack_into("<8f", header, 76, 1.0, *spacing, *([1.0] * 4))
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<B", header, 123, 2)  # mm
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    struct.pack_into("<12f", header, 280, *ras_affine[:3].ravel())
    header[344:348] = b"n+1\0"
    path.write_bytes(bytes(header) + b"\0" * 4 + np.ascontiguousarray(voxels).tobytes())


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def dicom_tags(path: Path) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}


def numbers(text: str) -> np.ndarray:
    return np.array([float(x) for x in text.split("\\")])


def expect_error(path_in_message: object, *fragments: str):
    """Context: the block raises a one-line InputError naming ``path_in_message`` and each fragment."""
    class Check:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind, error, tb) -> bool:
            assert kind is InputError, f"expected InputError, got {kind}: {error}"
            text = str(error)
            assert str(path_in_message) in text, text
            for fragment in fragments:
                assert fragment in text, f"{fragment!r} not in {text!r}"
            assert "\n" not in text and "Exception thrown" not in text, text
            assert not re.search(r"0x[0-9a-fA-F]{6,}|\.(cxx|hxx|h):\d+", text), text  # no ITK addresses or sources
            return True

    return Check()


@pytest.fixture(scope="module")
def volumes(data_dir: Path) -> dict[str, Volume]:
    return {name: read_volume(data_dir / name) for name in REAL_VOLUMES}


# -- geometry of the real files ----------------------------------------------------------------
def test_real_files_read_with_their_geometry(volumes: dict[str, Volume]) -> None:
    lung = volumes["lung1_crop_image.nrrd"]
    assert lung.shape_ijk == (192, 192, 48) and lung.voxels.dtype == np.int16
    np.testing.assert_allclose(lung.spacing, [0.5703125, 0.5703125, 5.0])
    np.testing.assert_allclose(lung.origin, [-76.421875, -174.4375, -777.5])
    brain = volumes["brain1_image.nrrd"]
    np.testing.assert_array_equal(brain.direction, np.diag([1.0, -1.0, 1.0]))  # the flipped y
    np.testing.assert_allclose(brain.origin, [-99.609375, 99.609375, -78.0])
    assert volumes["ch2_crop.nii.gz"].shape_ijk == (96, 96, 64)


def test_nifti_is_converted_from_ras_to_lps(data_file) -> None:
    """The file stores RAS (sform); the Volume must hold diag(-1, -1, 1) times it."""
    path = data_file("ch2_crop.nii.gz")
    code, ras = nifti_sform(path)
    assert code == 4  # the original MRIcron header kept: sform only (MNI), qform_code 0
    volume = read_volume(path)
    np.testing.assert_allclose(volume.ijk_to_lps, LPS_FROM_RAS @ ras, atol=1e-6)
    np.testing.assert_allclose(volume.origin, [48.0, 65.0, -21.0])  # ch2 index [42, 60, 50]
    np.testing.assert_array_equal(volume.direction, np.diag([-1.0, -1.0, 1.0]))


def test_hand_written_nifti_of_an_nrrd_lands_on_the_same_points(volumes: dict[str, Volume], tmp_path: Path) -> None:
    """A NIfTI made without ITK from brain1's NRRD geometry (LPS -> RAS by hand) reads back equal."""
    brain = volumes["brain1_image.nrrd"]
    path = tmp_path / "brain1_by_hand.nii"
    write_nifti_by_hand(path, brain.voxels, LPS_FROM_RAS @ brain.ijk_to_lps)
    copy = read_volume(path)
    assert_same_volume(brain, copy, tol=1e-5)


@pytest.mark.parametrize("name", REAL_VOLUMES)
def test_voxel_physical_transforms_match_simpleitk(name: str, volumes: dict[str, Volume], data_dir: Path) -> None:
    volume = volumes[name]
    image = sitk.ReadImage(str(data_dir / name))
    rng = np.random.default_rng(7)
    size = np.array(volume.shape_ijk)
    for ijk in rng.integers(0, size, (20, 3)).tolist() + [[0, 0, 0], (size - 1).tolist()]:
        expected = image.TransformIndexToPhysicalPoint([int(x) for x in ijk])
        np.testing.assert_allclose(volume.voxel_to_physical(ijk), expected, atol=1e-9)
    for ijk in rng.uniform(-0.5, size - 0.5, (20, 3)):
        expected = image.TransformContinuousIndexToPhysicalPoint(ijk.tolist())
        lps = volume.voxel_to_physical(ijk)
        np.testing.assert_allclose(lps, expected, atol=1e-9)
        back = image.TransformPhysicalPointToContinuousIndex(lps.tolist())
        np.testing.assert_allclose(volume.physical_to_voxel(lps), back, atol=1e-9)
        np.testing.assert_allclose(volume.physical_to_voxel(lps), ijk, atol=1e-9)


@pytest.mark.parametrize(("name", "other"), [("brain1_image.nrrd", ".nii.gz"), ("ch2_crop.nii.gz", ".nrrd")])
def test_nrrd_and_nifti_copies_put_each_voxel_at_the_same_point(name: str, other: str, volumes, tmp_path) -> None:
    original = volumes[name]
    copy = read_volume(write_volume(original, tmp_path / f"copy{other}"))
    size = np.array(original.shape_ijk)
    ijk = np.vstack([np.random.default_rng(3).integers(0, size, (50, 3)), [0, 0, 0], size - 1])
    np.testing.assert_allclose(copy.voxel_to_physical(ijk), original.voxel_to_physical(ijk), atol=1e-5)
    at = tuple(ijk[:, ::-1].T)  # [k, j, i] indexing
    np.testing.assert_array_equal(copy.voxels[at], original.voxels[at])


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii"])
@pytest.mark.parametrize("name", REAL_VOLUMES)
def test_round_trip_changes_nothing(name: str, suffix: str, volumes, tmp_path: Path) -> None:
    original = volumes[name]
    written = write_volume(original, tmp_path / f"v{suffix}")
    back = read_volume(written)
    assert back.voxels.dtype == original.voxels.dtype
    assert_same_volume(original, back, tol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"v{suffix}"]  # no temporary left behind


def test_nhdr_and_uncompressed_nrrd_round_trip(volumes, tmp_path: Path) -> None:
    original = volumes["lung1_crop_image.nrrd"]
    assert_same_volume(original, read_volume(write_volume(original, tmp_path / "v.nhdr")))
    raw = write_volume(original, tmp_path / "raw.nrrd", compress=False)
    assert b"encoding: raw" in raw.read_bytes()[:1000]
    assert_same_volume(original, read_volume(raw))


@pytest.mark.parametrize(("name", "modality"), [("lung1_crop_image.nrrd", "CT"), ("ch2_crop.nii.gz", "MR")])
def test_dicom_round_trip(name: str, modality: str, volumes, tmp_path: Path) -> None:
    original = volumes[name]
    files = write_dicom_series(original, tmp_path / "dcm", modality=modality, series_description="round trip")
    assert len(files) == original.shape_ijk[2]
    back = read_volume(tmp_path / "dcm")
    # DICOM's 16-character decimal strings keep these geometries far inside 1e-4 mm.
    assert_same_volume(original, back, tol=1e-6)

    tags = [dicom_tags(f) for f in files]
    assert {t["0008|0060"] for t in tags} == {modality}
    assert {t["0008|0016"] for t in tags} == {SOP_CLASS[modality]}  # plain CT/MR Image Storage
    assert len({t["0020|000e"] for t in tags}) == 1 and len({t["0020|000d"] for t in tags}) == 1
    assert len({t["0008|0018"] for t in tags}) == len(files)  # unique SOPInstanceUIDs
    assert {t["0008|103e"] for t in tags} == {"round trip"}
    for k in (0, len(files) - 1):
        np.testing.assert_allclose(numbers(tags[k]["0020|0032"]), original.voxel_to_physical([0, 0, k]), atol=1e-9)
        np.testing.assert_allclose(numbers(tags[k]["0020|0037"]), original.direction[:, :2].T.ravel(), atol=1e-12)
        np.testing.assert_allclose(numbers(tags[k]["0028|0030"]), original.spacing[[1, 0]], atol=1e-12)
        assert float(tags[k]["0018|0050"]) == pytest.approx(original.spacing[2])
        assert float(tags[k]["0028|1053"]) == 1.0 and float(tags[k]["0028|1052"]) == 0.0


def test_dicom_left_handed_volume_reads_back_as_the_same_physical_volume(volumes, tmp_path: Path) -> None:
    """brain1 (det(direction) = -1) cannot be a DICOM stack as is: k comes back reversed, same points."""
    brain = volumes["brain1_image.nrrd"]
    write_dicom_series(brain, tmp_path / "dcm", modality="MR")
    back = read_volume(tmp_path / "dcm")
    n = brain.shape_ijk[2]
    np.testing.assert_array_equal(back.voxels, brain.voxels[::-1])
    ijk = np.random.default_rng(5).integers(0, brain.shape_ijk, (30, 3))
    flipped = ijk * [1, 1, -1] + [0, 0, n - 1]
    np.testing.assert_allclose(back.voxel_to_physical(flipped), brain.voxel_to_physical(ijk), atol=1e-6)
    np.testing.assert_allclose(back.spacing, brain.spacing, atol=1e-9)
    assert np.linalg.det(back.direction) == pytest.approx(1.0)


@pytest.mark.parametrize("target", ["v.nrrd", "v.nii.gz", "v.nii", "dicom"])
def test_oblique_volume_round_trip(target: str, volumes, tmp_path: Path) -> None:
    """ch2 turned 20 degrees about x and 20 about z (an oblique, right-handed grid)."""
    ch2 = volumes["ch2_crop.nii.gz"]
    oblique = Volume(ch2.voxels, ch2.spacing * [1.0, 1.1, 1.3], ch2.origin + [0.3, -2.7, 11.1],
                     rotation(0, 20) @ rotation(2, 20) @ ch2.direction, "oblique")
    assert np.abs(oblique.direction - np.diag(np.diag(oblique.direction))).max() > 0.3
    if target == "dicom":
        write_dicom_series(oblique, tmp_path / target, modality="MR")
    else:
        write_volume(oblique, tmp_path / target)
    back = read_volume(tmp_path / target)
    assert_same_volume(oblique, back, tol=1e-5)  # NIfTI keeps float32: about 1e-7 here
    corner = [95, 95, 63]
    np.testing.assert_allclose(back.voxel_to_physical(corner), oblique.voxel_to_physical(corner), atol=1e-5)


def test_dicom_stores_floats_with_a_rescale_within_half_a_step(volumes, tmp_path: Path) -> None:
    ch2 = volumes["ch2_crop.nii.gz"]
    values = ch2.voxels.astype(np.float32) * 0.731 - 12.25
    files = write_dicom_series(ch2.with_voxels(values), tmp_path / "dcm", modality="MR")
    tags = dicom_tags(files[0])
    slope = float(tags["0028|1053"])
    assert 0 < slope < 0.01 and tags["0008|0016"] == SOP_CLASS["MR"]
    back = read_volume(tmp_path / "dcm")
    assert np.abs(back.voxels - values).max() <= slope / 2 + 1e-6


def test_dicom_wide_integers_come_back_exact(volumes, tmp_path: Path) -> None:
    lung = volumes["lung1_crop_image.nrrd"]
    wide = (lung.voxels.astype(np.int32) + 1024) * 16  # uint16-like MR range, beyond int16
    assert wide.max() > 32767 and wide.max() - wide.min() <= 65535
    files = write_dicom_series(lung.with_voxels(wide.astype(np.uint16)), tmp_path / "dcm", modality="MR")
    np.testing.assert_array_equal(read_volume(tmp_path / "dcm").voxels, wide)
    assert dicom_tags(files[0])["0008|0016"] == SOP_CLASS["MR"]
    shifted = wide - 30000  # signed, wider than int16, still 65536 values at most: slope 1 and an intercept
    files = write_dicom_series(lung.with_voxels(shifted), tmp_path / "dcm2", modality="CT")
    np.testing.assert_array_equal(read_volume(tmp_path / "dcm2").voxels, shifted)
    assert float(dicom_tags(files[0])["0028|1052"]) == shifted.min()


# -- labels ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("label", "image"), [("brain1_label.nrrd", "brain1_image.nrrd"),
                                              ("lung1_crop_label.nrrd", "lung1_crop_image.nrrd"),
                                              ("aal_crop.nii.gz", "ch2_crop.nii.gz")])
def test_real_labels_read_on_their_image_grid(label: str, image: str, volumes, data_dir: Path) -> None:
    labels = read_label(data_dir / label, reference=volumes[image])
    assert labels.voxels.dtype.kind in "iu"
    assert labels.same_grid(volumes[image]) and labels.voxels.max() >= 1


def test_label_written_as_integers(volumes, tmp_path: Path) -> None:
    brain = volumes["brain1_image.nrrd"]
    mask = brain.voxels > np.percentile(brain.voxels, 90)
    for suffix in (".nrrd", ".nii.gz"):
        back = read_label(write_volume(brain.with_voxels(mask), tmp_path / f"m{suffix}"), reference=brain)
        assert back.voxels.dtype == np.uint8
        np.testing.assert_array_equal(back.voxels, mask)


def test_float_label_of_whole_numbers_becomes_integer(volumes, tmp_path: Path) -> None:
    ch2 = volumes["ch2_crop.nii.gz"]
    whole = (ch2.voxels // 50).astype(np.float32)
    path = write_volume(ch2.with_voxels(whole), tmp_path / "float_label.nii.gz")
    labels = read_label(path)
    assert labels.voxels.dtype == np.uint8
    np.testing.assert_array_equal(labels.voxels, whole)


# -- refusals: every one names the file and the problem ---------------------------------------
def test_missing_file_and_folder(tmp_path: Path) -> None:
    with expect_error(tmp_path / "nope.nii.gz", "not found (no such file or folder)"):
        read_volume(tmp_path / "nope.nii.gz")
    with expect_error(tmp_path / "no_such_series", "not found"):
        read_volume(tmp_path / "no_such_series")


def test_unsupported_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "scan.mha"
    path.write_bytes(b"ObjectType = Image\n")
    with expect_error(path, "unsupported file type (.mha)", ".nii.gz", ".nrrd", "DICOM"):
        read_volume(path)
    with expect_error(tmp_path / "out.png", "cannot write", ".nii.gz", ".nrrd"):
        write_volume(Volume(np.zeros((2, 2, 2)), [1, 1, 1], [0, 0, 0], np.eye(3)), tmp_path / "out.png")


def test_single_dicom_file_asks_for_its_folder(volumes, tmp_path: Path) -> None:
    files = write_dicom_series(volumes["lung1_crop_image.nrrd"], tmp_path / "dcm")
    with expect_error(files[3], "single DICOM file", "folder"):
        read_volume(files[3])


@pytest.mark.parametrize("name", ["ch2_crop.nii.gz", "brain1_image.nrrd"])
def test_truncated_files(name: str, data_file, tmp_path: Path) -> None:
    data = data_file(name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with expect_error(cut, "truncated"):
        read_volume(cut)


def test_truncated_uncompressed_nifti(data_file, tmp_path: Path) -> None:
    data = gzip.decompress(data_file("ch2_crop.nii.gz").read_bytes())
    cut = tmp_path / "ch2.nii"
    cut.write_bytes(data[: len(data) - 1000])
    with expect_error(cut, "truncated", f"holds {len(data) - 1000} bytes", f"needs {len(data)}"):
        read_volume(cut)


def test_garbage_files(data_file, tmp_path: Path) -> None:
    header = data_file("brain1_image.nrrd").read_bytes().split(b"\n\n")[0]
    noise = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    garbage_data = tmp_path / "garbage_data.nrrd"
    garbage_data.write_bytes(header + b"\n\n" + noise)
    with expect_error(garbage_data, "cannot be read as NRRD", "damaged"):
        read_volume(garbage_data)
    garbage_header = tmp_path / "garbage_header.nrrd"
    garbage_header.write_bytes(b"NRRD0004\nthis is not a field\n" + noise)
    with expect_error(garbage_header, "cannot be read as NRRD"):
        read_volume(garbage_header)
    not_nifti = tmp_path / "noise.nii.gz"
    not_nifti.write_bytes(gzip.compress(noise))
    with expect_error(not_nifti, "not a NIfTI-1 file"):
        read_volume(not_nifti)
    not_gzip = tmp_path / "noise2.nii.gz"
    not_gzip.write_bytes(b"\x1f\x8b" + noise)
    with expect_error(not_gzip, "damaged or truncated gzip"):
        read_volume(not_gzip)


def test_nifti2_is_refused_with_a_way_out(tmp_path: Path) -> None:
    path = tmp_path / "v2.nii"
    path.write_bytes(struct.pack("<i", 540) + b"n+2\0\r\n\x1a\n" + b"\0" * 600)
    with expect_error(path, "NIfTI-2", "NIfTI-1"):
        read_volume(path)


def test_2d_images(tmp_path: Path) -> None:
    image = sitk.GetImageFromArray(np.arange(20, dtype=np.int16).reshape(4, 5))
    for suffix in (".nii.gz", ".nrrd"):
        path = tmp_path / f"flat{suffix}"
        sitk.WriteImage(image, str(path))
        with expect_error(path, "2D image (5x4)", "3D volume"):
            read_volume(path)


def test_4d_nifti_needs_a_frame(tmp_path: Path) -> None:
    frames = np.arange(3 * 4 * 5 * 6, dtype=np.float32).reshape(3, 4, 5, 6)  # [t, k, j, i]
    image = sitk.GetImageFromArray(frames, isVector=False)
    image.SetSpacing((0.5, 0.6, 0.7, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0, 0.0))
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(image, str(path))
    with expect_error(path, "holds 3 frames", "frame=N", "--frame N", "0 to 2"):
        read_volume(path)
    volume = read_volume(path, frame=2)
    np.testing.assert_array_equal(volume.voxels, frames[2])
    np.testing.assert_allclose(volume.spacing, [0.5, 0.6, 0.7])
    np.testing.assert_allclose(volume.origin, [1.0, 2.0, 3.0], atol=1e-6)
    for bad in (3, -1):
        with expect_error(path, f"frame {bad} is out of range", "3 frames"):
            read_volume(path, frame=bad)


def test_nrrd_list_axis_is_frames_too(volumes, tmp_path: Path) -> None:
    lung = volumes["lung1_crop_image.nrrd"]
    stack = np.stack([lung.voxels, -lung.voxels], axis=-1)  # [k, j, i, frame]
    image = sitk.GetImageFromArray(stack, isVector=True)
    image.SetSpacing(lung.spacing.tolist())
    image.SetOrigin(lung.origin.tolist())
    path = tmp_path / "two_frames.nrrd"
    sitk.WriteImage(image, str(path))
    with expect_error(path, "holds 2 frames", "frame=N"):
        read_volume(path)
    back = read_volume(path, frame=1)
    np.testing.assert_array_equal(back.voxels, -lung.voxels)
    assert back.same_grid(lung)


def test_frame_on_a_3d_volume(data_file) -> None:
    path = data_file("brain1_image.nrrd")
    assert read_volume(path, frame=0).shape_ijk == (256, 256, 25)
    with expect_error(path, "frame 1 is out of range", "1 frame"):
        read_volume(path, frame=1)


def test_5d_image(tmp_path: Path) -> None:
    path = tmp_path / "five.nii"
    write_nifti_by_hand(path, np.zeros((2, 2, 3, 4, 5), np.float32), np.eye(4), dim=(5, 4, 3, 2, 2))
    with expect_error(path, "5 dimensions"):
        read_volume(path)


def test_empty_volumes(data_file, tmp_path: Path) -> None:
    nifti = tmp_path / "empty.nii"
    write_nifti_by_hand(nifti, np.zeros((0, 5, 4), np.int16), np.eye(4))
    with expect_error(nifti, "is empty", "4x5x0", "zero-size"):
        read_volume(nifti)
    header = data_file("brain1_image.nrrd").read_bytes().split(b"\n\n")[0]
    nrrd = tmp_path / "empty.nrrd"
    nrrd.write_bytes(header.replace(b"sizes: 256 256 25", b"sizes: 256 0 25") + b"\n\n")
    with expect_error(nrrd, "is empty", "256x0x25"):
        read_volume(nrrd)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_and_inf_voxels_are_counted(suffix: str, volumes, tmp_path: Path) -> None:
    """ITK's NIfTI reader turns NaN/inf into 0 silently; both formats must refuse them instead."""
    values = volumes["ch2_crop.nii.gz"].voxels.astype(np.float32)
    values[0, 0, :3] = np.nan
    values[5, 5, :2] = np.inf
    values[6, 6, 6] = -np.inf
    path = write_volume(volumes["ch2_crop.nii.gz"].with_voxels(values), tmp_path / f"holes{suffix}")
    with expect_error(path, f"3 NaN and 3 infinite voxels (of {values.size})"):
        read_volume(path)


def test_nan_in_another_frame_does_not_matter(tmp_path: Path) -> None:
    frames = np.ones((2, 3, 4, 5), np.float32)  # [t, k, j, i]
    frames[0, 1, 1, 1] = np.nan
    path = tmp_path / "frames.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(frames, isVector=False), str(path))
    np.testing.assert_array_equal(read_volume(path, frame=1).voxels, frames[1])
    with expect_error(path, "1 NaN and 0 infinite voxels (of 60)"):
        read_volume(path, frame=0)


def test_label_with_fractions_is_refused(volumes, tmp_path: Path) -> None:
    ch2 = volumes["ch2_crop.nii.gz"]
    probabilities = ch2.voxels.astype(np.float32) / 255.0
    fractional = int((probabilities != np.round(probabilities)).sum())
    path = write_volume(ch2.with_voxels(probabilities), tmp_path / "prob.nrrd")
    with expect_error(path, "not a label map", f"{fractional} voxels hold non-integer values"):
        read_label(path)


def test_label_on_another_grid_is_refused(volumes, data_file, tmp_path: Path) -> None:
    brain, aal = volumes["brain1_image.nrrd"], data_file("aal_crop.nii.gz")
    with expect_error(aal, "label map grid differs from the image's (size)", "size 96x96x64", "size 256x256x25",
                      "brain1_image.nrrd"):
        read_label(aal, reference=brain)
    label = read_label(data_file("brain1_label.nrrd"))
    shifted = Volume(label.voxels, label.spacing, label.origin + [0.0, 0.0, 0.01], label.direction)
    path = write_volume(shifted, tmp_path / "shifted.nrrd")
    with expect_error(path, "label map grid differs", "(origin by up to 0.01 mm)", "-77.99) mm", "-78) mm"):
        read_label(path, reference=brain)


def test_unreadable_itk_errors_are_one_line(tmp_path: Path) -> None:
    """A valid-looking NRRD that ITK refuses (a 'time' axis in LPS space): its error becomes one line."""
    path = tmp_path / "time.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 4\nspace: left-posterior-superior\nsizes: 4 4 2 2\n"
                     b"space directions: (1,0,0) (0,1,0) (0,0,1) none\nkinds: domain domain domain time\n"
                     b"endian: little\nencoding: raw\nspace origin: (0,0,0)\n\n" + b"\0" * 128)
    with expect_error(path, "cannot be read as NRRD", "domain axes"):
        read_volume(path)


def test_write_failure_names_the_file(volumes, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with expect_error(blocker / "v.nrrd", "cannot be written"):
        write_volume(volumes["brain1_image.nrrd"], blocker / "v.nrrd")


# -- DICOM folders -----------------------------------------------------------------------------
def test_dicom_folder_with_two_series_lists_them(volumes, tmp_path: Path) -> None:
    lung = volumes["lung1_crop_image.nrrd"]
    first = write_dicom_series(lung, tmp_path / "a", series_description="first")
    flipped = lung.with_voxels(lung.voxels[:, ::-1].copy())
    second = write_dicom_series(flipped, tmp_path / "b", series_description="second")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in first + second[:10]:
        shutil.copy(f, mixed / f"{f.parent.name}_{f.name}")
    series = list_series(mixed)
    assert sorted(len(files) for files in series.values()) == [10, 48]
    uids = sorted(series, key=lambda uid: len(series[uid]))
    with expect_error(mixed, "holds 2 DICOM series", f"{uids[0]} (10 files, 'second')",
                      f"{uids[1]} (48 files, 'first')", "series_uid"):
        read_volume(mixed)
    assert_same_volume(lung, read_volume(mixed, series_uid=uids[1]), tol=1e-6)
    with expect_error(mixed, "no DICOM series 1.2.3", uids[0], uids[1]):
        read_volume(mixed, series_uid="1.2.3")


def test_dicom_folder_refusals(volumes, tmp_path: Path) -> None:
    lung = volumes["lung1_crop_image.nrrd"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with expect_error(empty, "holds no DICOM series"):
        read_volume(empty)
    files = write_dicom_series(lung, tmp_path / "gap")
    files[20].unlink()
    with expect_error(tmp_path / "gap", "uneven slice gaps (5 to 10 mm)", "missing"):
        read_volume(tmp_path / "gap")
    tilted = write_dicom_series(lung, tmp_path / "tilt")
    for k, path in enumerate(tilted):  # a gantry tilt: each slice shifted along y by 1 mm more
        image = sitk.ReadImage(str(path))
        position = numbers(image.GetMetaData("0020|0032")) + [0.0, k * 1.0, 0.0]
        image.SetMetaData("0020|0032", "\\".join(ds(x) for x in position))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(path))
        writer.Execute(image)
    with expect_error(tmp_path / "tilt", "tilted"):
        read_volume(tmp_path / "tilt")


def test_dicom_writer_refusals(volumes, tmp_path: Path) -> None:
    lung = volumes["lung1_crop_image.nrrd"]
    with expect_error(tmp_path / "gap", "not an empty folder"):
        (tmp_path / "gap").mkdir()
        (tmp_path / "gap" / "x.txt").write_text("x")
        write_dicom_series(lung, tmp_path / "gap")
    with expect_error("", "modality must be CT or MR", "'US'"):
        write_dicom_series(lung, tmp_path / "us", modality="US")
    sheared = Volume(lung.voxels, lung.spacing, lung.origin, [[1, 0.2, 0], [0, 1, 0], [0, 0, 1]], "sheared.nrrd")
    with expect_error("sheared.nrrd", "not orthonormal"):
        write_dicom_series(sheared, tmp_path / "sheared")
    assert not (tmp_path / "us").exists() and not (tmp_path / "sheared").exists()


def test_decimal_strings_fit_dicom() -> None:
    for value in (-99.609374999999986, 0.5703125, 1e-17, -777.4999999999998, 123456789.123456789, 0.0):
        text = ds(value)
        assert len(text) <= 16
        assert float(text) == pytest.approx(value, rel=1e-12, abs=1e-30)
