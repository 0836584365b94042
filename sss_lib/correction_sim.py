"""A simulated user who corrects a segmentation one slice at a time (deterministic).

Round after round, the user looks at the current prediction against the truth and fixes the worst
slice with one of two actions:

* **box**: on the slice that holds the object and has the most wrong voxels (false positives plus
  false negatives), draw the object's true box (its tight box on that slice; :data:`BOX_MARGIN_PX`
  adds a margin);
* **not on this slice**: on the slice that does not hold the object and has the most
  false-positive voxels, mark the class absent.

Whichever removes more error (that slice's wrong voxels, or its false positives) is chosen; a tie
goes to the box; among slices with equal error the lowest index wins. A slice the user has already
corrected is not picked again. Arrays are ``(S, H, W)`` bool stacks along the prompts' slice axis;
boxes are XYXY pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from .errors import PromptError
from .prompts import ClassPrompts, PromptSet, SlicePrompt

BOX_MARGIN_PX = 0  # "the true box": the tight box of the truth on the slice


@dataclasses.dataclass(frozen=True)
class Correction:
    """One simulated action.

    Attributes:
        kind: ``"box"`` (draw the true box) or ``"absent"`` (mark "not on this slice").
        slice_index: the slice it is made on.
        box: ``(x0, y0, x1, y1)`` for a box, else None.
        error_voxels: the wrong voxels of that slice it targets (what it is expected to remove).
    """

    kind: Literal["box", "absent"]
    slice_index: int
    box: tuple[int, int, int, int] | None
    error_voxels: int

    def prompt(self) -> SlicePrompt:
        """The user prompt this correction adds."""
        if self.kind == "absent":
            return SlicePrompt.not_on_slice(self.slice_index)
        return SlicePrompt(self.slice_index, box=self.box, source="user")


def truth_box(mask: np.ndarray, margin: int = BOX_MARGIN_PX) -> tuple[int, int, int, int]:
    """The tight XYXY box of a non-empty ``(H, W)`` mask, enlarged by ``margin`` px, clipped."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (max(int(xs.min()) - margin, 0), max(int(ys.min()) - margin, 0),
            min(int(xs.max()) + margin, w - 1), min(int(ys.max()) + margin, h - 1))


def next_correction(truth: np.ndarray, prediction: np.ndarray, done: set[int] | frozenset[int] = frozenset(),
                    margin: int = BOX_MARGIN_PX) -> Correction | None:
    """The simulated user's next action (module docstring), or None when no slice has an error.

    Args:
        truth / prediction: ``(S, H, W)`` bool stacks of one class.
        done: slices already corrected (not picked again).
    """
    truth = np.asarray(truth, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} must be equal (S, H, W) stacks")
    n = truth.shape[0]
    present = truth.reshape(n, -1).any(axis=1)
    wrong = (truth ^ prediction).reshape(n, -1).sum(axis=1)
    open_slices = np.array([s not in done for s in range(n)])
    box_error = np.where(present & open_slices, wrong, 0)
    absent_error = np.where(~present & open_slices, wrong, 0)  # off the object every wrong voxel is a FP
    s_box, s_abs = int(np.argmax(box_error)), int(np.argmax(absent_error))
    if box_error[s_box] == 0 and absent_error[s_abs] == 0:
        return None
    if box_error[s_box] >= absent_error[s_abs]:
        return Correction("box", s_box, truth_box(truth[s_box], margin), int(box_error[s_box]))
    return Correction("absent", s_abs, None, int(absent_error[s_abs]))


def apply_correction(prompts: PromptSet, label: int, correction: Correction) -> PromptSet:
    """``prompts`` with ``correction``'s user prompt added to class ``label`` (a new set; the
    input is not changed). Raises :class:`PromptError` if the class is not in ``prompts``."""
    classes = []
    found = False
    for c in prompts.classes:
        if c.label == label:
            found = True
            c = ClassPrompts(c.label, c.name, list(c.prompts) + [correction.prompt()], c.color)
        classes.append(c)
    if not found:
        raise PromptError(f"class {label} is not in the prompts; add it before correcting it")
    return PromptSet(prompts.slice_axis, classes)
