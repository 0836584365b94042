"""Metrics: hand-computed values, the empty-mask table, and agreement with medpy on random masks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from scipy.spatial.distance import cdist

from sss_lib import metrics
from sss_lib.metrics import MetricAccumulator, MetricSummary


def _two_cubes() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((7, 6, 6), bool)
    b = np.zeros_like(a)
    a[1:4, 1:4, 1:4] = True  # 3x3x3 cube
    b[2:5, 1:4, 1:4] = True  # the same cube one voxel further along axis 0
    return a, b


def test_two_offset_cubes_by_hand() -> None:
    # Spacing (2, 1, 1) mm: the offset axis is the 2 mm one.
    # Overlap 2x3x3 = 18 voxels; |A| = |B| = 27 -> Dice 36/54 = 2/3, Jaccard 18/36 = 1/2.
    # Surface of a 3x3x3 cube = all but its centre voxel (26 voxels).
    # d(A -> B): the 17 surface voxels of A in the overlap are on B's surface (distance 0) except
    #   (3,2,2), B's centre, whose nearest B-surface voxel (3,1,2) is 1 mm away -> 16 x 0, 1 x 1.
    #   The 9 voxels of A's bottom face (axis0 = 1) are 2 mm from B's bottom face -> 9 x 2.
    #   ASD(A, B) = (1 + 18) / 26 = 19/26. By symmetry d(B -> A) has the same values.
    # Pooled 52 values sorted: 32 x 0, 2 x 1, 18 x 2; 95th percentile at rank 0.95 * 51 = 48.45 -> 2.
    a, b = _two_cubes()
    sp = (2.0, 1.0, 1.0)
    assert metrics.dice(a, b) == pytest.approx(2 / 3)
    assert metrics.jaccard(a, b) == pytest.approx(0.5)
    assert metrics.hd95(a, b, sp) == pytest.approx(2.0)
    assert metrics.asd(a, b, sp) == pytest.approx(19 / 26)
    assert metrics.assd(a, b, sp) == pytest.approx(19 / 26)
    d_ab, d_ba = metrics.surface_distances(a, b, sp)
    assert sorted(d_ab.tolist()) == [0.0] * 16 + [1.0] + [2.0] * 9
    # With the spacing given in the wrong order the offset would measure 1 mm, not 2.
    assert metrics.hd95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(1.0)


def test_asd_is_directed_like_medpy() -> None:
    # gt = the cube plus one stray voxel 5 voxels (x 0.5 mm) beyond the cube's face:
    # every surface voxel of pred lies on gt's surface (ASD pred->gt = 0), while gt's 27 surface
    # voxels include the stray one at 2.5 mm (ASD gt->pred = 2.5/27, ASSD = 2.5/53).
    pred = np.zeros((6, 6, 10), bool)
    pred[1:4, 1:4, 1:4] = True
    gt = pred.copy()
    gt[1, 1, 8] = True
    sp = (2.0, 1.0, 0.5)
    assert metrics.asd(pred, gt, sp) == 0.0
    assert metrics.asd(gt, pred, sp) == pytest.approx(2.5 / 27)
    assert metrics.assd(pred, gt, sp) == pytest.approx(2.5 / 53)


@pytest.mark.parametrize(
    "p_empty, g_empty, expected",
    [
        (True, True, {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}),
        (True, False, {"dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan, "assd": math.nan}),
        (False, True, {"dice": 0.0, "jaccard": 0.0, "hd95": math.nan, "asd": math.nan, "assd": math.nan}),
    ],
)
def test_empty_masks_follow_the_table_without_warnings(p_empty, g_empty, expected) -> None:
    full, _ = _two_cubes()
    empty = np.zeros_like(full)
    pred = empty if p_empty else full
    gt = empty if g_empty else full
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = metrics.compute_metrics(pred, gt, (1.0, 2.0, 3.0))
        singles = {
            "dice": metrics.dice(pred, gt),
            "jaccard": metrics.jaccard(pred, gt),
            "hd95": metrics.hd95(pred, gt, (1.0, 2.0, 3.0)),
            "asd": metrics.asd(pred, gt, (1.0, 2.0, 3.0)),
            "assd": metrics.assd(pred, gt, (1.0, 2.0, 3.0)),
        }
    for name, want in expected.items():
        for value in (got[name], singles[name]):
            if math.isnan(want):
                assert math.isnan(value), name
            else:
                assert value == want, name


def _random_mask(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    return noise > np.quantile(noise, rng.uniform(0.6, 0.9))


def _brute_force_directed(a: np.ndarray, b: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Nearest-surface distances by all pairs, independent of any distance transform."""
    fp = ndimage.generate_binary_structure(3, 1)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a, fp)) * sp
    sb = np.argwhere(b & ~ndimage.binary_erosion(b, fp)) * sp
    return cdist(sa, sb).min(axis=1)


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_agree_with_medpy_and_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (10, 17, 14)  # masks reach the array border, which exercises the border rule
    pred, gt = _random_mask(rng, shape), _random_mask(rng, shape)
    sp = np.array([rng.uniform(0.5, 5.0), rng.uniform(0.3, 1.5), rng.uniform(0.3, 1.5)])
    got = metrics.compute_metrics(pred, gt, sp)
    assert got["dice"] == pytest.approx(medpy_binary.dc(pred, gt))
    assert got["jaccard"] == pytest.approx(medpy_binary.jc(pred, gt))
    assert got["hd95"] == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=sp))
    assert got["asd"] == pytest.approx(medpy_binary.asd(pred, gt, voxelspacing=sp))
    assert got["assd"] == pytest.approx(medpy_binary.assd(pred, gt, voxelspacing=sp))

    d_pg, d_gp = metrics.surface_distances(pred, gt, sp)
    np.testing.assert_allclose(np.sort(d_pg), np.sort(_brute_force_directed(pred, gt, sp)))
    np.testing.assert_allclose(np.sort(d_gp), np.sort(_brute_force_directed(gt, pred, sp)))
    want_max = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assert metrics.hd95(pred, gt, sp, method="max_directed") == pytest.approx(want_max)


