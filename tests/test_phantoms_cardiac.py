"""Hard cardiac short-axis phantoms: determinism, realistic grid, anatomy (nesting, papillary
muscles, a thin apical wall), partial volume across thick slices, orientation variety, datasets."""

import json

import numpy as np
import pytest
from scipy import ndimage

from sss_lib.phantoms import make_phantom_dataset
from sss_lib.phantoms_cardiac import CLASS_NAMES, make_hard_cardiac_case, make_hard_cardiac_phantom

SMALL = dict(size=(96, 96), fov_mm=170.0)  # the reduced, heart-centred grid (about 0.3 s a case)


def _wall_mm(labels: np.ndarray, px: float) -> np.ndarray:
    """Per slice with an LV cavity: the mean myocardial thickness in mm (radius of the filled
    ring minus radius of the cavity, from their areas); NaN elsewhere."""
    cav = (labels == 3).sum(axis=(1, 2)).astype(float)
    ring = cav + (labels == 2).sum(axis=(1, 2))
    out = (np.sqrt(ring / np.pi) - np.sqrt(cav / np.pi)) * px
    return np.where(cav > 0, out, np.nan)


def test_same_seed_same_case_other_seed_other_case():
    a, b, c = (make_hard_cardiac_case(s, **SMALL) for s in (4, 4, 5))
    np.testing.assert_array_equal(a.image.voxels, b.image.voxels)
    np.testing.assert_array_equal(a.labels.voxels, b.labels.voxels)
    assert a.labels.voxels.shape != c.labels.voxels.shape or not np.array_equal(a.labels.voxels, c.labels.voxels)


def test_default_grid_is_realistic_with_thick_slices():
    case = make_hard_cardiac_case(0)
    img, lab = case.image, case.labels
    s, ny, nx = img.voxels.shape
    assert 208 <= nx <= 256 and ny == nx and 7 <= s <= 14
    sx, sy, sz = img.spacing
    assert sx == sy and 1.15 <= sx <= 1.95 and 300 <= nx * sx <= 400
    assert 5.0 <= sz <= 10.0 and sz >= 3 * sx, "slices are thick compared with the in-plane pixels"
    assert img.same_grid(lab) and img.default_slice_axis().axis == 2
    d = img.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)
    assert np.isclose(np.linalg.det(d), 1.0) and not np.allclose(d, np.eye(3), atol=0.05)
    assert img.voxels.dtype == np.float32 and lab.voxels.dtype == np.uint8
    assert np.all(np.isfinite(img.voxels)) and img.voxels.min() >= 0


@pytest.mark.parametrize("seed", range(6))
def test_anatomy_nesting_papillary_muscles_and_thin_apex(seed):
    case = make_hard_cardiac_case(seed, **SMALL)
    v, img = case.labels.voxels, case.image.voxels
    assert set(np.unique(v)) == {0, 1, 2, 3} and CLASS_NAMES == {1: "RV", 2: "Myo", 3: "LV"}
    for k in np.flatnonzero((v == 3).any(axis=(1, 2))):
        cavity, wall = v[k] == 3, v[k] == 2
        # The myocardium encloses the cavity: the cavity touches no RV or background pixel.
        assert np.all(ndimage.binary_fill_holes(wall | cavity)[cavity])
        assert not np.any(ndimage.binary_dilation(cavity) & np.isin(v[k], (0, 1)))
    for k in np.flatnonzero((v == 1).any(axis=(1, 2))):
        assert np.any(ndimage.binary_dilation(v[k] == 1) & (v[k] == 2)), "the RV lies against the septum"

    # Papillary muscles and trabeculations: inside the LV cavity, labeled LV, myocardium-dark.
    assert case.papillary.any() and case.trabeculae.any()
    assert np.all(v[case.papillary] == 3) and np.all(v[case.trabeculae] == 3)
    pool = (v == 3) & ~case.papillary & ~case.trabeculae
    assert img[case.papillary].mean() < 0.75 * img[pool].mean()

    # The wall thins from base to apex: its thinnest slice (with a cavity) is at most 70% of its
    # thickest and under 6 mm (2-4 px on this grid), and the thin end is the apex (no RV there).
    wall = _wall_mm(v, float(case.image.spacing[0]))
    ks = np.flatnonzero(~np.isnan(wall))
    thin, thick = ks[np.argmin(wall[ks])], ks[np.argmax(wall[ks])]
    assert wall[thin] <= 0.7 * wall[thick] and wall[thin] < 6.0
    rv_area = (v == 1).sum(axis=(1, 2))
    assert rv_area[thick] > rv_area[thin]
    assert (thin < thick) == case.flipped, "slice 0 is the base unless the case is flipped"


