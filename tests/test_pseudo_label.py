"""Pseudo-labels, the masked consistency loss, the lambda_u ramp and the EMA teacher on hand-built tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sss_lib.semisup import (
    EmaTeacher,
    confidence_mask,
    masked_consistency_loss,
    masked_cross_entropy,
    masked_dice,
    object_probabilities,
    sigmoid_rampup,
    unsupervised_weight,
    with_background_logit,
)

torch.set_num_threads(1)


def test_confidence_mask_values() -> None:
    # One row of 4 pixels, 3 classes; max probabilities 0.96, 0.95, 0.94, 0.50.
    probs = torch.tensor([[0.02, 0.96, 0.02], [0.95, 0.03, 0.02], [0.03, 0.03, 0.94], [0.25, 0.25, 0.50]])
    probs = probs.T.reshape(1, 3, 1, 4)
    label, mask = confidence_mask(probs, threshold=0.95)
    assert label.tolist() == [[[1, 0, 2, 2]]]
    assert mask.tolist() == [[[True, True, False, False]]]
    assert label.dtype == torch.long and mask.dtype == torch.bool
    assert confidence_mask(probs, threshold=0.5)[1].all()


def test_object_logits_follow_the_volume_rule() -> None:
    # Per-object logits of 2 objects at 3 pixels: both below 0, object 1 highest, object 2 highest.
    logits = torch.tensor([[-1.0, 2.0, 1.0], [-0.5, 0.5, 3.0]]).view(1, 2, 1, 3)
    probs = object_probabilities(logits)
    assert probs.shape == (1, 3, 1, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 1, 3))
    assert probs.argmax(1).tolist() == [[[0, 1, 2]]]
    one = torch.tensor([-2.0, 0.0, 4.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(object_probabilities(one)[:, 1], torch.sigmoid(one)[:, 0])
    assert with_background_logit(one)[:, 0].abs().sum() == 0


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    label = torch.randint(0, 4, (2, 6, 6), generator=g)
    mask = torch.rand(2, 6, 6, generator=g) < 0.5
    return logits, label, mask


def test_loss_ignores_masked_out_pixels() -> None:
    logits, label, mask = _batch()
    base = masked_consistency_loss(logits, label, mask)
    g = torch.Generator().manual_seed(1)
    other_logits = torch.where(mask.unsqueeze(1), logits, 50 * torch.randn(logits.shape, generator=g))
    other_label = torch.where(mask, label, (label + 1) % 4)
    torch.testing.assert_close(masked_consistency_loss(other_logits, other_label, mask), base)
    nan_outside = torch.where(mask.unsqueeze(1), logits, torch.full_like(logits, float("nan")))
    torch.testing.assert_close(masked_consistency_loss(nan_outside, label, mask), base)
    # Gradients: zero outside the mask, non-zero inside.
    x = logits.clone().requires_grad_()
    masked_consistency_loss(x, label, mask).backward()
    assert x.grad is not None
    assert (x.grad.permute(0, 2, 3, 1)[~mask] == 0).all() and x.grad.permute(0, 2, 3, 1)[mask].abs().sum() > 0


def test_loss_matches_hand_computation() -> None:
    logits, label, mask = _batch(2)
    ce = F.cross_entropy(logits, label, reduction="none")[mask].sum() / mask.numel()
    torch.testing.assert_close(masked_cross_entropy(logits, label, mask), ce)
    prob = torch.softmax(logits, 1).permute(0, 2, 3, 1)[mask]  # (N, C) trusted pixels
    onehot = F.one_hot(label[mask], 4).float()
    dice = torch.stack([1 - (2 * (prob[:, c] * onehot[:, c]).sum() + 1) / (prob[:, c].sum() + onehot[:, c].sum() + 1)
                        for c in range(1, 4)]).mean()
    torch.testing.assert_close(masked_dice(logits, label, mask), dice)


def test_all_masked_out_gives_zero_not_nan() -> None:
    logits, label, _ = _batch(3)
    x = logits.clone().requires_grad_()
    loss = masked_consistency_loss(x, label, torch.zeros(2, 6, 6, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() == 0


def test_perfect_confident_prediction_scores_near_zero() -> None:
    label = torch.randint(0, 3, (1, 5, 5), generator=torch.Generator().manual_seed(4))
    logits = 30.0 * F.one_hot(label, 3).permute(0, 3, 1, 2).float()
    assert masked_consistency_loss(logits, label, torch.ones_like(label, dtype=torch.bool)) < 1e-3
    with pytest.raises(ValueError, match="bool"):
        masked_consistency_loss(logits, label, torch.ones_like(label))


def test_sigmoid_rampup_and_unsupervised_weight() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(1000, 100) == 1.0
    assert sigmoid_rampup(5, 0) == 1.0
    values = [sigmoid_rampup(s, 100) for s in range(0, 101, 10)]
    assert values == sorted(values)
    assert unsupervised_weight(9, warmup_steps=10, rampup_steps=100) == 0.0
    assert unsupervised_weight(10, warmup_steps=10, rampup_steps=100, lambda_u=2.0) == pytest.approx(2 * math.exp(-5))
    assert unsupervised_weight(110, warmup_steps=10, rampup_steps=100, lambda_u=2.0) == 2.0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def test_ema_math() -> None:
    torch.manual_seed(0)
    student = _Net()
    teacher = EmaTeacher(student, decay=0.9, warmup=False)
    t0 = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        student.lin.weight.add_(1.0)
        student.bn.running_mean.fill_(2.0)
    student.bn.num_batches_tracked.fill_(7)
    assert teacher.update(student) == 0.9
    s = student.state_dict()
    torch.testing.assert_close(teacher.module.lin.weight, 0.9 * t0["lin.weight"] + 0.1 * s["lin.weight"])
    torch.testing.assert_close(teacher.module.bn.running_mean, 0.9 * t0["bn.running_mean"] + 0.1 * 2.0)
    assert int(teacher.module.bn.num_batches_tracked) == 7  # integer buffers are copied
    # The teacher is frozen, in eval mode, and separate from the student.
    assert not any(p.requires_grad for p in teacher.module.parameters())
    assert not teacher.module.training
    assert teacher.module.lin.weight.data_ptr() != student.lin.weight.data_ptr()


def test_ema_warmup_schedule_and_state_round_trip() -> None:
    student = _Net()
    teacher = EmaTeacher(student, decay=0.99)
    with torch.no_grad():
        student.lin.weight.fill_(3.0)
    assert teacher.update(student) == 0.0  # n = 1: copy
    torch.testing.assert_close(teacher.module.lin.weight, student.lin.weight)
    assert teacher.update(student) == 0.5
    assert teacher.current_decay() == pytest.approx(2 / 3)
    for _ in range(500):
        teacher.update(student)
    assert teacher.current_decay() == 0.99

    state = teacher.state_dict()
    other = EmaTeacher(_Net(), decay=0.5, warmup=False)
    other.load_state_dict(state)
    assert (other.decay, other.warmup, other.num_updates) == (0.99, True, 502)
    torch.testing.assert_close(other.module.lin.weight, teacher.module.lin.weight)
    x = torch.randn(4, 3)
    torch.testing.assert_close(other.module.lin(x), teacher.module.lin(x))
    with pytest.raises(ValueError, match="decay"):
        EmaTeacher(student, decay=1.0)
