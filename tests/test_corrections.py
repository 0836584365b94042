"""Corrections: the span rule, the simulated user, and re-runs that change only what they must.

The span rule and the simulator are tested on plain arrays; the engine's locality with SAM-2.1 tiny
at random init (structure: which slices change) and with LiteMedSAM's real weights on a crop of the
real lung CT (a correct box does not lower Dice on its own slice nor in 3D).
"""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.backbones.spans import DEFAULT_SPAN_RULE, Gate, KeySlice, Span, plan_class, resolve_span
from sss_lib.correction_sim import Correction, apply_correction, next_correction, truth_box
from sss_lib.engine import SegmentationSession
from sss_lib.metrics import dice
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis, Volume

torch = pytest.importorskip("torch")


# -- the span rule --------------------------------------------------------------------------------
def by_slice(*prompts: SlicePrompt) -> dict:
    return ClassPrompts(1, "c", list(prompts)).by_slice()


def test_markers_cut_the_stack_into_spans():
    plan = plan_class(by_slice(SlicePrompt(3, box=(0, 0, 4, 4)), SlicePrompt(7, box=(0, 0, 4, 4)),
                               SlicePrompt.not_on_slice(10), SlicePrompt.not_on_slice(13)), 16)
    spans = [(s.lo, s.hi, s.below and s.below.index, s.above and s.above.index) for s in plan.spans()]
    # [0, 2] from key 3 down; [4, 6] between keys 3 and 7; [8, 9] from 7 up to the marker at 10;
    # [11, 12] and [14, 15] have no key slice: empty, not a span.
    assert spans == [(0, 2, None, 3), (4, 6, 3, 7), (8, 9, 7, None)]
    assert plan_class(by_slice(SlicePrompt.not_on_slice(2)), 5).spans() == []


def fake_run(start: int, stop: int, direction: int, reach: int, gate: Gate, decoded: list[int]):
    """A run that 'decodes' (records) each slice it is let through and ends after ``reach`` slices."""
    for n, s in enumerate(range(start, stop, direction)):
        if n >= reach:
            return
        yield from gate.wait(s)
        decoded.append(s)
        yield s, np.full((1, 1), float(100 * direction + s), np.float32)


def resolved(lo, hi, reach_up, reach_down, rule="nearest"):
    span = Span(lo, hi, KeySlice(lo - 1, ()), KeySlice(hi + 1, ()))
    gates, decoded = {+1: Gate(), -1: Gate()}, []
    up = fake_run(lo, hi + 1, +1, reach_up, gates[+1], decoded)
    down = fake_run(hi, lo - 1, -1, reach_down, gates[-1], decoded)
    out = {s: float(v[0, 0]) for s, v in resolve_span(span, up, down, gates, rule=rule)}
    if rule == "nearest":  # 100 + s: from below, s - 100: from above
        return {s: ("below" if v > 0 else "above") for s, v in out.items()}, sorted(decoded)
    return out, sorted(decoded)


def test_nearest_rule_each_slice_takes_the_nearest_key_slice_whose_run_reached_it():
    # Keys at 0 and 8, span 1..7: both runs reach everything: nearer wins, a tie (4) goes below.
    owner, decoded = resolved(1, 7, 99, 99)
    assert owner == {1: "below", 2: "below", 3: "below", 4: "below", 5: "above", 6: "above", 7: "above"}
    assert decoded == [1, 2, 3, 4, 5, 6, 7], "nothing is decoded that cannot count"
    # The run from below ends after 2 slices: the run from above takes over as far as it reaches.
    owner, _ = resolved(1, 7, 2, 99)
    assert owner == {1: "below", 2: "below", **{s: "above" for s in range(3, 8)}}
    # Both end early: the slices between stay empty.
    owner, _ = resolved(1, 7, 1, 2)
    assert owner == {1: "below", 6: "above", 7: "above"}


