"""Class-wise adaptive confidence thresholds (**ours**, FreeMatch/FlexMatch style; SSS_METHOD.md section 4).

One fixed threshold (0.95) treats every class alike, but a teacher is not equally sure of every
class: on a thin ring (the myocardium) its probabilities rarely reach 0.95, so almost none of the
class's pixels enter the consistency loss while the confident classes around it (background, the
LV cavity) train on nearly all of theirs. The shared weights then move towards those classes and
the ring's share of the pseudo-label shrinks step by step: the pseudo-labels erase the class.

Self-adaptive thresholds scale each class's threshold by how sure the teacher is of that class:

* ``level[c]``: an EMA (momentum ``m``) of the mean confidence (highest class probability) of the
  pixels whose pseudo-label is ``c``, over the pixels the teacher may vouch for; it starts at 1,
  so every threshold starts at ``confidence``;
* ``threshold[c] = clip(confidence * level[c] / max_k level[k], floor, confidence)``: FreeMatch's
  MaxNorm, applied to the per-class confidence (rather than to the class frequency, which in a
  segmentation is the class's area and says nothing about how well it is learned). The class the
  teacher is surest of keeps ``confidence``; a class it is less sure of gets a proportionally
  lower threshold, never below ``floor`` (default 0.5: below it a binary mask's pixel is not even
  inside the object).

:class:`ClassThresholds` holds the state (a checkpoint carries it); channels are ``0`` =
background and ``c`` = the c-th class, as the pseudo-labels.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


class ClassThresholds:
    """Per-class confidence thresholds from the teacher's per-class confidence EMA.

    Args:
        num_channels: classes plus background (``K + 1``).
        confidence: the highest threshold (the fixed threshold it replaces).
        floor: the lowest threshold.
        momentum: EMA momentum of the per-class confidence level (per update).
    """

    def __init__(self, num_channels: int, confidence: float, floor: float = 0.5, momentum: float = 0.9) -> None:
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if not 0.0 <= floor <= confidence <= 1.0:
            raise ValueError(f"need 0 <= floor <= confidence <= 1, got floor {floor}, confidence {confidence}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.confidence = float(confidence)
        self.floor = float(floor)
        self.momentum = float(momentum)
        self.level = torch.ones(int(num_channels), dtype=torch.float64)

    def update(self, probabilities: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Fold one batch of teacher probabilities into the per-class levels.

        Args:
            probabilities: ``(B, C, H, W)`` class probabilities (channel 0 = background).
            valid: ``(B, H, W)`` bool, the pixels the teacher may vouch for (None: all). A class
                with no valid pixel in the batch keeps its level.
        """
        confidence, pseudo = probabilities.detach().float().max(dim=1)
        if valid is not None:
            confidence, pseudo = confidence[valid], pseudo[valid]
        confidence, pseudo = confidence.reshape(-1).cpu().double(), pseudo.reshape(-1).cpu()
        n = len(self.level)
        counts = torch.bincount(pseudo, minlength=n)[:n]
        sums = torch.bincount(pseudo, weights=confidence, minlength=n)[:n]
        seen = counts > 0
        mean = sums[seen] / counts[seen]
        self.level[seen] = self.momentum * self.level[seen] + (1.0 - self.momentum) * mean

    def thresholds(self) -> torch.Tensor:
        """``(C,)`` float32 threshold per channel (see the module docstring)."""
        scaled = self.confidence * self.level / self.level.max().clamp_min(1e-12)
        return scaled.clamp(self.floor, self.confidence).float()

    def trust(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-label and trust mask with the per-class thresholds.

        Args:
            probabilities: ``(B, C, H, W)``.

        Returns:
            ``(pseudo, trusted)``: ``(B, H, W)`` long argmax and bool (confidence >= its class's
            threshold).
        """
        confidence, pseudo = probabilities.max(dim=1)
        limits = self.thresholds().to(probabilities.device)
        return pseudo, confidence >= limits[pseudo]

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (goes into a checkpoint's ``extra``)."""
        return {"level": [float(v) for v in self.level]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        level = torch.as_tensor(list(state["level"]), dtype=torch.float64)
        if level.shape != self.level.shape:
            raise ValueError(f"threshold state holds {len(level)} channels, this run has {len(self.level)}")
        self.level = level
