"""The teacher: an exponential moving average (EMA) of the student (SSS_METHOD.md section 4, ours).

After each optimiser step, ``teacher = d * teacher + (1 - d) * student`` for every floating-point
parameter and buffer; integer buffers (e.g. BatchNorm's counters) are copied. With ``warmup``
(the Mean Teacher / UniMatch V2 rule) the n-th update (n = 1, 2, ...) uses
``d_n = min(decay, 1 - 1 / n)``: the first update copies the student, and early teachers are not
dominated by the random initialisation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EmaTeacher:
    """An EMA copy of ``student``, frozen and in eval mode; not an ``nn.Module``, so it never lands
    in an optimiser or in the student's state dict.

    Pass only the modules that train (e.g. an ``nn.ModuleDict`` of coarse head, DFE and decoder):
    the copy is a deep copy, and a frozen image encoder would only be duplicated.

    Args:
        student: the model to follow.
        decay: the EMA decay d in [0, 1).
        warmup: use ``min(decay, 1 - 1/n)`` for the n-th update (see module docstring).
    """

    def __init__(self, student: nn.Module, decay: float = 0.99, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(student)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - 1.0 / (self.num_updates + 1))

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """Move the teacher towards ``student`` (same architecture); returns the decay used."""
        d = self.current_decay()
        teacher_state = self.module.state_dict()
        student_state = student.state_dict()
        if teacher_state.keys() != student_state.keys():
            missing = sorted(set(teacher_state) ^ set(student_state))[:5]
            raise ValueError(f"EMA teacher and student differ in their parameters (e.g. {missing}); "
                             "build the teacher from this student")
        for name, t in teacher_state.items():
            s = student_state[name].detach()
            if t.dtype.is_floating_point:
                t.lerp_(s.to(t.dtype), 1.0 - d)
            else:
                t.copy_(s)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher (no gradients)."""
        return self.module(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """``{"model": teacher weights, "decay": float, "warmup": bool, "num_updates": int}``
        (plain types and tensors: loadable with ``torch.load(weights_only=True)``)."""
        return {"model": self.module.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.module.load_state_dict(state["model"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])

    def to(self, device: torch.device | str) -> "EmaTeacher":
        """Move the teacher's weights to ``device``."""
        self.module.to(device)
        return self