def test_small_objects_far_from_the_border_match_medpy() -> None:
    # The cropping to the bounding box must not change anything for objects in a big array.
    pred = np.zeros((30, 40, 40), bool)
    gt = np.zeros_like(pred)
    pred[10:14, 5:12, 20:30] = True
    gt[11:16, 7:15, 18:26] = True
    sp = (3.0, 0.7, 0.9)
    assert metrics.hd95(pred, gt, sp) == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=sp))
    assert metrics.asd(gt, pred, sp) == pytest.approx(medpy_binary.asd(gt, pred, voxelspacing=sp))


def test_bad_inputs_raise_clear_errors() -> None:
    a, b = _two_cubes()
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(a, b[:-1])
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(a, b, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="method"):
        metrics.hd95(a, b, None, method="nope")  # type: ignore[arg-type]


def test_accumulator_means_ignore_and_count_nan() -> None:
    acc = MetricAccumulator()
    a, b = _two_cubes()
    acc.add_masks("c1", 1, a, b, (2.0, 1.0, 1.0))
    acc.add_masks("c2", 1, a, a, (2.0, 1.0, 1.0))
    acc.add_masks("c3", 1, np.zeros_like(a), a, (2.0, 1.0, 1.0))
    acc.add("c1", 2, {"dice": 0.5, "jaccard": 1 / 3, "hd95": 4.0, "asd": 1.0})
    with pytest.raises(ValueError, match="already"):
        acc.add("c1", 2, {"dice": 0.5, "jaccard": 1 / 3, "hd95": 4.0, "asd": 1.0})
    with pytest.raises(ValueError, match="lack"):
        acc.add("c9", 2, {"dice": 0.5})

    s = acc.summary()
    assert set(s) == {1, 2} and acc.cases == ["c1", "c2", "c3"] and len(acc) == 4
    dice1 = s[1]["dice"]
    assert dice1.mean == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert dice1.std == pytest.approx(np.std([2 / 3, 1, 0]))
    assert (dice1.n, dice1.n_nan) == (3, 0)
    hd1 = s[1]["hd95"]  # c3's prediction is empty -> NaN, left out and counted
    assert (hd1.n, hd1.n_nan) == (2, 1)
    assert hd1.mean == pytest.approx(1.0) and hd1.std == pytest.approx(1.0)
    assert s[2]["hd95"] == MetricSummary(4.0, 0.0, 1, 0)
    assert [r["case"] for r in acc.rows()] == ["c1", "c1", "c2", "c3"]


def test_all_nan_summary_is_nan_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = MetricSummary.of([math.nan, math.nan])
    assert math.isnan(s.mean) and math.isnan(s.std) and (s.n, s.n_nan) == (0, 2)


def test_accumulator_leaves_classes_absent_from_both_out_of_the_means() -> None:
    acc = MetricAccumulator()
    a, b = _two_cubes()
    empty = np.zeros_like(a)
    acc.add_masks("c1", 1, a, b, (2.0, 1.0, 1.0))
    got = acc.add_masks("c2", 1, empty, empty, (2.0, 1.0, 1.0))
    assert got["dice"] == 1.0  # the single-case value stays as tabulated ...
    s = acc.summary()[1]
    assert s["dice"].mean == pytest.approx(metrics.dice(a, b))  # ... but is not averaged in
    assert (s["dice"].n, s["dice"].n_absent) == (1, 1) and (s["hd95"].n, s["hd95"].n_absent) == (1, 1)
    assert acc.is_absent("c2", 1) and not acc.is_absent("c1", 1) and acc.absent() == [("c2", 1)]
    assert [r["absent"] for r in acc.rows()] == [False, True]
    acc.add("c3", 2, {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}, absent=True)
    only_absent = acc.summary()[2]["dice"]
    assert math.isnan(only_absent.mean) and (only_absent.n, only_absent.n_absent) == (0, 1)
