"""Supervised training: a short CPU run on tiny phantoms whose loss falls and whose task-model file
Auto-segment loads and runs; reproducibility; the validation split; prompts drawn from labels.

The backbone is SAM-2.1 tiny at random init with a 64 px input (its embeddings take ~0.1 s), so
the file runs in seconds; the LiteMedSAM path is exercised by benchmarks/bench_task_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sss_lib.datasets import Case
from sss_lib.errors import InputError
from sss_lib.phantoms import CLASS_NAMES, make_phantom_dataset
from sss_lib.trainer import PromptJitter, TrainConfig, train_task_model
from sss_lib.trainer.data import split_cases
from sss_lib.trainer.samples import ClassIndex, carried_box, draw_samples, key_prompt

PHANTOM = dict(n_slices=5, size=(48, 48), spacing=(3.0, 3.0, 8.0))


# One torch thread, and a fresh random-init SAM-2.1 tiny ``backbone`` for this module: tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 3, seed=3, **PHANTOM)


@pytest.fixture(scope="module")
def trained(dataset, backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "heart.ssstask"
    events = []
    config = TrainConfig(dataset, out, iterations=40, seed=1, head_batch=4, decoder_batch=2, head_width=16,
                         val_every=20)
    return train_task_model(config, backbone=backbone, progress=events.append), events


def test_loss_falls_and_validation_runs(trained):
    result, events = trained
    assert len(result.losses) == 40
    first, last = result.loss_drop(10)
    assert last < 0.8 * first, (first, last)
    assert result.train_cases == ["case_000", "case_001"] and result.val_cases == ["case_002"]
    assert [v.iteration for v in result.validations] == [20, 40]
    assert all(set(v.dice) <= {1, 2, 3} and 0.0 <= v.mean_dice <= 1.0 for v in result.validations)
    best = max(result.validations, key=lambda v: v.mean_dice)
    assert result.best_iteration == best.iteration
    stages = {e.stage for e in events}
    assert stages == {"embed", "train", "validate"}
    embeds = [e for e in events if e.stage == "embed"]
    assert embeds[-1].done == embeds[-1].total == 15  # every slice of the 3 cases, once


def test_task_model_file_holds_what_auto_segment_needs(trained, dataset):
    from sss_lib.pcsw import measure_class_ranges
    from sss_lib.task_model import load_task_model
    from sss_lib.volume_io import read_label

    result, _ = trained
    model = load_task_model(result.model_path, expected_backbone_sha256="random-init")
    assert model.class_names == CLASS_NAMES
    assert model.backbone.name == "sam2.1_hiera_tiny" and model.preprocessing.image_size == 64
    assert set(model.weights) == {"coarse_head", "prompt_encoder", "mask_decoder"}
    assert model.training.iterations == 40 and model.training.seed == 1 and model.training.n_labeled == 2
    assert model.validation is not None and model.validation.n_cases == 1
    kept = next(v for v in result.validations if v.iteration == result.best_iteration)
    assert model.validation.dice == pytest.approx(kept.dice)
    # The coarse head's own Dice on the same validation case is measured and the choice follows it.
    from sss_lib.class_source import choose_coarse_classes

    assert set(kept.coarse_dice) == set(kept.dice) and model.validation.coarse_dice == pytest.approx(kept.coarse_dice)
    assert model.coarse_classes == choose_coarse_classes(kept.dice, kept.coarse_dice)
    # PCSW ranges are measured on the training cases only.
    labels = [read_label(dataset / "labelsTr" / f"{c}.nii.gz") for c in result.train_cases]
    expected = measure_class_ranges([v.voxels for v in labels], [v.spacing for v in labels])
    assert set(model.volume_ranges_mm3) == set(expected) == {1, 2, 3}
    for label, (lo, hi) in expected.items():
        assert model.volume_ranges_mm3[label] == pytest.approx((lo, hi))


def test_auto_segment_loads_the_file_and_runs(trained, dataset, tmp_path):
    from sss_lib.auto_segment import auto_segment
    from sss_lib.volume_io import read_label, read_volume

    result, _ = trained
    image_path = dataset / "imagesTr" / "case_002_0000.nii.gz"
    seg, prompts = tmp_path / "seg.nii.gz", tmp_path / "prompts.json"
    run = auto_segment(image_path, result.model_path, seg, prompts, device="cpu")
    image, labels = read_volume(image_path), read_label(seg)
    assert image.same_grid(labels)
    assert set(np.unique(labels.voxels).tolist()) <= {0, 1, 2, 3}
    data = json.loads(prompts.read_text())
    prompted = {c["label"] for c in data["classes"]}
    assert prompted == set(run.prompts.by_label()) and prompted | set(run.absent) == {1, 2, 3}
    assert all(p["source"] == "auto" for c in data["classes"] for p in c["prompts"])
    assert sorted(run.recomputed) == sorted(prompted)


def test_same_seed_same_weights(dataset, backbone, tmp_path):
    weights = []
    for n in range(2):
        config = TrainConfig(dataset, tmp_path / f"m{n}.ssstask", iterations=3, seed=4, head_batch=2,
                             decoder_batch=1, head_width=16, val_cases=(), max_cases=1)
        result = train_task_model(config, backbone=backbone)
        assert result.validations == [] and result.model.validation is None
        weights.append(result.model.weights)
    for comp in ("coarse_head", "mask_decoder"):
        for key, value in weights[0][comp].items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(weights[1][comp][key]), err_msg=key)


def test_validation_split():
    cases = [Case(f"c{n}", Path(f"c{n}.nii.gz"), Path(f"l{n}.nii.gz")) for n in range(5)]
    train, val = split_cases(cases, None, 0.2)
    assert [c.case_id for c in val] == ["c4"] and len(train) == 4
    train, val = split_cases(cases, ("c1", "c3"), 0.2)
    assert [c.case_id for c in val] == ["c1", "c3"] and [c.case_id for c in train] == ["c0", "c2", "c4"]
    assert split_cases(cases[:1], None, 0.5) == (cases[:1], [])  # one case: nothing held out
    with pytest.raises(InputError, match="c9"):
        split_cases(cases, ("c9",), 0.2)
    with pytest.raises(InputError, match="no labeled case is left"):
        split_cases(cases[:2], ("c0", "c1"), 0.2)


def ring_slice() -> np.ndarray:
    """LV disk (3) inside a Myo ring (2), RV (1) to the left: a 40 x 40 label slice."""
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(xx - 24, yy - 20)
    lab = np.zeros((40, 40), np.int16)
    lab[r < 12] = 2
    lab[r < 7] = 3
    lab[(np.hypot(xx - 8, yy - 20) < 7) & (r >= 12)] = 1
    return lab


def test_key_prompts_follow_pcsw_rules():
    lab = ring_slice()
    rng = np.random.default_rng(0)
    jitter = PromptJitter(box_jitter_fraction=0.0, drop_negatives=0.0)
    for _ in range(20):
        box, pos, neg = key_prompt(lab, 2, rng, jitter)
        x0, y0, x1, y1 = box
        ys, xs = np.nonzero(lab == 2)
        assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()
        (px, py), = pos
        assert lab[int(py), int(px)] == 2  # in the wall, never in the hole
        assert sorted(int(lab[int(y), int(x)]) for x, y in neg) == [1, 3]  # one per other class in the box


def test_carried_points_keep_a_ring_a_ring():
    from sss_lib.backbones.litemedsam_propagate import carried_points

    lab = ring_slice()
    (px, py), = carried_points(lab == 2)[0]
    assert lab[int(py), int(px)] == 2
    (nx, ny), = carried_points(lab == 2)[1]
    assert lab[int(ny), int(nx)] == 3  # in the hole: the blood pool
    positive, negative = carried_points(lab == 3)
    assert negative == [] and lab[int(positive[0][1]), int(positive[0][0])] == 3


def test_carried_samples_cover_the_end_of_a_structure():
    lab = ring_slice()
    stack = np.stack([lab, lab, np.where(lab == 1, 0, lab)])  # the RV ends after slice 1
    rng = np.random.default_rng(2)
    box = carried_box(lab == 3, rng, PromptJitter(carry_jitter_px=0.0))
    assert box[0] < 24 - 7 and box[2] > 24 + 7
    index = ClassIndex.build([stack], [1, 2, 3])
    assert index.present[1] == [(0, 0), (0, 1)]
    samples = draw_samples([stack], index, 300, rng, PromptJitter(), carry_fraction=1.0, spacings_xy=[(1.0, 1.0)])
    assert {s.kind for s in samples} == {"carried"}
    ended = [s for s in samples if s.label == 1 and s.slice_index == 2]
    assert ended and all(not s.target.any() for s in ended)
    assert all(not s.positive and not s.negative for s in samples)
