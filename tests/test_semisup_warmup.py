"""The warm-up that ends at the validation plateau: the plan's rule, and the training loop
restarting consistency from the best validated weights (sss_lib/semisup/warmup.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from sss_lib.semisup.warmup import WarmupPlan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_warmup_ends_at_the_first_validation_after_the_minimum_that_does_not_improve():
    plan = WarmupPlan(min_steps=3, max_steps=9, val_every=2)
    assert not plan.decided and plan.supervised_only(100), "an open warm-up keeps every step supervised"
    assert not plan.observe(2, improved=False), "before the minimum nothing ends it"
    assert not plan.observe(4, improved=True)
    assert not plan.must_validate(4) and plan.must_validate(9)
    assert plan.observe(6, improved=False) and plan.end == 6
    assert "stopped improving at step 6" in plan.reason
    assert plan.supervised_only(6) and not plan.supervised_only(7)
    assert not plan.observe(8, improved=False) and plan.end == 6, "decided once"
    assert not plan.must_validate(9)


def test_the_warmup_ends_where_the_next_validation_would_pass_the_longest():
    plan = WarmupPlan(min_steps=2, max_steps=7, val_every=2)
    assert not plan.observe(4, improved=True)  # 6 <= 7: the next validation still fits
    assert plan.observe(6, improved=True) and plan.end == 6 and "longest warm-up" in plan.reason
    late = WarmupPlan(min_steps=2, max_steps=5, val_every=10)  # validations rarer than the warm-up
    assert late.must_validate(5) and late.observe(5, improved=True) and late.end == 5


def test_a_fixed_warmup_is_decided_from_the_start_and_the_state_round_trips():
    fixed = WarmupPlan(min_steps=4, max_steps=40, val_every=2, until_plateau=False)
    assert fixed.end == 4 and fixed.max_steps == 40 and not fixed.observe(6, improved=False)
    assert fixed.supervised_only(4) and not fixed.supervised_only(5) and not fixed.must_validate(40)
    assert WarmupPlan(5, 3, 1).max_steps == 5, "the longest is never shorter than the shortest"
    open_plan = WarmupPlan(3, 9, 2)
    open_plan.observe(4, improved=False)
    back = WarmupPlan(3, 9, 2)
    back.load_state_dict(open_plan.state_dict())
    assert (back.end, back.reason) == (4, open_plan.reason)
    with pytest.raises(ValueError, match="val_every"):
        WarmupPlan(1, 2, 0)


def test_the_command_line_switches_and_old_runs_keep_a_fixed_warmup(tmp_path: Path):
    from sss_lib.trainer.run import add_train_arguments, config_from_args
    from sss_lib.trainer.semisup_config import SemiSupConfig

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = ["--labeled", str(tmp_path / "lab"), "--run-dir", str(tmp_path / "run"), "--iterations", "100"]
    on = config_from_args(parser.parse_args(base))
    assert on.warmup_until_plateau and on.warmup == 20 and on.max_warmup == 50
    off = config_from_args(parser.parse_args(base + ["--no-warmup-until-plateau", "--max-warmup-fraction", "0.3"]))
    assert not off.warmup_until_plateau and off.max_warmup == 30
    body = on.to_dict()
    body.pop("warmup_until_plateau")
    assert SemiSupConfig.from_dict({**body, "schema": "sss.semisup-config/3"}).warmup_until_plateau is False
    with pytest.raises(Exception, match="max_warmup_fraction"):
        SemiSupConfig(train=on.train, run_dir=tmp_path, max_warmup_fraction=1.5)


def test_the_loop_ends_the_warmup_at_the_plateau_and_restarts_from_the_best_weights(tmp_path, backbone,
                                                                                   monkeypatch):
    """Validation is scripted (0.5, 0.7, 0.6 at steps 2, 4, 6): the warm-up must end at step 6, the
    student and teacher must start consistency from step 4's weights, the unsupervised loss must
    start at step 7, and the kept model is step 4's."""
    from test_semisup_train import PHANTOM, train

    from sss_lib.phantoms import make_phantom_dataset
    from sss_lib.runs.checkpoint import load_checkpoint
    from sss_lib.trainer import loop
    from sss_lib.trainer.config import ValidationRecord
    from sss_lib.trainer.semisup_step import SemiSupStepper

    scripted = {2: 0.5, 4: 0.7, 6: 0.6, 8: 0.65, 9: 0.66}
    monkeypatch.setattr(loop._Validator, "run",
                        lambda self, step, progress: ValidationRecord(step, {1: scripted[step]}, scripted[step], 0.0))
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real_end = SemiSupStepper.end_warmup

    def end_warmup(self, best_weights):  # noqa: ANN001, ANN202
        seen["best"] = {k: v.clone() for k, v in best_weights.items()}
        seen["before"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        real_end(self, best_weights)
        seen["student"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        seen["teacher"] = {k: v.detach().clone() for k, v in self.teacher.module.state_dict().items()}

    monkeypatch.setattr(SemiSupStepper, "end_warmup", end_warmup)
    lab = make_phantom_dataset(tmp_path / "lab", 3, seed=3, **PHANTOM)
    unl = make_phantom_dataset(tmp_path / "unl", 2, seed=4, layout="plain", labeled=False, **PHANTOM)
    outcome, steps = train(tmp_path / "run", lab, unl, backbone, iterations=9, warmup_until_plateau=True,
                           warmup_iterations=2, max_warmup_fraction=0.9, val_every=2, confidence=0.0)
    assert outcome.warmup_end == 6 and "stopped improving at step 6" in outcome.warmup_reason
    assert [r.losses["unsup"] is None for r in steps] == [True] * 6 + [False] * 3
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert kept["step"] == 4 and outcome.best_step == 4
    head = "coarse_head.out.weight" if "coarse_head.out.weight" in seen["best"] else next(
        k for k in seen["best"] if k.startswith("coarse_head."))
    assert not torch.equal(seen["before"][head], seen["best"][head]), "steps 5 and 6 moved the head"
    for name, value in kept["model"].items():
        assert torch.equal(seen["student"][name], value), name
        assert torch.equal(seen["teacher"][name], value), name
