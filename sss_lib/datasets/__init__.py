"""Dataset readers: nnU-Net v2 raw folders, the ACDC challenge folders and plain folders.

All return a :class:`CaseList` (cases + class table); :func:`open_dataset` picks the reader and
:func:`check_labels` reads the label maps to check and measure them.
"""

from .base import Case, CaseList
from .detect import detect_layout, open_dataset
from .labels import LabelReport, check_labels

__all__ = ["Case", "CaseList", "LabelReport", "check_labels", "detect_layout", "open_dataset"]
