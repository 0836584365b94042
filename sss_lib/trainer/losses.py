"""Losses: cross-entropy + Dice for the coarse head, BCE + Dice (+ IoU and object heads) for masks.

Shapes: coarse logits ``(K + 1, H, W)`` against an ``(H, W)`` integer target of channel indices
(-1 = ignored); mask logits ``(H, W)`` against an ``(H, W)`` bool target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1.0


def coarse_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft multi-class Dice (classes present in the target or the prediction).

    ``logits``: ``(N, K + 1, H, W)``; ``target``: ``(N, H, W)`` long, channel index or -1.
    """
    ce = F.cross_entropy(logits, target, ignore_index=-1)
    valid = (target >= 0).unsqueeze(1)
    prob = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype) * valid
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)[1:]
    denom = (prob.sum(dims) + onehot.sum(dims))[1:]
    dice = 1.0 - (2.0 * inter + _EPS) / (denom + _EPS)
    return ce + dice.mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor,
              object_score: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """BCE + soft Dice on the mask, MSE of the IoU head against the mask's real IoU, and (SAM-2) BCE
    of the object score against "the target is not empty". Returns ``(loss, hard IoU)``.

    An empty target (the structure has ended) has no Dice term: the BCE pushes every logit below 0.
    """
    t = target.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, t)
    prob = torch.sigmoid(logits)
    present = bool(target.any())
    if present:
        loss = loss + 1.0 - (2.0 * (prob * t).sum() + _EPS) / (prob.sum() + t.sum() + _EPS)
    with torch.no_grad():
        hard = logits > 0
        union = (hard | target).sum()
        iou = float((hard & target).sum() / union) if int(union) else 1.0
    loss = loss + F.mse_loss(iou_pred, torch.tensor(iou, dtype=iou_pred.dtype, device=iou_pred.device))
    if object_score is not None:
        loss = loss + F.binary_cross_entropy_with_logits(
            object_score, torch.tensor(1.0 if present else 0.0, dtype=object_score.dtype, device=object_score.device))
    return loss, iou
