"""Rings and nested classes: the nesting measured on labels, the ring rule restoring a myocardium
that boxes filled (per-class Dice), leaving good rings and the user's classes alone, and the
nesting's place in the task-model file (old files load without it)."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest
from scipy import ndimage

from sss_lib.metrics import dice
from sss_lib.phantoms import make_cardiac_phantom
from sss_lib.phantoms_cardiac import make_hard_cardiac_case
from sss_lib.rings import apply_ring_rule, coarse_argmax, measure_nesting
from sss_lib.task_model import MANIFEST, TaskModelError, _write_archive, load_task_model, save_task_model
from test_task_model import make_model


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """A hard phantom's label stack ``(S, H, W)`` (slices along k)."""
    return make_hard_cardiac_case(3, size=(96, 96), fov_mm=170.0, sub_slices=1).labels.voxels.copy()


def coarse_like(labels: np.ndarray, factor: int = 4) -> dict[int, np.ndarray]:
    """Probabilities a coarse head at 1/``factor`` resolution might give: each class's one-hot
    map averaged over ``factor`` x ``factor`` blocks and brought back by bilinear zoom."""
    out = {}
    for lbl in (1, 2, 3):
        onehot = (labels == lbl).astype(np.float32)
        s, h, w = onehot.shape
        small = onehot.reshape(s, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
        out[lbl] = np.clip(ndimage.zoom(small, (1, factor, factor), order=1), 0, 1)
    total = sum(out.values())
    scale = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1.0)
    return {k: (v * scale).astype(np.float32) for k, v in out.items()}


def test_nesting_is_measured_from_the_labels(truth):
    assert measure_nesting([truth], (1, 2, 3)) == {2: (3,)}
    old = make_cardiac_phantom(2)[1].voxels
    assert measure_nesting([old], (1, 2, 3)) == {2: (3,)}
    # Without a ring (the myocardium labeled only beside the cavity) nothing nests.
    half = truth.copy()
    half[:, :, : truth.shape[2] // 2][half[:, :, : truth.shape[2] // 2] == 2] = 0
    assert 2 not in measure_nesting([half], (1, 2, 3))
    with pytest.raises(ValueError, match="stacks"):
        measure_nesting([truth[0]], (1, 2, 3))


@pytest.mark.parametrize("winner", ["inner", "outer"])
def test_the_rule_restores_a_ring_that_the_boxes_filled(truth, winner):
    # What boxes give: the myocardium's box and the LV's box both segment the filled disc, and one
    # of them takes the whole disc (the LV: the ring vanishes; the Myo: the cavity vanishes).
    boxes = truth.copy()
    disc = np.isin(truth, (2, 3))
    boxes[disc] = 3 if winner == "inner" else 2
    probs = coarse_like(truth)
    before = {lbl: dice(boxes == lbl, truth == lbl) for lbl in (1, 2, 3)}
    fixed = boxes.copy()
    changed = apply_ring_rule(fixed, probs, {2: (3,)}, classes=(1, 2, 3))
    after = {lbl: dice(fixed == lbl, truth == lbl) for lbl in (1, 2, 3)}

    ring_slices = [s for s in range(truth.shape[0]) if (truth[s] == 3).sum() >= 4]
    assert set(ring_slices) <= set(changed[2])
    assert before[2] < 0.8 and after[2] > 0.75 and after[2] > before[2] + 0.2, (before, after)
    assert after[3] > before[3] if winner == "inner" else after[3] > 0.85
    assert after[1] == before[1], "the RV is not part of the nest"
    assert np.array_equal(np.isin(fixed, (2, 3)), disc), "the disc's outline is the boxes', kept as it was"


def test_good_rings_and_user_classes_are_left_alone(truth):
    probs = coarse_like(truth)
    same = truth.copy()
    assert apply_ring_rule(same, probs, {2: (3,)}, classes=(1, 2, 3)) == {}
    assert np.array_equal(same, truth)
    filled = truth.copy()
    filled[np.isin(truth, (2, 3))] = 3
    kept = filled.copy()
    # The myocardium prompted by the user: the rule does not touch it (nor its nest).
    assert apply_ring_rule(kept, probs, {2: (3,)}, classes=(1, 3)) == {}
    assert np.array_equal(kept, filled)


def test_coarse_argmax_gives_background_where_the_classes_leave_it():
    probs = {1: np.array([[[0.2, 0.7]]], np.float32), 3: np.array([[[0.1, 0.2]]], np.float32)}
    assert coarse_argmax(probs, 0).tolist() == [[0, 1]]


def test_nesting_round_trips_and_old_files_load_without_it(tmp_path):
    model = dataclasses.replace(make_model(), nesting={2: (3,)})
    loaded = load_task_model(save_task_model(model, tmp_path / "m.ssstask"))
    assert loaded.nesting == {2: (3,)}
    with pytest.raises(TaskModelError, match="nesting"):
        save_task_model(dataclasses.replace(model, nesting={2: (9,)}), tmp_path / "bad.ssstask")

    # A file written before the field existed: the manifest has no "nesting".
    path = tmp_path / "old.ssstask"
    with zipfile.ZipFile(save_task_model(make_model(), tmp_path / "new.ssstask")) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    for key in ("nesting", "tensors", "payload_sha256"):
        manifest.pop(key)
    _write_archive(manifest, make_model().weights, path)
    assert load_task_model(path).nesting == {}
