"""PCSW: automatic box and point prompts from coarse class probabilities (SSS_METHOD.md section 2).

Pure numpy/scipy. See :mod:`sss_lib.pcsw.generator` for the steps and coordinate conventions.
"""

from .config import PcswConfig, window_lengths
from .generator import PcswResult, pcsw_class, run_pcsw
from .promptset import default_color, pcsw_prompt_set
from .ranges import measure_class_ranges

__all__ = [
    "PcswConfig",
    "PcswResult",
    "default_color",
    "measure_class_ranges",
    "pcsw_class",
    "pcsw_prompt_set",
    "run_pcsw",
    "window_lengths",
]
