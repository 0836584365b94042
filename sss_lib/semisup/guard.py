"""A guard against confirmation bias, class by class (**ours**; SSS_METHOD.md section 4).

A teacher that is confidently wrong about a class (the myocardium, a thin ring) passes the
confidence mask everywhere, and the student learns its mistake: on hard phantoms the Myo's
validation Dice fell from 0.61 to 0.03 while 97-100% of the pixels stayed trusted. Confidence
cannot see this; validation can. The guard:

1. records each class's validation Dice during the supervised warm-up (its *baseline*; the
   loop validates at the warm-up's last step for this);
2. after the warm-up, *drops* a class whose validation Dice falls below its baseline by more than
   ``margin``: from then on the unsupervised loss leaves out every pixel that the teacher's
   pseudo-label or the *anchor* (the model as it was at the end of the warm-up, frozen) gives to
   that class, so pseudo-labels can neither teach the class's mistakes nor erase it where the
   supervised model sees it; the decoder's consistency skips the class's prompts;
3. the loop resets the teacher to the best validated weights when a class is dropped, and the
   task model is the best validated checkpoint, the warm-up's included: the run never hands back
   a model that validates worse than its own supervised warm-up.

A dropped class stays dropped (its supervised loss still trains it). :class:`ClassGuard` is
torch-free state; :func:`guarded_trust` applies it to one slice's trust mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class GuardDecision:
    """What one validation changed: the classes newly dropped, with their Dice and baseline."""

    step: int
    dropped: dict[int, tuple[float, float]]

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        names = names or {}
        parts = [f"{names.get(c, str(c))} {d:.3f} < warm-up {b:.3f}" for c, (d, b) in sorted(self.dropped.items())]
        return "guard: dropped from the unsupervised loss: " + "; ".join(parts) if parts else ""


class ClassGuard:
    """Per-class baselines from the warm-up and the classes dropped since (see module docstring).

    Args:
        labels: the task's class labels.
        warmup: the last supervised-only step.
        margin: how far (Dice) below its baseline a class may fall before it is dropped.
    """

    def __init__(self, labels: Sequence[int], warmup: int, margin: float = 0.05) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.labels = [int(v) for v in labels]
        self.warmup = int(warmup)
        self.margin = float(margin)
        self.baseline: dict[int, float] = {}
        self.dropped: dict[int, int] = {}  # label -> step it was dropped at

    def observe(self, step: int, dice: Mapping[int, float]) -> GuardDecision:
        """Take one validation's per-class Dice (label -> Dice; classes not scored are left out)."""
        newly: dict[int, tuple[float, float]] = {}
        for label, value in dice.items():
            label, value = int(label), float(value)
            if label not in self.labels or not np.isfinite(value):
                continue
            if step <= self.warmup:
                self.baseline[label] = max(value, self.baseline.get(label, -1.0))
            elif label in self.baseline and label not in self.dropped and value < self.baseline[label] - self.margin:
                self.dropped[label] = int(step)
                newly[label] = (value, self.baseline[label])
        return GuardDecision(int(step), newly)

    def dropped_channels(self) -> list[int]:
        """The dropped classes as channel indices (``c`` = the c-th label, 0 = background)."""
        return sorted(self.labels.index(lbl) + 1 for lbl in self.dropped)

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (goes into a checkpoint's ``extra``)."""
        return {"baseline": {str(k): v for k, v in self.baseline.items()},
                "dropped": {str(k): v for k, v in self.dropped.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.baseline = {int(k): float(v) for k, v in state.get("baseline", {}).items()}
        self.dropped = {int(k): int(v) for k, v in state.get("dropped", {}).items()}


def guarded_trust(trusted: Any, pseudo: Any, dropped_channels: Sequence[int], anchor: Any | None = None) -> Any:
    """``trusted`` without the pixels that the pseudo-label or the anchor gives a dropped class.

    Args:
        trusted: ``(H, W)`` bool tensor; pseudo: ``(H, W)`` long channel indices (0 = background).
        dropped_channels: :meth:`ClassGuard.dropped_channels`.
        anchor: ``(H, W)`` long channel indices of the anchor model (None: the pseudo-label only).
    """
    import torch

    if not dropped_channels:
        return trusted
    chosen = torch.as_tensor(list(dropped_channels), device=pseudo.device)
    hit = torch.isin(pseudo, chosen)
    if anchor is not None:
        hit = hit | torch.isin(torch.as_tensor(anchor, device=pseudo.device), chosen)
    return trusted & ~hit
