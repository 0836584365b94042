"""Which classes Auto-segment takes from the coarse head instead of the prompted decoder (**ours**).

A box prompt segments what it frames. For a thin ring (the myocardium) or a class whose boxes
keep catching their neighbours, the coarse head, which labels every pixel, can be the better
answer, and the ring rule (:mod:`sss_lib.rings`) repairs only the slices where the boxes' answer
has visibly lost the ring. So the choice is measured, class by class, the way nnU-Net decides its
post-processing: on the validation cases, at the kept checkpoint, the shipped pipeline's Dice of
each class against the coarse head's own argmax (:func:`choose_coarse_classes`). The classes the
coarse head wins by at least :data:`MIN_COARSE_GAIN` are stored in the task model
(:attr:`sss_lib.task_model.TaskModel.coarse_classes`) and Auto-segment paints them from the coarse
head (:func:`apply_coarse_classes`), for automatically prompted classes only: once the user edits a
class's prompts, the class is the decoder's again.

Shapes: label stacks are ``(S, H, W)`` along the slice axis. No torch here.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

#: The least validation Dice gain (coarse head over the pipeline, mean over the validation cases)
#: that makes Auto-segment take a class from the coarse head: a margin, so that a tie on a few
#: validation cases leaves the class to the decoder the user can correct.
MIN_COARSE_GAIN = 0.02


def choose_coarse_classes(pipeline_dice: Mapping[int, float], coarse_dice: Mapping[int, float],
                          min_gain: float = MIN_COARSE_GAIN) -> tuple[int, ...]:
    """The classes whose coarse-head Dice beats the pipeline's by at least ``min_gain``.

    Args:
        pipeline_dice / coarse_dice: class label -> Dice of the shipped pipeline / of the coarse
            head's argmax, each averaged over the same validation cases. A class missing from
            either is never chosen.
    """
    chosen = tuple(sorted(int(k) for k in pipeline_dice
                          if k in coarse_dice and coarse_dice[k] >= pipeline_dice[k] + min_gain))
    for k in chosen:
        log.info("class %d from the coarse head: validation Dice %.4f against the pipeline's %.4f", k,
                 coarse_dice[k], pipeline_dice[k])
    return chosen


def apply_coarse_classes(labels: np.ndarray, coarse: np.ndarray, classes: Iterable[int]) -> dict[int, int]:
    """Take each of ``classes`` from the coarse head, in place.

    Where the pipeline said class ``c`` and the coarse head says something else, the voxel gets the
    coarse head's label (background or another class: the cavity a filled ring covered goes back
    to the cavity); where the coarse head says ``c``, the voxel is ``c``.

    Args:
        labels: the pipeline's label stack ``(S, H, W)``, changed in place.
        coarse: the coarse head's argmax ``(S, H, W)`` (:func:`sss_lib.rings.coarse_argmax` per
            slice), same shape.
        classes: the labels to take from the coarse head.

    Returns:
        label -> voxels that changed for it.
    """
    if labels.shape != coarse.shape:
        raise ValueError(f"label stack {labels.shape} and coarse argmax {coarse.shape} differ in shape")
    changed: dict[int, int] = {}
    for c in classes:
        before = labels == c
        mine = coarse == c
        dropped = before & ~mine
        labels[dropped] = coarse[dropped].astype(labels.dtype, copy=False)
        labels[mine] = c
        changed[int(c)] = int(np.count_nonzero(before != mine))
    return changed


def coarse_label_stack(probabilities: Mapping[int, np.ndarray]) -> np.ndarray:
    """The coarse head's argmax on every slice: ``(S, H, W)`` int, from class label ->
    ``(S, H, W)`` probabilities."""
    from .rings import coarse_argmax

    n = next(iter(probabilities.values())).shape[0]
    return np.stack([coarse_argmax(probabilities, s) for s in range(n)])
