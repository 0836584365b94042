"""Semi-supervised training (SSS_METHOD.md sections 3-4): SSL steps with finite losses and a
non-zero unsupervised loss after the warm-up; the ablations; the teacher's slice prompts; the
confidence mask and CutMix label mixing end to end on hand-built slices; clear errors for bad data.

The backbone is SAM-2.1 tiny at random init with a 64 px input (embeddings take ~0.1 s), on
48 x 48 phantoms of 5 slices, so each run takes seconds.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sss_lib.errors import InputError
from sss_lib.phantoms import make_cardiac_phantom, make_phantom_dataset
from sss_lib.runs.history import read_history
from sss_lib.runs.progress import ProgressReporter
from sss_lib.trainer.config import TrainConfig
from sss_lib.trainer.semisup_config import SemiSupConfig
from sss_lib.trainer.semisup_loop import run_training
from sss_lib.trainer.semisup_step import agreeing, coarse_channels, cutmix_features, feature_boxes, teacher_targets
from sss_lib.trainer.slice_prompts import box_slice_plans, pcsw_slice_plans

PHANTOM = dict(n_slices=5, size=(48, 48), spacing=(4.0, 4.0, 8.0))


# One torch thread, and a fresh random-init SAM-2.1 tiny ``backbone`` for this module: tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ssl_data")
    lab = make_phantom_dataset(root / "lab", 3, seed=3, **PHANTOM)
    unl = make_phantom_dataset(root / "unl", 2, seed=4, layout="plain", labeled=False, **PHANTOM)
    return lab, unl


def train(run_dir: Path, lab: Path, unl: Path | None, backbone, *, iterations: int = 7,  # noqa: ANN001
          val: tuple[str, ...] = ("case_002",), val_every: int = 100, **overrides):
    config = TrainConfig(lab, run_dir / "model.ssstask", backbone="sam2.1_hiera_tiny", device="cpu", image_size=64,
                         iterations=iterations, seed=1, head_batch=2, decoder_batch=2, head_width=16,
                         val_cases=val, val_every=val_every)
    settings = dict(warmup_iterations=3, warmup_until_plateau=False, rampup_iterations=0, unlabeled_batch=2,
                    checkpoint_every=100)
    settings.update(overrides)
    cfg = SemiSupConfig(train=config, run_dir=run_dir, unlabeled=unl, **settings)
    reporter = ProgressReporter(cfg.total_steps, json_lines=False, console_view=False, history=run_dir / "history.jsonl")
    outcome = run_training(cfg, backbone=backbone, reporter=reporter)
    steps = [r for r in read_history(run_dir / "history.jsonl") if r.event == "step"]
    return outcome, steps


def _truth_probabilities(monkeypatch, unl: Path) -> None:
    """Make the teacher's coarse head perfect on the unlabeled phantoms (their labels are known),
    so PCSW accepts every structure and the decoder's consistency term has prompts to work with."""
    import sss_lib.coarse_head as coarse_head
    from sss_lib.volume_io import read_volume

    truth = {}
    for n in range(2):
        image = read_volume(unl / "images" / f"case_{n:03d}.nii.gz")
        _, labels = make_cardiac_phantom(4 * 1000 + n, **PHANTOM)
        truth[image.content_hash()] = labels.voxels
    real = coarse_head.stack_probabilities

    def fake(head, geometry, lookup, stack_shape, labels):  # noqa: ANN001, ANN202
        session = getattr(lookup, "__self__", None)
        voxels = truth.get(session.volume.content_hash()) if session is not None else None
        if voxels is None:
            return real(head, geometry, lookup, stack_shape, labels)
        stack = session.slice_axis.to_stack(voxels)
        return {lbl: (stack == lbl).astype(np.float32) * 0.98 + 0.01 for lbl in labels}

    monkeypatch.setattr(coarse_head, "stack_probabilities", fake)