def test_blend_rule_weights_both_runs_by_distance_where_both_reached():
    assert DEFAULT_SPAN_RULE == "blend"
    # Keys at 0 and 8: slice s gets (8 - s)/8 of the run from below (100 + s) and s/8 of the run
    # from above (s - 100), i.e. s + 100 - 25 s: both runs decode the whole span.
    out, decoded = resolved(1, 7, 99, 99, rule="blend")
    assert out == pytest.approx({s: s + 100 * (8 - s) / 8 - 100 * s / 8 for s in range(1, 8)})
    assert decoded == sorted(list(range(1, 8)) * 2)
    # Where only one run reached, that run's result; where neither did, nothing.
    out, _ = resolved(1, 7, 2, 3, rule="blend")
    assert out == pytest.approx({1: 101.0, 2: 102.0, 5: -95.0, 6: -94.0, 7: -93.0})
    out, _ = resolved(1, 7, 6, 3, rule="blend")
    assert out[3] == 103.0 and out[5] == pytest.approx(5 + 100 * 3 / 8 - 100 * 5 / 8)
    # A span with one key slice takes its run as it is.
    span = Span(0, 3, None, KeySlice(4, ()))
    gate = Gate()
    got = dict(resolve_span(span, None, fake_run(3, -1, -1, 99, gate, []), {-1: gate}))
    assert {s: float(v[0, 0]) for s, v in got.items()} == {3: -97.0, 2: -98.0, 1: -99.0, 0: -100.0}
    with pytest.raises(ValueError, match="unknown span rule"):
        list(resolve_span(span, None, None, rule="widest"))


# -- the simulated user ---------------------------------------------------------------------------
def test_simulator_fixes_the_worst_slice_with_the_right_action():
    truth = np.zeros((5, 20, 20), bool)
    truth[1:4, 5:15, 5:15] = True
    pred = truth.copy()
    pred[2, 5:15, 5:10] = False  # 50 missed voxels on a lesion slice
    pred[4, 0:6, 0:6] = True  # 36 false positives off the lesion
    c = next_correction(truth, pred)
    assert c == Correction("box", 2, (5, 5, 14, 14), 50)
    assert truth_box(truth[2], margin=3) == (2, 2, 17, 17)
    pred[0, 0:10, 0:10] = True  # 100 false positives: now the larger error
    assert next_correction(truth, pred) == Correction("absent", 0, None, 100)
    assert next_correction(truth, pred, done={0}).slice_index == 2  # a corrected slice is not picked again
    assert next_correction(truth, truth) is None

    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "t", [SlicePrompt(1, box=(5, 5, 14, 14))])])
    after = apply_correction(prompts, 1, Correction("absent", 0, None, 100))
    assert [p.absent for p in after.classes[0].prompts] == [False, True]
    assert len(prompts.classes[0].prompts) == 1, "the input is not changed"


# -- locality with SAM-2 (random init: structure, not accuracy) ------------------------------------
N, SIZE = 9, 48


@pytest.fixture(scope="module")
def phantom(bright_box_volume) -> Volume:
    return bright_box_volume(N, SIZE, seed=3)


def one_class(*prompts: SlicePrompt) -> PromptSet:
    return PromptSet(SliceAxis(2), [ClassPrompts(1, "a", list(prompts))])


BOX = (14, 12, 33, 29)


def changed_slices(a: np.ndarray, b: np.ndarray) -> list[int]:
    return [s for s in range(len(a)) if not np.array_equal(a[s], b[s])]


def test_sam2_new_key_slice_changes_only_the_span_between_its_neighbours(sam2_to_span_edge, phantom):
    session = SegmentationSession(phantom, sam2_to_span_edge)
    first = [SlicePrompt(1, box=BOX), SlicePrompt(6, box=BOX)]
    session.segment(one_class(*first))
    before = session.class_logits(1).copy()

    result = session.segment(one_class(*first, SlicePrompt(3, box=(15, 13, 30, 28))))
    after = session.class_logits(1)
    assert result.recomputed_slices == {1: [2, 3, 4, 5]}
    assert set(changed_slices(before, after)) <= {2, 3, 4, 5}
    assert 3 in changed_slices(before, after)
    # Incremental equals from scratch: the kept slices are what a fresh run gives.
    fresh = SegmentationSession(phantom, sam2_to_span_edge, store=session.store)
    fresh.segment(one_class(*first, SlicePrompt(3, box=(15, 13, 30, 28))))
    np.testing.assert_array_equal(fresh.class_logits(1), after)