def test_thick_slices_mix_anatomy_by_partial_volume():
    pv = make_hard_cardiac_case(2, **SMALL)
    flat = make_hard_cardiac_case(2, sub_slices=1, **SMALL)
    np.testing.assert_array_equal(pv.labels.voxels, flat.labels.voxels)  # labels: the centre plane
    diff = np.abs(pv.image.voxels - flat.image.voxels)
    mixed = pv.slab_mixed
    assert mixed.any() and (~mixed).any()
    # Where the anatomy changes across a slice's thickness the image differs far more than
    # elsewhere (there only noise differs: both draw the same noise).
    assert diff[mixed].mean() > 3 * diff[~mixed].mean()


def test_orientations_vary_between_cases():
    cases = [make_hard_cardiac_case(s, sub_slices=1, **SMALL) for s in range(12)]
    assert {c.flipped for c in cases} == {True, False} and {c.mirrored for c in cases} == {True, False}
    dirs = [c.image.direction for c in cases]
    assert all(not np.allclose(dirs[0], d, atol=0.05) for d in dirs[1:])
    angles = []
    for c in cases:
        v = c.labels.voxels
        k = int(np.argmax((v == 1).sum(axis=(1, 2))))
        rv, lv = np.argwhere(v[k] == 1).mean(axis=0), np.argwhere(np.isin(v[k], (2, 3))).mean(axis=0)
        angles.append(np.arctan2(rv[0] - lv[0], rv[1] - lv[1]))
    gaps = np.diff(np.sort(np.r_[angles, angles[np.argmin(angles)] + 2 * np.pi]))
    assert gaps.max() < np.pi, "the RV's direction from the LV covers every half of the plane"
    a = make_hard_cardiac_case(1, oblique=False, **SMALL).image
    np.testing.assert_allclose(a.direction, np.eye(3))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="size"):
        make_hard_cardiac_case(0, size=(8, 8))
    with pytest.raises(ValueError, match="n_slices"):
        make_hard_cardiac_case(0, n_slices=1, **SMALL)
    with pytest.raises(ValueError, match="sub_slices"):
        make_hard_cardiac_case(0, sub_slices=0, **SMALL)


def test_es_contracts_and_datasets_take_the_generator(tmp_path):
    _, ed = make_hard_cardiac_phantom(3, **SMALL)
    _, es = make_hard_cardiac_phantom(3, phase="ES", **SMALL)
    assert (es.voxels == 3).sum() < 0.8 * (ed.voxels == 3).sum()

    from sss_lib.volume_io import read_label, read_volume

    kw = dict(SMALL, n_slices=6)
    root = make_phantom_dataset(tmp_path / "hard", 2, seed=7, labeled=1, generator=make_hard_cardiac_phantom,
                                generator_kwargs=kw)
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1
    image = read_volume(root / "imagesTr" / "case_000_0000.nii.gz")
    label = read_label(root / "labelsTr" / "case_000.nii.gz", image)
    want_img, want_lab = make_hard_cardiac_phantom(7000, **kw)
    np.testing.assert_allclose(image.voxels, want_img.voxels, rtol=1e-6)
    np.testing.assert_array_equal(label.voxels, want_lab.voxels)
    assert (root / "imagesTs" / "case_001_0000.nii.gz").is_file()
