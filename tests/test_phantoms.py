"""Synthetic cardiac phantoms: determinism, anatomy (classes, nesting, apex), geometry, datasets."""

import json

import numpy as np
import pytest
from scipy import ndimage

from sss_lib.phantoms import CLASS_COLORS, CLASS_NAMES, make_cardiac_phantom, make_phantom_dataset


def test_same_seed_same_phantom_other_seed_other_phantom():
    a_img, a_lab = make_cardiac_phantom(7, size=(48, 48), spacing=(3.0, 3.0, 8.0))
    b_img, b_lab = make_cardiac_phantom(7, size=(48, 48), spacing=(3.0, 3.0, 8.0))
    c_img, c_lab = make_cardiac_phantom(8, size=(48, 48), spacing=(3.0, 3.0, 8.0))
    np.testing.assert_array_equal(a_img.voxels, b_img.voxels)
    np.testing.assert_array_equal(a_lab.voxels, b_lab.voxels)
    assert a_img.voxels.shape != c_img.voxels.shape or not np.array_equal(a_lab.voxels, c_lab.voxels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_anatomy_classes_nesting_and_apex(seed):
    img, lab = make_cardiac_phantom(seed)
    v = lab.voxels
    assert img.voxels.dtype == np.float32 and v.dtype == np.uint8
    assert 8 <= v.shape[0] <= 16 and v.shape[1:] == (128, 128)
    assert set(np.unique(v)) == {0, 1, 2, 3}
    assert CLASS_NAMES == {1: "RV", 2: "Myo", 3: "LV"} and set(CLASS_COLORS) == {1, 2, 3}

    lv_area = (v == 3).sum(axis=(1, 2))
    heart_area = np.isin(v, (2, 3)).sum(axis=(1, 2))
    rv_area = (v == 1).sum(axis=(1, 2))
    assert np.all(heart_area > 0), "the LV (wall or cavity) is on every slice"
    # One end is the base, the other the apex: the heart is larger at the base, and the RV ends
    # before the apex while it is present at the base.
    base, apex = (0, -1) if heart_area[0] > heart_area[-1] else (-1, 0)
    assert heart_area[base] > 1.5 * heart_area[apex]
    assert rv_area[base] > 0 and rv_area[apex] == 0
    # The heart shrinks smoothly: adjacent slices differ by well under a factor 2 in area.
    ratios = heart_area[1:] / heart_area[:-1]
    assert np.all((ratios > 0.5) & (ratios < 2.0))

    for k in np.flatnonzero(lv_area):
        cavity, wall = v[k] == 3, v[k] == 2
        # The myocardium surrounds the cavity: the filled ring covers the cavity, and the cavity
        # touches no RV or background pixel.
        assert np.all(ndimage.binary_fill_holes(wall | cavity)[cavity])
        grown = ndimage.binary_dilation(cavity)
        assert not np.any(grown & np.isin(v[k], (0, 1)))
    for k in np.flatnonzero(rv_area):
        # The RV crescent lies against the myocardium (the septum), not inside the cavity.
        assert np.any(ndimage.binary_dilation(v[k] == 1) & (v[k] == 2))

    # MR-like: the blood pool is brighter than the myocardium on average.
    assert img.voxels[v == 3].mean() > 1.8 * img.voxels[v == 2].mean()
    assert np.all(np.isfinite(img.voxels)) and img.voxels.min() >= 0


def test_geometry_lps_and_oblique_direction():
    img, lab = make_cardiac_phantom(3, n_slices=10, size=(64, 40), spacing=(2.0, 2.5, 9.0))
    assert img.voxels.shape == (10, 40, 64)
    np.testing.assert_allclose(img.spacing, [2.0, 2.5, 9.0])
    np.testing.assert_allclose(img.direction, np.eye(3))
    assert img.same_grid(lab)
    assert img.default_slice_axis().axis == 2

    obl, obl_lab = make_cardiac_phantom(3, n_slices=10, size=(64, 40), spacing=(2.0, 2.5, 9.0), oblique=True)
    d = obl.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)
    assert np.isclose(np.linalg.det(d), 1.0) and not np.allclose(d, np.eye(3), atol=0.05)
    assert obl.same_grid(obl_lab)
    # The grid is centred near the LPS origin (within the random shift).
    centre = obl.voxel_to_physical(np.array(obl.shape_ijk, float) / 2 - 0.5)
    assert np.all(np.abs(centre) < 25)


def test_es_is_the_same_heart_contracted_and_tiny_grids_hold_all_classes():
    _, ed = make_cardiac_phantom(5, n_slices=9)
    _, es = make_cardiac_phantom(5, n_slices=9, phase="ES")
    assert (es.voxels == 3).sum() < 0.8 * (ed.voxels == 3).sum()
    assert (es.voxels == 2).sum() > 0.9 * (ed.voxels == 2).sum()
    _, tiny = make_cardiac_phantom(5, n_slices=4, size=(24, 24), spacing=(1.5, 1.5, 8.0))
    assert set(np.unique(tiny.voxels)) == {0, 1, 2, 3}


def test_phantom_dataset_nnunet_layout(tmp_path):
    from sss_lib.volume_io import read_label, read_volume

    root = make_phantom_dataset(tmp_path / "Dataset001_Heart", 3, seed=1, labeled=2, n_slices=4, size=(24, 24))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "RV": 1, "Myo": 2, "LV": 3}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "cineMRI"}
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["case_000_0000.nii.gz", "case_001_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert [p.name for p in (root / "imagesTs").iterdir()] == ["case_002_0000.nii.gz"]
    image = read_volume(root / "imagesTr" / "case_001_0000.nii.gz")
    label = read_label(root / "labelsTr" / "case_001.nii.gz", image)
    expected_img, expected_lab = make_cardiac_phantom(1001, n_slices=4, size=(24, 24))
    np.testing.assert_allclose(image.voxels, expected_img.voxels, rtol=1e-6)
    np.testing.assert_array_equal(label.voxels, expected_lab.voxels)
    np.testing.assert_allclose(image.origin, expected_img.origin, atol=1e-4)


def test_phantom_dataset_plain_and_acdc_layouts(tmp_path):
    plain = make_phantom_dataset(tmp_path / "plain", 2, seed=2, layout="plain", labeled=False, n_slices=3, size=(16, 16))
    assert sorted(p.name for p in (plain / "images").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert not (plain / "labels").exists()
    acdc = make_phantom_dataset(tmp_path / "acdc", 1, seed=2, layout="acdc", n_slices=3, size=(16, 16))
    names = sorted(p.name for p in (acdc / "patient001").iterdir())
    assert names == ["Info.cfg", "patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz",
                     "patient001_frame09.nii.gz", "patient001_frame09_gt.nii.gz"]
    with pytest.raises(ValueError, match="unknown layout"):
        make_phantom_dataset(tmp_path / "x", 1, seed=0, layout="zip", size=(16, 16), n_slices=3)  # type: ignore[arg-type]