def test_sam2_edit_at_one_end_changes_nothing_beyond_the_next_key_slice(sam2_to_span_edge, phantom):
    session = SegmentationSession(phantom, sam2_to_span_edge)
    keys = [SlicePrompt(2, box=BOX), SlicePrompt(4, box=BOX)]
    session.segment(one_class(*keys, SlicePrompt(7, box=BOX)))
    before = session.class_logits(1).copy()
    result = session.segment(one_class(*keys, SlicePrompt(7, box=(10, 10, 40, 40))))
    assert result.recomputed_slices == {1: [5, 6, 7, 8]}
    assert set(changed_slices(before, session.class_logits(1))) <= {5, 6, 7, 8}
    # The user's key slice shows its own prompt's segmentation, not a propagated one.
    own = sam2_to_span_edge.segment_key(session.slices, session.embedding, 1, 7, [SlicePrompt(7, box=(10, 10, 40, 40))])
    np.testing.assert_array_equal(session.class_logits(1)[7], own.astype(np.float16))


# -- LiteMedSAM, real weights, real lung tumour ----------------------------------------------------
# A crop of lung1 around its tumour: 12 slices (tumour on crop slices 6-8), 72x72 pixels.
LUNG_CROP = (slice(26, 38), slice(60, 132), slice(60, 132))


@pytest.fixture(scope="module")
def litemedsam(two_torch_threads):
    from sss_lib.backbones.litemedsam import build_litemedsam_backbone

    return build_litemedsam_backbone(device="cpu")


@pytest.fixture(scope="module")
def lung(data_file):
    from sss_lib.volume_io import read_label, read_volume

    image = read_volume(data_file("lung1_crop_image.nrrd"))
    label = read_label(data_file("lung1_crop_label.nrrd"), image)
    crop = Volume(image.voxels[LUNG_CROP], image.spacing, image.origin, image.direction, "lung1 crop")
    return crop, label.voxels[LUNG_CROP] > 0


@pytest.fixture(scope="module")
def lung_first_run(litemedsam, lung):
    from sss_lib.demo import box_prompt_from_label

    image, truth = lung
    prompts = box_prompt_from_label(image.with_voxels(truth.astype(np.uint8)))
    session = SegmentationSession(image, litemedsam, slice_axis=SliceAxis(2))
    result = session.segment(prompts)
    return session, prompts, result.labels.voxels == 1, session.class_logits(1).copy()


def test_litemedsam_correct_box_never_lowers_dice_on_its_slice_or_in_3d(lung, lung_first_run):
    _, truth = lung
    session, prompts, pred, before_logits = lung_first_run
    done = {p.key_slice for p in prompts.classes[0].prompts}
    for _ in range(2):
        c = next_correction(truth, pred, done)
        assert c is not None and c.kind == "box"
        prompts = apply_correction(prompts, 1, c)
        done.add(c.slice_index)
        result = session.segment(prompts)
        new = result.labels.voxels == 1
        s = c.slice_index
        print(f"box on slice {s}: slice Dice {dice(pred[s], truth[s]):.3f} -> {dice(new[s], truth[s]):.3f}, "
              f"3D {dice(pred, truth):.3f} -> {dice(new, truth):.3f}")
        assert dice(new[s], truth[s]) >= dice(pred[s], truth[s])
        assert dice(new, truth) >= dice(pred, truth)
        # Only the new key slice and the spans it bounds were recomputed; the rest is kept exactly.
        keys = sorted(done)
        lo = max([k for k in keys if k < s], default=-1)
        hi = min([k for k in keys if k > s], default=len(truth))
        assert set(result.recomputed_slices[1]) <= set(range(lo + 1, hi))
        pred = new


def test_litemedsam_not_on_this_slice_removes_the_class_there_and_beyond(litemedsam, lung, lung_first_run):
    image, truth = lung
    session, prompts, pred, before = lung_first_run
    key = prompts.classes[0].prompts[0].key_slice
    marked = PromptSet(prompts.slice_axis, [ClassPrompts(1, "tumour", list(prompts.classes[0].prompts)
                                                         + [SlicePrompt.not_on_slice(key + 1)])])
    other = SegmentationSession(image, litemedsam, slice_axis=SliceAxis(2), store=session.store)
    result = other.segment(marked)
    logits = other.class_logits(1)
    assert not (logits[key + 1:] > 0).any(), "the class is empty on the marked slice and beyond it"
    np.testing.assert_array_equal(logits[:key + 1], before[:key + 1])  # the other side is untouched
    assert result.slices_per_class[1] and max(result.slices_per_class[1]) == key