def test_ssl_steps_are_finite_and_the_unsupervised_loss_starts_after_warmup(data, backbone, tmp_path, monkeypatch):
    lab, unl = data
    _truth_probabilities(monkeypatch, unl)
    # An untrained decoder is never confident: trust every pixel to exercise the whole path.
    outcome, steps = train(tmp_path / "run", lab, unl, backbone, confidence=0.0)
    assert outcome.status == "done" and outcome.step == 7 and len(steps) == 7
    assert outcome.unlabeled_cases == ["case_000", "case_001"]
    for r in steps:
        for key in ("total", "sup", "head", "decoder"):
            assert math.isfinite(r.losses[key]), (r.step, key, r.losses)
    warm, ssl = steps[:3], steps[3:]
    assert all(r.losses["unsup"] is None for r in warm)  # None = NaN: no unsupervised term yet
    assert all(r.losses["unsup"] is not None and r.losses["unsup"] > 0 for r in ssl)
    assert all(r.losses["total"] > r.losses["sup"] for r in ssl)
    assert all(0.0 < r.mask_ratio <= 1.0 for r in ssl)
    # Prompts reached the student's decoder, and its DFE-enhanced views gave a finite, positive term.
    assert outcome.last["unsup_decoder"] > 0 and math.isfinite(outcome.last["unsup_head"])
    # The decoder learns only where the (here perfect) coarse head agrees with the untrained decoder's
    # pseudo-label: some pixels, not all of the trusted ones.
    assert 0.0 < outcome.last["decoder_trust"] < outcome.last["mask_ratio"]

    from sss_lib.task_model import load_task_model

    model = load_task_model(outcome.model_path, expected_backbone_sha256="random-init")
    assert set(model.weights) == {"coarse_head", "dfe", "prompt_encoder", "mask_decoder"}
    # Inference reads the coarse head's features through the trained DFE, as training did.
    from sss_lib.auto_segment import TaskRuntime
    from sss_lib.semisup import DfeCoarseHead

    runtime = TaskRuntime.from_task_model(model, backbone=backbone)
    assert isinstance(runtime.head, DfeCoarseHead)
    for name, value in runtime.head.dfe.state_dict().items():
        np.testing.assert_array_equal(value.cpu().numpy(), model.weights["dfe"][name])
    assert model.training.n_unlabeled == 2 and "semi-supervised (DFE on, PCSW on)" in model.training.notes
    # The kept validation's coarse-head Dice is stored, and the coarse classes follow from it.
    from sss_lib.class_source import choose_coarse_classes

    assert model.validation is not None and set(model.validation.coarse_dice) == set(model.validation.dice)
    assert model.coarse_classes == choose_coarse_classes(model.validation.dice, model.validation.coarse_dice)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert (tmp_path / "run" / "config.json").is_file()
    # The optimiser's groups: coarse head, DFE (a tenth of the head's rate by default), decoder.
    import torch

    groups = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])


def test_ablations(data, backbone, tmp_path, monkeypatch):
    lab, unl = data
    _truth_probabilities(monkeypatch, unl)
    no_dfe, steps = train(tmp_path / "nodfe", lab, unl, backbone, iterations=5, use_dfe=False, use_pcsw=False,
                          confidence=0.0, teacher_points=False)
    assert no_dfe.last["unsup"] > 0 and no_dfe.last["unsup_decoder"] > 0
    disagreeing, _ = train(tmp_path / "all", lab, unl, backbone, iterations=5, confidence=0.0, decoder_agreement=False)
    assert disagreeing.last["decoder_trust"] == pytest.approx(disagreeing.last["mask_ratio"])
    from sss_lib.task_model import load_task_model

    assert "dfe" not in load_task_model(no_dfe.model_path, expected_backbone_sha256="random-init").weights
    sup, steps = train(tmp_path / "sup", lab, unl, backbone, iterations=4, consistency=False)
    assert sup.unlabeled_cases == [] and all(r.losses["unsup"] is None for r in steps)
    assert all(r.losses["total"] == pytest.approx(r.losses["sup"]) for r in steps)


def cylinder_probabilities() -> dict[int, np.ndarray]:
    """Class 1: a disk on slices 1-6 of 8 plus a stray blob on slice 7; class 2: one blob on slice 3."""
    s, h, w = 8, 32, 32
    yy, xx = np.mgrid[:h, :w]
    p1 = np.full((s, h, w), 0.02, np.float32)
    p2 = np.full((s, h, w), 0.02, np.float32)
    for k in range(1, 7):
        p1[k][np.hypot(xx - 12, yy - 14) < 6] = 0.9
    p1[7][np.hypot(xx - 27, yy - 27) < 2] = 0.9
    p2[3][np.hypot(xx - 24, yy - 6) < 2] = 0.8
    return {1: p1, 2: p2}


