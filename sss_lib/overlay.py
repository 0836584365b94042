"""PNG pictures of a slice with its segmentation and prompts drawn over it (for reports and the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .prompts import ClassPrompts


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def render_slice_png(
    path: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[ClassPrompts],
    slice_index: int,
    *,
    reference: np.ndarray | None = None,
    zoom: int = 3,
) -> Path:
    """Write a PNG of one slice: greyscale image, filled class masks, prompts on top.

    Args:
        image: ``(H, W)`` intensities in ``[0, 1]``.
        labels: ``(H, W)`` integer label slice.
        classes: prompts and colours; only prompts on ``slice_index`` are drawn (box outline,
            positive points as green, negative as red crosses).
        reference: optional ``(H, W)`` reference label slice, drawn as a white outline.
        zoom: integer upscaling so small structures stay visible.
    """
    from PIL import Image, ImageDraw

    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    for c in classes:
        mask = labels == c.label
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(c.color, dtype=np.float32)
    if reference is not None:
        rgb[_outline(reference > 0)] = 255.0
    img = Image.fromarray(rgb.astype(np.uint8)).resize((grey.shape[1] * zoom, grey.shape[0] * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return ((x + 0.5) * zoom, (y + 0.5) * zoom)

    for c in classes:
        for p in c.prompts:
            if p.key_slice != slice_index:
                continue
            if p.box is not None:
                draw.rectangle([px(*p.box[:2]), px(*p.box[2:])], outline=tuple(c.color), width=2)
            for x, y in p.positive_points:
                cx, cy = px(x, y)
                draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], outline=(0, 255, 0), width=2)
            for x, y in p.negative_points:
                cx, cy = px(x, y)
                draw.line([cx - 4, cy - 4, cx + 4, cy + 4], fill=(255, 0, 0), width=2)
                draw.line([cx - 4, cy + 4, cx + 4, cy - 4], fill=(255, 0, 0), width=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
