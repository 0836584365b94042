"""When the supervised warm-up ends (**ours**): a fixed step, or where validation stops improving.

A fixed warm-up (20% of the run) can hand the unsupervised loss a model that supervised training
alone would still have improved a lot. Measured on the reduced semi-supervised protocol with one
labeled case (``benchmarks/results/ssl_protocol_reduced_cpu_1labeled.md``, this CPU): supervised-only
validation kept improving up to step 74 of 150, the semi-supervised run switched its consistency on
at step 30, and its best validation (0.668) and test Dice (0.602) stayed below supervised-only
(0.715 and 0.682). The fallback to the best validated checkpoint could not help: no checkpoint of
that run had had the supervised steps that made supervised-only good.

:class:`WarmupPlan` with ``until_plateau``: the warm-up lasts at least ``min_steps`` and at most
``max_steps``. It ends at the first validation from ``min_steps`` on that does not improve on the
best so far, or whose successor would come after ``max_steps`` (the loop validates at
``max_steps`` if no validation ended it before). The loop then restarts the student and the teacher
from the best validated weights, so consistency starts where supervised training peaked on
validation, and the model a run hands back (its best validated checkpoint, the warm-up's included)
validates at least as well as supervised training up to that step. Without validation (or with
several processes) the warm-up is ``min_steps`` long, as before.

Torch-free state; the loop owns validation and the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass
class WarmupPlan:
    """The warm-up's length, decided up front or by validation (see the module docstring).

    Attributes:
        min_steps: the fewest supervised-only steps (the whole warm-up when not ``until_plateau``).
        max_steps: the most (only with ``until_plateau``).
        val_every: steps between validations.
        until_plateau: end at the validation plateau; False: after ``min_steps``.
        end: the last supervised-only step once known (from the start when not ``until_plateau``).
        reason: why it ended there (for the log and the run's outcome).
    """

    min_steps: int
    max_steps: int
    val_every: int
    until_plateau: bool = True
    end: int | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.min_steps < 0 or self.val_every < 1:
            raise ValueError(f"need min_steps >= 0 and val_every >= 1, got {self.min_steps}, {self.val_every}")
        self.max_steps = max(int(self.max_steps), int(self.min_steps))
        if not self.until_plateau and self.end is None:
            self.end = int(self.min_steps)
            self.reason = f"fixed warm-up of {self.min_steps} steps"

    @property
    def decided(self) -> bool:
        return self.end is not None

    @property
    def last_possible(self) -> int:
        """The latest step the warm-up can end at (its end once decided)."""
        return self.end if self.end is not None else self.max_steps

    def supervised_only(self, step: int) -> bool:
        """True while step ``step`` (1-based) is still part of the warm-up."""
        return self.end is None or step <= self.end

    def must_validate(self, step: int) -> bool:
        """True where the loop has to validate for the plan: the latest end, while undecided."""
        return self.end is None and step == self.max_steps

    def observe(self, step: int, improved: bool) -> bool:
        """Take the validation of step ``step``; True when the warm-up ends there.

        Args:
            step: the step just validated.
            improved: its mean Dice beat every earlier validation's.
        """
        if self.end is not None or step < self.min_steps:
            return False
        if not improved:
            self.reason = f"validation stopped improving at step {step}"
        elif step >= self.max_steps or step + self.val_every > self.max_steps:
            self.reason = f"longest warm-up reached (step {step}, at most {self.max_steps})"
        else:
            return False
        self.end = int(step)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (goes into a checkpoint's ``extra``)."""
        return {"end": self.end, "reason": self.reason}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.end = None if state.get("end") is None else int(state["end"])
        self.reason = str(state.get("reason", ""))
