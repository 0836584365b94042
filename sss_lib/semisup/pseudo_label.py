"""Pseudo-labels and their confidence mask (SSS_METHOD.md section 4).

Shapes: class probabilities ``(B, C, H, W)`` with channel 0 = background; labels and masks
``(B, H, W)``.
"""

from __future__ import annotations

import torch


def with_background_logit(object_logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` per-object SAM-2 mask logits -> ``(B, K + 1, H, W)`` class logits with a
    constant 0 background logit in channel 0.

    Its argmax is the volume rule of SSS_METHOD.md section 1 (highest logit wins; background
    where every logit is below 0), and for one object its softmax is exactly
    ``(1 - sigmoid, sigmoid)``.
    """
    zeros = torch.zeros_like(object_logits[:, :1])
    return torch.cat([zeros, object_logits], dim=1)


def object_probabilities(object_logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(B, K + 1, H, W)`` from per-object logits ``(B, K, H, W)``; see
    :func:`with_background_logit`."""
    return torch.softmax(with_background_logit(object_logits.float()), dim=1)


def confidence_mask(probabilities: torch.Tensor, threshold: float = 0.95
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label and confidence mask.

    Args:
        probabilities: ``(B, C, H, W)`` class probabilities (summing to 1 over C).
        threshold: a pixel is trusted when its highest probability is ``>= threshold``.

    Returns:
        ``(pseudo_label, mask)``: ``(B, H, W)`` long argmax and ``(B, H, W)`` bool.
    """
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (B, C, H, W), got {tuple(probabilities.shape)}")
    confidence, label = probabilities.max(dim=1)
    return label, confidence >= threshold
