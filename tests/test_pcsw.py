"""PCSW on hand-built probability volumes whose answer is known (SSS_METHOD.md section 2)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sss_lib.errors import PromptError
from sss_lib.pcsw import (
    PcswConfig,
    measure_class_ranges,
    pcsw_class,
    pcsw_prompt_set,
    run_pcsw,
    window_lengths,
)
from sss_lib.pcsw.graph import SliceGraph
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis

SP = (1.0, 1.0)  # in-plane (sx, sy) mm


def _grid(s: int, h: int, w: int):
    return np.ogrid[:s, :h, :w]


def _ring_and_disk(s=24, h=40, w=40, z0=4, z1=18):
    z, y, x = _grid(s, h, w)
    r = np.hypot(y - 20, x - 20)
    in_z = (z >= z0) & (z <= z1)
    ring = ((r >= 6) & (r <= 10) & in_z) * 0.9
    disk = ((r <= 4) & in_z) * 0.8
    return ring, disk


def _on(prob: np.ndarray, s: int, xy: tuple[float, float]) -> bool:
    x, y = (int(round(v)) for v in xy)
    return bool(prob[s, y, x] > 0.5)


# -- window lengths ----------------------------------------------------------------------------
def test_window_lengths_middle_first_then_outwards() -> None:
    got = window_lengths(100)  # ceil(100/3) = 34 .. floor(100/2) = 50, middle 42
    assert got[:5] == [42, 43, 41, 44, 40]
    assert sorted(got) == list(range(34, 51))
    assert window_lengths(24) == [10, 11, 9, 12, 8]
    assert window_lengths(3) == [2] and window_lengths(2) == [2]  # at least 2
    assert window_lengths(1) == []  # no window fits one slice


# -- connected components of windows -----------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_window_components_match_scipy_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.standard_normal((14, 20, 18)), 1.0) > 0.45
    prob = np.where(mask, 0.9, 0.1)
    graph = SliceGraph(mask, prob, 26)
    cube = np.ones((3, 3, 3), bool)
    full_lab, _ = ndimage.label(mask, cube)
    for start, stop in [(0, 14), (2, 7), (5, 11), (9, 13)]:
        sub = mask[start:stop]
        if not sub.any():
            continue
        lab, n = ndimage.label(sub, cube)
        sizes = np.bincount(lab.ravel())[1:]
        comp = graph.window(start, stop)
        assert comp.voxels == sizes.max()
        assert comp.continuity == pytest.approx(sizes.max() / sizes.sum())
        # the reported nodes are exactly one largest component of the window
        chosen = np.stack([graph.mask_of(comp.nodes, s) for s in range(start, stop)])
        labels_hit = np.unique(lab[chosen])
        assert labels_hit.size == 1 and np.array_equal(chosen, lab == labels_hit[0])
        full_id = np.unique(full_lab[start:stop][chosen])
        assert comp.full_voxels == np.count_nonzero(full_lab == full_id[0])


def test_26_connectivity_joins_diagonal_steps() -> None:
    mask = np.zeros((6, 10, 10), bool)
    for s in range(6):
        mask[s, 2 + s, 2 + s] = True  # one pixel per slice, stepping diagonally
    prob = mask * 0.9
    assert SliceGraph(mask, prob, 26).window(0, 6).continuity == 1.0
    assert SliceGraph(mask, prob, 6).window(0, 6).continuity == pytest.approx(1 / 6)


# -- prompts -----------------------------------------------------------------------------------
def test_ring_positive_point_is_in_the_wall_and_box_encloses_it() -> None:
    ring, disk = _ring_and_disk()
    res = pcsw_class(ring, 1, in_plane_spacing=SP, slice_spacing=2.0)
    assert res.status == "ok" and res.continuity == 1.0
    p = res.prompt
    assert p.source == "auto" and p.confidence == 1.0
    assert 4 <= p.key_slice <= 18
    (x, y), = p.positive_points
    assert _on(ring, p.key_slice, (x, y))  # in the wall ...
    assert 6 <= np.hypot(x - 20, y - 20) <= 10  # ... not in the hole
    assert p.box == (7.0, 7.0, 33.0, 33.0)  # ring spans 10..30, margin 3
    assert p.negative_points == []  # no other class was given
    # window and key slice sit mid-structure (structure 4..18, middle 11)
    assert res.window is not None and res.window[0] <= 11 < res.window[1]
    assert abs(p.key_slice - 11) <= 1
    assert res.volume_mm3 == pytest.approx(np.count_nonzero(ring) * 2.0)


def test_negative_points_come_from_other_classes_inside_the_box() -> None:
    ring, disk = _ring_and_disk()
    far = np.zeros_like(ring)
    far[8:14, 34:39, 0:4] = 0.9  # a third class outside the ring's box
    res = run_pcsw({1: ring, 2: disk, 3: far}, in_plane_spacing=SP, slice_spacing=2.0)
    p1 = res[1].prompt
    assert p1.negative_points == [(20.0, 20.0)]  # the disk's deepest pixel, in the ring's hole
    p2 = res[2].prompt
    # The disk's box (16..24 + 3) reaches the ring wall (radius >= 6): one negative point there.
    assert len(p2.negative_points) == 1
    nx, ny = p2.negative_points[0]
    assert _on(ring, p2.key_slice, (nx, ny))
    x0, y0, x1, y1 = p2.box
    assert x0 <= nx <= x1 and y0 <= ny <= y1
    assert res[3].prompt.negative_points == []


def test_noise_blob_loses_to_the_continuous_object() -> None:
    s, h, w = 24, 48, 48
    z, y, x = _grid(s, h, w)
    obj = (((z - 12) / 9.0) ** 2 + ((y - 15) / 8.0) ** 2 + ((x - 15) / 8.0) ** 2 <= 1) * 0.7
    prob = obj.astype(float)
    prob[11:13, 38:41, 38:41] = 0.99  # a small, very confident blob elsewhere
    rng = np.random.default_rng(3)
    speckle = rng.random((s, h, w)) > 0.998
    prob[speckle & (prob == 0)] = 0.95  # scattered single-voxel noise
    res = pcsw_class(prob, 1, in_plane_spacing=SP, slice_spacing=1.5)
    assert res.status == "ok"
    p = res.prompt
    (px, py), = p.positive_points
    assert obj[p.key_slice, int(py), int(px)] > 0  # the prompt is on the object, not the blob
    assert p.box[2] < 38 and p.box[3] < 38  # the box does not reach the blob
    assert res.mean_probability == pytest.approx(0.7, abs=0.01)


def test_highest_continuity_then_highest_mean_probability_wins() -> None:
    s, h, w = 30, 30, 30  # windows 10..15 long: each object fits a window alone (C = 1)
    prob = np.zeros((s, h, w))
    prob[2:9, 5:12, 5:12] = 0.6
    prob[19:26, 16:24, 16:24] = 0.95
    res = pcsw_class(prob, 1, in_plane_spacing=SP, slice_spacing=1.0)
    assert res.status == "ok" and res.continuity == 1.0
    assert 19 <= res.prompt.key_slice <= 25
    assert res.mean_probability == pytest.approx(0.95)


def test_gap_slice_splits_the_structure() -> None:
    s, h, w = 12, 20, 20
    prob = np.zeros((s, h, w))
    prob[2:5, 5:15, 5:15] = 0.9
    prob[6:9, 5:15, 5:15] = 0.9  # slice 5 is empty: two 3D components
    mask = prob > 0.5
    graph = SliceGraph(mask, prob, 26)
    assert graph.window(0, 12).continuity == pytest.approx(0.5)
    filled = mask.copy()
    filled[5] = filled[4]
    assert SliceGraph(filled, filled * 0.9, 26).window(0, 12).continuity == 1.0
    res = pcsw_class(prob, 1, in_plane_spacing=SP, slice_spacing=1.0)
    assert res.status == "ok" and res.continuity == 1.0
    lo, hi = res.window
    covered = [k for k in range(lo, hi) if prob[k].any()]
    assert covered in ([2, 3, 4], [6, 7, 8])  # the chosen window sees one piece only
    assert res.prompt.key_slice in covered


def test_absent_class_gets_no_prompt() -> None:
    prob = np.full((10, 8, 8), 0.3)
    res = pcsw_class(prob, 4, in_plane_spacing=SP, slice_spacing=1.0)
    assert (res.status, res.prompt, res.window) == ("absent", None, None)
    assert "0.5" in res.reason


def test_volume_outside_class_range_falls_back() -> None:
    ring, _ = _ring_and_disk()
    vol = np.count_nonzero(ring) * 2.0  # mm^3 with slice spacing 2
    ok = pcsw_class(ring, 1, in_plane_spacing=SP, slice_spacing=2.0, volume_range=(vol * 0.9, vol * 1.1))
    assert ok.status == "ok"
    # A range of 4x..8x the volume, widened by 50%, still starts at 2x: every window fails.
    bad = pcsw_class(ring, 1, in_plane_spacing=SP, slice_spacing=2.0, volume_range=(vol * 4, vol * 8))
    assert bad.status == "fallback" and "volume" in bad.reason
    assert bad.prompt.confidence < 0.5 and bad.window is None and bad.continuity is None
    assert _on(ring, bad.prompt.key_slice, bad.prompt.positive_points[0])
    # the margin matters: 1.4x..2x the volume is within +-50% of the range
    assert pcsw_class(ring, 1, in_plane_spacing=SP, slice_spacing=2.0,
                      volume_range=(vol * 1.4, vol * 2)).status == "ok"


def test_area_ratio_and_centroid_shift_constraints() -> None:
    s = 12
    cone = np.zeros((s, 40, 40))
    for k, half in zip(range(3, 9), (1, 6, 6, 6, 6, 6)):  # area 9 -> 169 (ratio 18.8) at slice 3|4
        cone[k, 20 - half:21 + half, 20 - half:21 + half] = 0.9
    assert pcsw_class(cone, 1, in_plane_spacing=SP, slice_spacing=1.0).status == "ok"  # a window skips slice 3
    pulsing = np.zeros((s, 40, 40))
    for k in range(2, 10):  # area 9, 169, 9, 169, ...: every pair of adjacent slices breaks r = 3
        half = 1 if k % 2 else 6
        pulsing[k, 20 - half:21 + half, 20 - half:21 + half] = 0.9
    res = pcsw_class(pulsing, 1, in_plane_spacing=SP, slice_spacing=1.0)
    assert res.status == "fallback" and "area ratio > 3" in res.reason
    loose = pcsw_class(pulsing, 1, in_plane_spacing=SP, slice_spacing=1.0, config=PcswConfig(max_area_ratio=20))
    assert loose.status == "ok"

    moving = np.zeros((s, 40, 60))
    for i, k in enumerate(range(2, 10)):
        moving[k, 15:25, 5 + 5 * i:15 + 5 * i] = 0.9  # 5 px per slice, touching the last slice
    fast = pcsw_class(moving, 1, in_plane_spacing=(2.5, 1.0), slice_spacing=1.0)  # 12.5 mm/slice
    assert fast.status == "fallback" and "centroid shift" in fast.reason
    slow = pcsw_class(moving, 1, in_plane_spacing=(1.5, 1.0), slice_spacing=1.0)  # 7.5 mm/slice
    assert slow.status == "ok"


def test_fallback_uses_the_largest_slice_and_its_largest_component() -> None:
    # Two equal, separate objects in every window: C = 0.5 < 0.8 everywhere.
    s, h, w = 10, 30, 40
    prob = np.zeros((s, h, w))
    prob[2:8, 5:12, 3:10] = 0.9
    prob[2:8, 5:12, 25:32] = 0.9
    prob[5, 5:14, 25:34] = 0.9  # slice 5: the right object is larger there
    res = pcsw_class(prob, 1, in_plane_spacing=SP, slice_spacing=1.0)
    assert res.status == "fallback" and "continuity" in res.reason
    p = res.prompt
    assert p.key_slice == 5
    assert p.box == (22.0, 2.0, 36.0, 16.0)  # right object on slice 5 (x 25..33, y 5..13) + 3
    assert p.confidence == pytest.approx(0.49 * 81 / (81 + 49))


def test_single_slice_volume_falls_back() -> None:
    prob = np.zeros((1, 10, 10))
    prob[0, 3:6, 3:6] = 0.8
    res = pcsw_class(prob, 1, in_plane_spacing=SP, slice_spacing=1.0)
    assert res.status == "fallback" and res.prompt.key_slice == 0 and "no window fits" in res.reason
    assert res.prompt.positive_points == [(4.0, 4.0)]


def test_bad_probabilities_are_rejected() -> None:
    with pytest.raises(ValueError, match="sigmoid"):
        pcsw_class(np.full((4, 4, 4), 3.0), 1, in_plane_spacing=SP, slice_spacing=1.0)
    with pytest.raises(ValueError, match="differs"):
        run_pcsw({1: np.zeros((4, 4, 4)), 2: np.zeros((4, 4, 5))}, in_plane_spacing=SP, slice_spacing=1.0)
    with pytest.raises(ValueError, match="tau"):
        PcswConfig(tau=0.3)


# -- prompt sets -------------------------------------------------------------------------------
def test_prompt_set_keeps_user_classes_and_replaces_auto_ones() -> None:
    ring, disk = _ring_and_disk()
    absent = np.zeros_like(ring)
    axis = SliceAxis(2)
    user = ClassPrompts(1, "myo", [SlicePrompt(3, box=(1, 1, 5, 5), source="user")], (10, 20, 30))
    stale = ClassPrompts(2, "LV", [SlicePrompt(0, box=(0, 0, 2, 2), source="auto", confidence=0.9)], (1, 2, 3))
    previous = PromptSet(axis, [user, stale])
    pset, results = pcsw_prompt_set({1: ring, 2: disk, 3: absent}, slice_axis=axis, in_plane_spacing=SP,
                                    slice_spacing=2.0, names={3: "RV"}, previous=previous)
    classes = pset.by_label()
    assert sorted(classes) == [1, 2]  # class 3 is absent: no prompt
    assert classes[1] is user  # untouched
    assert set(results) == {2, 3} and results[3].status == "absent"
    lv = classes[2]
    assert (lv.name, lv.color) == ("LV", (1, 2, 3))  # kept from the previous set
    assert lv.prompts == [results[2].prompt] and lv.prompts[0].source == "auto"
    assert lv.prompts[0].key_slice != 0
    # the kept ring still gives the disk a negative point
    assert len(lv.prompts[0].negative_points) == 1

    fresh, _ = pcsw_prompt_set({1: ring}, slice_axis=axis, in_plane_spacing=SP, slice_spacing=2.0,
                               names={1: "myo"}, colors={1: (9, 9, 9)})
    assert fresh.classes[0].name == "myo" and fresh.classes[0].color == (9, 9, 9)
    with pytest.raises(PromptError, match="slice axis"):
        pcsw_prompt_set({1: ring}, slice_axis=SliceAxis(0), in_plane_spacing=SP, slice_spacing=2.0,
                        previous=previous)


# -- class ranges ------------------------------------------------------------------------------
def test_measure_class_ranges() -> None:
    a = np.zeros((6, 10, 10), np.uint8)
    a[1:3, 1:4, 1:4] = 1  # 18 voxels
    a[4, 8, 8] = 1  # a separate voxel of class 1
    a[0, 0, 0:5] = 2  # 5 voxels
    b = np.zeros((6, 10, 10), np.uint8)
    b[0:4, 0:5, 0:5] = 1  # 100 voxels; class 2 absent
    spacings = [(1.0, 2.0, 0.5), (2.0, 2.0, 2.0)]
    assert measure_class_ranges([a, b], spacings) == {1: (18.0, 800.0), 2: (5.0, 5.0)}
    assert measure_class_ranges([a, b], spacings, measure="class")[1] == (19.0, 800.0)
    assert measure_class_ranges([a, b], spacings, labels=[2]) == {2: (5.0, 5.0)}
