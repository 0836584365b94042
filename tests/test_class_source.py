"""Classes taken from the coarse head: chosen on validation with a margin, painted over the
pipeline's label map (a filled ring becomes a ring again), and stored in the task model (old files
load without them, a class outside the table is refused)."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest

from sss_lib.class_source import MIN_COARSE_GAIN, apply_coarse_classes, choose_coarse_classes, coarse_label_stack
from sss_lib.metrics import dice
from sss_lib.task_model import MANIFEST, TaskModelError, _write_archive, load_task_model, save_task_model
from test_task_model import make_model


def test_a_class_is_taken_from_the_coarse_head_only_when_it_wins_by_the_margin():
    pipeline = {1: 0.80, 2: 0.47, 3: 0.91}
    coarse = {1: 0.70, 2: 0.60, 3: 0.91 + MIN_COARSE_GAIN / 2}
    assert choose_coarse_classes(pipeline, coarse) == (2,)
    assert choose_coarse_classes(pipeline, {**coarse, 3: 0.95}) == (2, 3)
    assert choose_coarse_classes(pipeline, coarse, min_gain=0.2) == ()
    # A class the coarse head was not measured on (absent from the validation cases) is never chosen.
    assert choose_coarse_classes(pipeline, {1: 0.99}) == (1,)
    assert choose_coarse_classes({}, coarse) == ()


def disc_and_ring(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """``(1, H, W)`` stacks: the pipeline's answer (the Myo box filled the disc, label 2, beside an
    RV, label 1) and the truth (a Myo ring, 2, around the LV cavity, 3; the same RV)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 20, xx - 22)
    truth = np.zeros((size, size), np.uint8)
    truth[r <= 12] = 2
    truth[r <= 7] = 3
    truth[5:15, 1:6] = 1
    filled = truth.copy()
    filled[r <= 12] = 2
    return filled[None], truth[None]


def test_the_coarse_head_turns_a_filled_disc_back_into_a_ring_and_leaves_other_classes():
    pipeline, truth = disc_and_ring()
    coarse = truth.copy()
    coarse[0, 5:15, 1:6] = 0  # the coarse head misses the RV: not its class to decide
    before_myo = dice(pipeline == 2, truth == 2)
    labels = pipeline.copy()
    changed = apply_coarse_classes(labels, coarse, [2])
    assert dice(labels == 2, truth == 2) == 1.0 and before_myo < 0.85
    assert np.array_equal(labels == 3, truth == 3), "the cavity the disc covered goes back to the LV"
    assert np.array_equal(labels == 1, pipeline == 1), "the RV stays the decoder's"
    assert changed == {2: int(np.count_nonzero((pipeline == 2) != (truth == 2)))}
    with pytest.raises(ValueError, match="shape"):
        apply_coarse_classes(labels, coarse[:, :-1], [2])


def test_the_coarse_label_stack_is_the_argmax_with_background():
    probs = {1: np.array([[[0.2, 0.7], [0.1, 0.3]]], np.float32), 2: np.array([[[0.1, 0.2], [0.8, 0.3]]], np.float32)}
    assert coarse_label_stack(probs).tolist() == [[[0, 1], [2, 0]]]


def test_coarse_classes_round_trip_and_old_files_load_without_them(tmp_path):
    model = make_model()
    evidence = dataclasses.replace(model.validation, coarse_dice={1: 0.7, 2: 0.85, 3: 0.9})
    chosen = dataclasses.replace(model, coarse_classes=(2,), validation=evidence)
    loaded = load_task_model(save_task_model(chosen, tmp_path / "m.ssstask"))
    assert loaded.coarse_classes == (2,) and loaded.validation.coarse_dice == {1: 0.7, 2: 0.85, 3: 0.9}
    with pytest.raises(TaskModelError, match="coarse_classes"):
        save_task_model(dataclasses.replace(model, coarse_classes=(9,)), tmp_path / "bad.ssstask")
    assert not (tmp_path / "bad.ssstask").exists()

    # A file written before the field existed: every class from the decoder.
    with zipfile.ZipFile(save_task_model(model, tmp_path / "new.ssstask")) as zf:
        manifest = json.loads(zf.read(MANIFEST))
    for key in ("coarse_classes", "tensors", "payload_sha256"):
        manifest.pop(key)
    manifest["validation"].pop("coarse_dice")
    _write_archive(manifest, model.weights, tmp_path / "old.ssstask")
    old = load_task_model(tmp_path / "old.ssstask")
    assert old.coarse_classes == () and old.validation.coarse_dice == {}
