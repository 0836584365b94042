"""The confirmation-bias guard: per-class baselines and drops; a wrong teacher that would erase a
class (the myocardium) does so without the guard and not with it; the training loop validates at
the end of the warm-up, checkpoints the guard and its anchor, and resumes it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from sss_lib.phantoms_cardiac import make_hard_cardiac_case
from sss_lib.semisup.guard import ClassGuard, guarded_trust
from sss_lib.trainer.semisup_step import consistency_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_baselines_come_from_the_warmup_and_a_falling_class_is_dropped_once():
    guard = ClassGuard([1, 2, 3], warmup=10, margin=0.05)
    assert not guard.observe(5, {1: 0.7, 2: 0.60, 3: 0.9}).dropped
    assert not guard.observe(10, {1: 0.8, 2: 0.55, 3: 0.9}).dropped
    assert guard.baseline == {1: 0.8, 2: 0.60, 3: 0.9}  # the best warm-up value of each class
    d = guard.observe(20, {1: 0.76, 2: 0.30, 3: 0.95})  # RV within the margin, Myo far below
    assert d.dropped == {2: (0.30, 0.60)} and guard.dropped == {2: 20}
    assert "Myo 0.300 < warm-up 0.600" in d.describe({2: "Myo"})
    assert guard.dropped_channels() == [2]
    assert not guard.observe(30, {2: 0.1, 3: float("nan")}).dropped  # dropped once; NaN ignored
    back = ClassGuard([1, 2, 3], warmup=10)
    back.load_state_dict(guard.state_dict())
    assert back.baseline == guard.baseline and back.dropped == guard.dropped
    with pytest.raises(ValueError, match="margin"):
        ClassGuard([1], warmup=0, margin=-1)


def _features(truth: torch.Tensor) -> torch.Tensor:
    """Features that say the class, blurred by noise: a 1x1 "head" can learn any class mapping."""
    return (torch.nn.functional.one_hot(truth, 4).permute(2, 0, 1).float() + 0.3 * torch.randn(4, *truth.shape))[None]


def _train(head: torch.nn.Module, labeled: tuple[torch.Tensor, torch.Tensor],
           unlabeled: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], steps: int = 80) -> torch.nn.Module:
    """``head`` trained on the supervised loss of one labeled slice plus the unsupervised loss of
    each unlabeled slice ``(features, pseudo-label, trusted)``, as a training step weighs them
    once the ramp is done (lambda_u = 1; more unlabeled slices than labeled, as in semi-supervision)."""
    head = copy.deepcopy(head)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(labeled[0]), labeled[1][None])
        for feats, pseudo, trusted in unlabeled:
            loss = loss + consistency_loss(head(feats), pseudo[None], trusted[None])
        loss.backward()
        opt.step()
    return head


def test_a_wrong_teacher_erases_the_myocardium_without_the_guard_and_not_with_it():
    torch.manual_seed(0)
    labels = make_hard_cardiac_case(3, size=(64, 64), fov_mm=150.0, sub_slices=1).labels.voxels
    order = np.argsort(-(labels == 2).sum(axis=(1, 2)))
    truths = [torch.from_numpy(labels[int(k)].astype(np.int64)) for k in order[:4]]
    feats = [_features(t) for t in truths]
    head = torch.nn.Conv2d(4, 4, 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):  # the supervised warm-up on the labeled slice: the head learns every class
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats[0]), truths[0][None]).backward()
        opt.step()

    def myo_dice(model: torch.nn.Module) -> float:
        """Myo Dice on the unlabeled slices."""
        pred = torch.cat([model(f).argmax(dim=1) for f in feats[1:]])
        truth = torch.stack(truths[1:])
        a, b = pred == 2, truth == 2
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    warm = myo_dice(head)
    assert warm > 0.9
    # A confidently wrong teacher: the myocardium is LV in its pseudo-labels, every pixel trusted.
    pseudo = [torch.where(t == 2, torch.tensor(3), t) for t in truths[1:]]
    everywhere = torch.ones_like(truths[0], dtype=torch.bool)
    unguarded = _train(head, (feats[0], truths[0]), [(f, p, everywhere) for f, p in zip(feats[1:], pseudo)])
    assert myo_dice(unguarded) < 0.2, "without a guard the pseudo-labels erase the class"

    guard = ClassGuard([1, 2, 3], warmup=60)
    guard.observe(60, {1: 1.0, 2: warm, 3: 1.0})
    assert guard.observe(80, {1: 1.0, 2: 0.4, 3: 1.0}).dropped  # validation sees the Myo falling
    with torch.no_grad():
        anchors = [head(f).argmax(dim=1)[0] for f in feats[1:]]  # the frozen warm-up model's answers
    trusted = [guarded_trust(everywhere, p, guard.dropped_channels(), a) for p, a in zip(pseudo, anchors)]
    guarded = _train(head, (feats[0], truths[0]), list(zip(feats[1:], pseudo, trusted)))
    assert myo_dice(guarded) > 0.85, "the guard keeps the class the supervised model sees"


def test_the_loop_validates_at_the_warmup_end_and_checkpoints_the_guard(tmp_path: Path, backbone):
    from test_semisup_train import PHANTOM, train

    from sss_lib.phantoms import make_phantom_dataset
    from sss_lib.runs.checkpoint import load_checkpoint

    lab = make_phantom_dataset(tmp_path / "lab", 3, seed=3, **PHANTOM)
    unl = make_phantom_dataset(tmp_path / "unl", 2, seed=4, layout="plain", labeled=False, **PHANTOM)
    train(tmp_path / "on", lab, unl, backbone, iterations=4)
    from sss_lib.runs.history import read_history

    vals = [r.step for r in read_history(tmp_path / "on" / "history.jsonl") if r.event == "val"]
    assert vals == [3, 4], "the guard's baselines need a validation at the warm-up's last step"
    extra = load_checkpoint(tmp_path / "on" / "checkpoints" / "last.pt")["extra"]["guard"]
    assert set(extra["guard"]["baseline"]) <= {"1", "2", "3"} and extra["guard"]["baseline"]
    assert extra["anchor"] and any(k.startswith("coarse_head.") for k in extra["anchor"])
    # Without the guard there is no early validation and nothing to checkpoint (the run's own
    # validation comes at val_every or the end).
    from sss_lib.trainer.semisup_config import SemiSupConfig

    config = SemiSupConfig.from_dict({**_config_dict(tmp_path / "on"), "schema": "sss.semisup-config/2"})
    assert not config.class_guard, "a run started before the guard existed resumes without it"


def _config_dict(run_dir: Path) -> dict:
    import json

    body = json.loads((run_dir / "config.json").read_text())["extra"]["trainer"]
    assert body.pop("schema") == "sss.semisup-config/4" and body.pop("class_guard") is True
    return body


def test_command_line_switch(tmp_path: Path):
    import argparse

    from sss_lib.trainer.run import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = ["--labeled", str(tmp_path / "lab"), "--run-dir", str(tmp_path / "run")]
    on = config_from_args(parser.parse_args(base))
    assert on.class_guard and on.guard_margin == 0.05
    off = config_from_args(parser.parse_args(base + ["--no-class-guard", "--guard-margin", "0.1"]))
    assert not off.class_guard and off.guard_margin == 0.1


def test_a_dropped_class_resets_the_teacher_to_the_best_validated_weights(tmp_path: Path):
    import types

    from torch import nn

    from sss_lib.runs.checkpoint import checkpoint_payload, save_checkpoint
    from sss_lib.runs.layout import RunPaths
    from sss_lib.semisup import EmaTeacher
    from sss_lib.trainer.config import TrainConfig
    from sss_lib.trainer.distributed import DistContext
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import _Run

    torch.manual_seed(0)
    student = nn.ModuleDict({"coarse_head": nn.Conv2d(2, 3, 1)})
    best = {k: v.clone() for k, v in student.state_dict().items()}
    paths = RunPaths.of(tmp_path / "run")
    paths.create()
    save_checkpoint(paths.best_checkpoint, checkpoint_payload(model=best, step=5, epoch=0, config={}))
    with torch.no_grad():
        student["coarse_head"].weight.add_(1.0)  # the run went on and the teacher followed it
    stepper = types.SimpleNamespace(guard=ClassGuard([1, 2], warmup=5), teacher=EmaTeacher(student, 0.9),
                                    device=torch.device("cpu"))
    cfg = SemiSupConfig(train=TrainConfig(tmp_path, tmp_path / "m.ssstask"), run_dir=paths.root)
    run = _Run(cfg, paths, DistContext(), reporter=None, stop=None, say=print)  # type: ignore[arg-type]
    run.best_step = 5
    assert run._guard(stepper, 5, {1: 0.8, 2: 0.6}, {2: "Myo"}) == ""  # the warm-up's baselines
    assert run._guard(stepper, 10, {1: 0.79, 2: 0.58}, {2: "Myo"}) == ""  # within the margin
    assert not torch.equal(stepper.teacher.module["coarse_head"].weight, best["coarse_head.weight"])
    text = run._guard(stepper, 15, {1: 0.8, 2: 0.2}, {2: "Myo"})
    assert "Myo 0.200 < warm-up 0.600" in text and "teacher reset to step 5" in text
    assert torch.equal(stepper.teacher.module["coarse_head"].weight, best["coarse_head.weight"])
