"""The unsupervised consistency loss and the ramp-up of its weight (SSS_METHOD.md section 4).

Shapes: student logits ``(B, C, H, W)`` (channel 0 = background), pseudo-labels ``(B, H, W)`` long,
masks ``(B, H, W)`` bool (True = the pixel's pseudo-label is trusted).

Normalisation, as UniMatch (ACDC) does it: the cross-entropy is summed over trusted pixels and
divided by *all* pixels, so the unsupervised loss grows as the teacher becomes confident; the Dice
term is computed on trusted pixels only. A pixel outside the mask contributes nothing to either
term, and a batch with no trusted pixel gives exactly 0 (with a zero gradient), never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SMOOTH = 1.0


def masked_cross_entropy(logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-pixel cross-entropy over trusted pixels / number of pixels (a scalar)."""
    _check(logits, pseudo_label, mask)
    target = torch.where(mask, pseudo_label, torch.zeros_like(pseudo_label))
    ce = F.cross_entropy(_inside(logits, mask), target.long(), reduction="none")
    return torch.where(mask, ce, torch.zeros_like(ce)).sum() / mask.numel()


def masked_dice(logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss over the foreground classes (1..C-1), computed on trusted pixels only.

    Per class ``1 - (2 * |P * T| + 1) / (|P| + |T| + 1)`` over the whole batch, averaged over
    classes; a class absent from both prediction and pseudo-label in the trusted pixels scores 0.
    """
    _check(logits, pseudo_label, mask)
    n_classes = logits.shape[1]
    keep = mask.unsqueeze(1).to(torch.float32)
    prob = torch.softmax(_inside(logits, mask), dim=1) * keep
    onehot = F.one_hot(torch.where(mask, pseudo_label, 0).long(), n_classes).permute(0, 3, 1, 2) * keep
    if n_classes < 2:
        return prob.sum() * 0.0
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)[1:]
    denom = (prob.sum(dims) + onehot.sum(dims))[1:]
    return (1.0 - (2.0 * inter + _SMOOTH) / (denom + _SMOOTH)).mean()


def masked_consistency_loss(logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + Dice of the student's logits against the pseudo-label on trusted pixels."""
    return masked_cross_entropy(logits, pseudo_label, mask) + masked_dice(logits, pseudo_label, mask)


def sigmoid_rampup(step: float, length: float) -> float:
    """The sigmoid-shaped ramp of Laine & Aila (2017): ``exp(-5 (1 - t)^2)``, ``t = clip(step / length, 0, 1)``.

    0.0067 at ``step = 0``, 1 from ``step = length`` on; ``length <= 0`` gives 1 at once.
    """
    if length <= 0:
        return 1.0
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def unsupervised_weight(step: int, *, warmup_steps: int = 0, rampup_steps: int = 0, lambda_u: float = 1.0) -> float:
    """lambda_u at ``step`` (0-based): 0 during the supervised-only warm-up (``step < warmup_steps``),
    then ``lambda_u * sigmoid_rampup(step - warmup_steps, rampup_steps)``."""
    if step < warmup_steps:
        return 0.0
    return lambda_u * sigmoid_rampup(step - warmup_steps, rampup_steps)


def _inside(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 logits with every untrusted pixel set to 0: where() cuts both its value and its
    gradient, so nothing outside the mask (not even a NaN) reaches the loss."""
    return torch.where(mask.unsqueeze(1), logits.float(), torch.zeros((), device=logits.device))


def _check(logits: torch.Tensor, pseudo_label: torch.Tensor, mask: torch.Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got {tuple(logits.shape)}")
    expected = (logits.shape[0], logits.shape[2], logits.shape[3])
    if tuple(pseudo_label.shape) != expected or tuple(mask.shape) != expected:
        raise ValueError(f"pseudo_label {tuple(pseudo_label.shape)} and mask {tuple(mask.shape)} must both be "
                         f"(B, H, W) = {expected}")
    if mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor (True = trusted pixel)")
