"""Names shared by the SSSSegment panel, its logic and its saved scenes.

Everything here is stored in MRML node attributes or node references, so changing a value breaks
scenes saved by earlier versions: add new names rather than renaming old ones.
"""

from typing import List, Tuple

# Backbones offered in the panel. Mirrors sss_lib.backbones.registry.BACKBONE_NAMES (which this
# module cannot import at load time: sss_lib needs Python 3.10+), plus the task-model entry.
# tests/slicer/test_static.py checks that the two lists agree.
BACKBONE_CHOICES: List[str] = [
    "auto",
    "sam2.1_hiera_tiny",
    "sam2.1_hiera_small",
    "sam2.1_hiera_base_plus",
    "sam2.1_hiera_large",
    "litemedsam",
]
TASK_MODEL_CHOICE = "task model (file)"
MODEL_CHOICES: List[str] = BACKBONE_CHOICES + [TASK_MODEL_CHOICE]

DEVICE_CHOICES: List[str] = ["auto", "cpu", "cuda", "mps"]
SLICE_AXIS_CHOICES: List[str] = ["auto", "i", "j", "k"]

# Node attributes (strings) written on the prompt markups and the output segmentation.
ATTR_ROLE = "SSS.Role"  # "box" or "points"
ATTR_LABEL = "SSS.ClassLabel"  # integer label value, as text
ATTR_NAME = "SSS.ClassName"
ATTR_COLOR = "SSS.ClassColor"  # "r,g,b" in 0..255
ATTR_SOURCE = "SSS.Source"  # provenance: "auto" (PCSW) or "user"
ATTR_CONFIDENCE = "SSS.Confidence"  # PCSW confidence of an auto prompt
ATTR_PENDING_POLARITY = "SSS.NextPointPolarity"  # "positive"/"negative" for the next placed point
ATTR_MODEL = "SSS.Model"  # on the segmentation: which model made it
ATTR_DEVICE = "SSS.Device"
ATTR_SECONDS = "SSS.Seconds"
ATTR_SEGMENT_LABEL = "SSS.LabelValue"  # segment tag: the class label a segment holds
# Segment tag: per-slice digests of the mask SSS last wrote (SSSSegmentLib/edit_guard.py), so a later
# run can tell which slices a person edited since.
ATTR_WRITTEN_SLICES = "SSS.WrittenSlices"

ROLE_BOX = "box"
ROLE_POINTS = "points"
SOURCE_AUTO = "auto"
SOURCE_USER = "user"
POSITIVE = "positive"
NEGATIVE = "negative"

# Node references (survive save/load and node ID remapping, unlike attributes holding IDs).
REF_VOLUME = "sssVolume"  # points node -> the volume it prompts
REF_BOX = "sssBox"  # points node -> the class's box (ROI) node

# Segment IDs are derived from the label so a re-run finds and updates the same segment.
SEGMENT_ID_PREFIX = "SSS_label_"

# Class colours (0..255) handed out in order to new classes; the first is the usual "tumour" red.
DEFAULT_CLASS_COLORS: List[Tuple[int, int, int]] = [
    (230, 80, 60),
    (60, 160, 230),
    (240, 200, 50),
    (120, 200, 80),
    (200, 100, 220),
    (250, 140, 40),
    (60, 210, 190),
    (230, 120, 170),
]

# Negative points are drawn in the class colour scaled by this factor (darker) so they read as
# "the same class, but exclude here"; the point label shows "-" as well.
NEGATIVE_COLOR_SCALE = 0.35

MINIMUM_PYTHON = (3, 10)
MINIMUM_SLICER = "5.10"