def test_pcsw_slice_plans_prompt_the_accepted_structure_on_every_slice():
    probs = cylinder_probabilities()
    plans = pcsw_slice_plans(probs, range(8), in_plane_spacing=(1.0, 1.0), slice_spacing=2.0)
    for k in range(1, 7):
        p = plans[k].prompts[1]
        x0, y0, x1, y1 = p.box
        assert x0 <= 6 and x1 >= 17 and y0 <= 8 and y1 >= 19  # the disk plus PCSW's 3 px margin
        (px, py), = p.positive
        assert probs[1][k, int(py), int(px)] > 0.5
    assert 1 not in plans[0].prompts and 1 not in plans[7].prompts
    # Class 2 is a one-slice blob: PCSW does not accept it, so it is never prompted and its pixels
    # are not trusted; class 1's stray blob outside the structure is not trusted either.
    assert all(2 not in plan.prompts for plan in plans.values())
    assert plans[3].untrusted[6, 24] and plans[3].untrusted.sum() == (probs[2][3] > 0.5).sum()
    assert plans[7].untrusted[27, 27] and not plans[5].untrusted.any()
    boxes = box_slice_plans(probs, [3, 7])
    assert set(boxes[3].prompts) == {1, 2} and boxes[3].prompts[2].positive == [] and not boxes[3].untrusted.any()
    assert set(boxes[7].prompts) == {1}


def test_confidence_mask_and_cutmix_label_mixing_on_hand_built_slices():
    """Teacher logits -> pseudo-label and trust -> CutMix with the partner slice, checked pixel by pixel."""
    h = w = 8
    absent = -32.0
    a = torch.full((1, 2, h, w), absent)
    a[0, 0, :, :4] = 10.0   # class 1 on the left half, confidently
    a[0, 0, :, 4] = 0.5     # an unsure column: not trusted
    b = torch.full((1, 2, h, w), absent)
    b[0, 1, :4, :] = 10.0   # class 2 on the top half
    untrusted_a = np.zeros((h, w), bool)
    untrusted_a[7, 7] = True  # the prompts cannot vouch for this pixel
    pa, ta = teacher_targets(a, untrusted_a, 0.95)
    pb, tb = teacher_targets(b, np.zeros((h, w), bool), 0.95)
    assert pa[:, :4].eq(1).all() and pa[:, 5:].eq(0).all() and pb[:4].eq(2).all() and pb[4:].eq(0).all()
    assert not ta[:, 4].any() and not ta[7, 7] and ta.sum() == h * w - h - 1 and tb.all()

    # One feature level 4x4 over the 8x8 slice (2 px per feature cell), as a padded-free backbone.
    fa = [torch.zeros(1, 3, 4, 4)]
    fb = [torch.ones(1, 3, 4, 4)]
    grid = lambda m: F.interpolate(m, size=(h, w), mode="nearest")  # noqa: E731
    draws = torch.tensor([0.62, 0.5, 0.0, 0.99])  # a 2x2-cell box in the bottom-left corner
    view = cutmix_features(fa, [x + 5 for x in fa], pa, ta, fb, [x + 5 for x in fb], pb, tb, draws, grid)
    box = view.box
    assert box.sum() == 16 and box[4:, :4].all()  # 2x2 cells = 4x4 slice pixels, bottom left
    cells = feature_boxes([(4, 4)], draws)[0][0, 0]
    assert torch.equal(view.weak[0][0, 0] == 1, cells) and torch.equal(view.strong[0][0, 0] == 6, cells)
    assert torch.equal(view.pseudo[box], pb[box]) and torch.equal(view.pseudo[~box], pa[~box])
    assert torch.equal(view.trusted[box], tb[box]) and torch.equal(view.trusted[~box], ta[~box])
    # Inside the box the partner's (confident background) wins even over class 1 of the slice itself.
    assert view.pseudo[4:, :4].eq(0).all() and view.trusted[4:, :4].all()


def test_decoder_trust_needs_the_coarse_head_to_agree_with_the_pseudo_label():
    h = w = 6
    probs = {4: np.zeros((2, h, w), np.float32), 9: np.zeros((2, h, w), np.float32)}
    probs[4][1, :, :2] = 0.9          # the head says class 4 (channel 1) on the left
    probs[9][1, :, 4:] = 0.6          # class 9 (channel 2) on the right
    probs[4][1, :, 4:] = 0.3          # ... where class 4 is second
    probs[9][1, 0, 2] = 0.45          # and a pixel where no class beats background (0.55)
    coarse = coarse_channels(probs, 1, [4, 9])
    assert (coarse[:, :2] == 1).all() and (coarse[:, 4:] == 2).all() and (coarse[:, 2:4] == 0).all() and coarse.dtype == np.int64
    assert (coarse_channels(probs, 0, [4, 9]) == 0).all()

    logits = torch.full((1, 2, h, w), -32.0)
    logits[0, 0, :, :3] = 10.0  # the decoder's class 4 reaches one column further than the head's
    logits[0, 1, :, 4:] = 10.0
    pseudo, trusted = teacher_targets(logits, np.zeros((h, w), bool), 0.95)
    assert trusted.all()
    agreed = agreeing(pseudo, trusted, coarse)
    assert agreed[:, :2].all() and not agreed[:, 2].any() and agreed[:, 3:].all()


