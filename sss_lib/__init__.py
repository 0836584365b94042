"""SSS: SAM-2 volume segmentation with automatic prompts and semi-supervised fine-tuning.

The package imports nothing heavy at import time: torch, sam2 and the image readers are imported
lazily by the functions that need them, so ``import sss_lib`` is cheap and works without torch.
"""

__version__ = "0.1.0"
