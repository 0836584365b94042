"""Building blocks of semi-supervised training (SSS_METHOD.md sections 3 and 4).

- :mod:`.dfe`: Discriminative Feature Enhancement between a weak and a strong view.
- :mod:`.strong`, :mod:`.weak`, :mod:`.cutmix`: seeded augmentations of (B, [C,] H, W) tensors in [0, 1].
- :mod:`.pseudo_label`: pseudo-labels and their confidence mask.
- :mod:`.losses`: the masked consistency loss and the lambda_u ramp.
- :mod:`.ema`: the EMA teacher.

Imports torch; import this package only where training happens.
"""

from .cutmix import CutMixResult, apply_cutmix, cutmix, cutmix_boxes
from .dfe import DFE, DfeCoarseHead, DfeOutput, DfeTerms, PixelMLP
from .ema import EmaTeacher
from .losses import (
    masked_consistency_loss,
    masked_cross_entropy,
    masked_dice,
    sigmoid_rampup,
    unsupervised_weight,
)
from .pseudo_label import confidence_mask, object_probabilities, with_background_logit
from .strong import StrongAugment
from .weak import WeakAugment, WeakParams
from ._random import as_generator

__all__ = [
    "DFE",
    "DfeCoarseHead",
    "CutMixResult",
    "DfeOutput",
    "DfeTerms",
    "EmaTeacher",
    "PixelMLP",
    "StrongAugment",
    "WeakAugment",
    "WeakParams",
    "apply_cutmix",
    "as_generator",
    "confidence_mask",
    "cutmix",
    "cutmix_boxes",
    "masked_consistency_loss",
    "masked_cross_entropy",
    "masked_dice",
    "object_probabilities",
    "sigmoid_rampup",
    "unsupervised_weight",
    "with_background_logit",
]