def test_feature_boxes_cover_the_same_region_on_every_level():
    levels = feature_boxes([(16, 16), (8, 8), (4, 4)], torch.tensor([0.3, 0.2, 0.6, 0.1]))
    coarse = levels[-1][0, 0].float()
    for level in levels[:-1]:
        down = F.max_pool2d(level[0].float(), level.shape[-1] // 4)[0]
        assert torch.equal(down, coarse)
        assert level.sum() == coarse.sum() * (level.shape[-1] // 4) ** 2


def test_bad_data_errors(data, backbone, tmp_path, caplog):
    from sss_lib.volume_io import read_label, write_volume

    lab, unl = data
    with pytest.raises(InputError, match="has no labeled cases"):
        train(tmp_path / "a", unl, None, backbone)

    # Labels that disagree between cases of an undeclared (plain) dataset.
    plain = make_phantom_dataset(tmp_path / "plain", 2, seed=5, layout="plain", **PHANTOM)
    label = read_label(plain / "labels" / "case_001.nii.gz")
    write_volume(label.with_voxels(np.where(label.voxels == 3, 0, label.voxels).astype(np.uint8)),
                 plain / "labels" / "case_001.nii.gz")
    with pytest.raises(InputError, match="disagree about their classes"):
        train(tmp_path / "b", plain, None, backbone, iterations=1, val=("case_001",))

    # An unreadable labeled case: stop names the file, skip trains on the others with a warning.
    broken = make_phantom_dataset(tmp_path / "broken", 3, seed=6, **PHANTOM)
    (broken / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(InputError, match="case_001_0000"):
        train(tmp_path / "c", broken, None, backbone, iterations=1)
    with caplog.at_level(logging.WARNING):
        outcome, _ = train(tmp_path / "d", broken, None, backbone, iterations=1, on_bad_case="skip")
    assert outcome.status == "done" and outcome.train_cases == ["case_000"] and outcome.val_cases == ["case_002"]
    assert any("skipping case case_001" in r.getMessage() for r in caplog.records)

    with pytest.raises(InputError, match="already holds a training run"):
        train(tmp_path / "d", broken, None, backbone, iterations=1, on_bad_case="skip")


def test_config_round_trips_through_the_run_folder_json(tmp_path):
    """``--resume`` rebuilds the run from config.json: every setting must come back unchanged."""
    from sss_lib.pcsw import PcswConfig
    from sss_lib.runs.config import RunConfig
    from sss_lib.trainer.samples import PromptJitter
    from sss_lib.trainer.semisup_config import StrongViewSettings

    train_cfg = TrainConfig(tmp_path / "lab", tmp_path / "run" / "m.ssstask", val_cases=("a", "b"), window=(-200.0, 300.0),
                            pcsw=PcswConfig(tau=0.7), jitter=PromptJitter(box_margin_px=5), iterations=77)
    cfg = SemiSupConfig(train=train_cfg, run_dir=tmp_path / "run", unlabeled=tmp_path / "unl", use_dfe=False,
                        warmup_iterations=9, confidence=0.9, untrusted_floor=0.2, strong_views=3, dfe_width=32,
                        strong=StrongViewSettings(gamma=(0.8, 1.2)), unsup_decoder_classes=1)
    path = cfg.to_run_config().save()
    back = SemiSupConfig.from_run_config(RunConfig.load(path.parent), path)
    assert back == cfg
    assert back.total_steps == 77 and back.warmup == 9 and back.rampup == round(0.2 * 77) and back.floor == 0.2
    # A run started by the previous version resumes with that version's settings.
    older = {k: v for k, v in cfg.to_dict().items() if k != "decoder_agreement"}
    older.update(schema="sss.semisup-config/1", lr_dfe=None)
    old = SemiSupConfig.from_dict(older)
    assert not old.decoder_agreement and old.dfe_lr == train_cfg.lr_head
    assert cfg.decoder_agreement and cfg.dfe_lr == pytest.approx(0.1 * train_cfg.lr_head)
    with pytest.raises(InputError, match="confidence"):
        SemiSupConfig(train=train_cfg, run_dir=tmp_path, confidence=1.5)


def test_dfe_and_agreement_defaults_and_their_command_line_switches(tmp_path):
    """The defaults the benchmark chose (DFE gain from 0 at a tenth of the head's rate, decoder
    agreement on) and the options that turn each back."""
    import argparse

    from sss_lib.trainer.run import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = ["--labeled", str(tmp_path / "lab"), "--run-dir", str(tmp_path / "run"), "--lr-head", "0.002"]
    cfg = config_from_args(parser.parse_args(base))
    assert cfg.dfe_zero_init_gain and cfg.decoder_agreement and cfg.lr_dfe is None
    assert cfg.dfe_lr == pytest.approx(0.0002)
    spec = config_from_args(parser.parse_args(base + ["--no-dfe-zero-init-gain", "--no-decoder-agreement",
                                                      "--lr-dfe", "0.002"]))
    assert not spec.dfe_zero_init_gain and not spec.decoder_agreement and spec.dfe_lr == pytest.approx(0.002)


def test_consistency_dice_leaves_classes_the_slice_does_not_show_alone():
    from sss_lib.semisup import masked_consistency_loss, masked_cross_entropy
    from sss_lib.trainer.semisup_step import consistency_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 6, 6, generator=g)
    trusted = torch.ones(1, 6, 6, dtype=torch.bool)
    trusted[0, 0, 0] = False
    both = torch.zeros(1, 6, 6, dtype=torch.long)
    both[0, :3] = 1
    both[0, 4:, 4:] = 2
    # Every class shown: the same as the library's masked loss.
    assert consistency_loss(logits, both, trusted) == pytest.approx(float(masked_consistency_loss(logits, both, trusted)))
    # Class 2 absent from the pseudo-label: its Dice is left out, class 1's stays.
    one = torch.where(both == 2, 0, both)
    ce = float(masked_cross_entropy(logits, one, trusted))
    value = float(consistency_loss(logits, one, trusted))
    assert ce < value < float(masked_consistency_loss(logits, one, trusted))
    # Nothing but background: cross-entropy only, and no gradient pushes on what is not trusted.
    none = torch.zeros(1, 6, 6, dtype=torch.long)
    leaf = logits.clone().requires_grad_(True)
    loss = consistency_loss(leaf, none, trusted)
    assert loss.item() == pytest.approx(float(masked_cross_entropy(logits, none, trusted)))
    loss.backward()
    assert leaf.grad is not None and leaf.grad[0, :, 0, 0].abs().sum() == 0


def test_teacher_prompts_keep_points_only_where_the_decoder_learned_them():
    from sss_lib.trainer.adapters import LiteMedSamAdapter, Sam2Adapter
    from sss_lib.trainer.semisup_step import boxes_only_plan
    from sss_lib.trainer.slice_prompts import ClassPrompt, SlicePlan

    assert Sam2Adapter.knows_points and not LiteMedSamAdapter.knows_points
    untrusted = np.zeros((4, 4), bool)
    plan = SlicePlan({1: ClassPrompt((0.0, 0.0, 3.0, 3.0), [(1.0, 1.0)], [(2.0, 2.0)]),
                      2: ClassPrompt((1.0, 1.0, 2.0, 2.0), [(1.5, 1.5)], [])}, untrusted)
    boxes = boxes_only_plan(plan)
    assert {k: p.box for k, p in boxes.prompts.items()} == {k: p.box for k, p in plan.prompts.items()}
    assert all(not p.positive and not p.negative for p in boxes.prompts.values())
    assert boxes.untrusted is untrusted and plan.prompts[1].positive == [(1.0, 1.0)]  # the original is unchanged


def test_strong_view_settings_mirror_the_augmentation():
    import dataclasses

    from sss_lib.semisup import StrongAugment
    from sss_lib.trainer.semisup_config import StrongViewSettings

    assert dataclasses.asdict(StrongViewSettings()) == dataclasses.asdict(StrongAugment())
    built = StrongViewSettings(blur_p=0.1).build()
    assert isinstance(built, StrongAugment) and built.blur_p == 0.1
