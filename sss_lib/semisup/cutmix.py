"""CutMix between the unlabeled slices of a batch, with the pseudo-labels mixed the same way
(SSS_METHOD.md section 4: "CutMix regions take the other slice's pseudo-label").

Each sample is paired with another slice of the batch (a random cyclic pairing, so no slice is
paired with itself when B > 1) and, with probability ``p``, a box of that partner is pasted into it.
Box size and shape follow UniMatch: area a fraction in ``area`` of the slice, aspect ratio in
``ratio``. Shapes: images ``(B, H, W)`` or ``(B, C, H, W)``; per-pixel maps ``(B, H, W)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._random import Seed, as_generator, uniform


@dataclasses.dataclass
class CutMixResult:
    """Mixed tensors and where they were mixed.

    Attributes:
        images: the mixed images, the input's shape.
        pseudo_labels: the mixed pseudo-labels ``(B, H, W)``.
        confidence: the mixed confidence (or confidence mask) ``(B, H, W)``.
        box: ``(B, H, W)`` bool, True where a pixel comes from the partner slice.
        partner: ``(B,)`` long, the batch index each sample's box comes from.
    """

    images: torch.Tensor
    pseudo_labels: torch.Tensor
    confidence: torch.Tensor
    box: torch.Tensor
    partner: torch.Tensor


def cutmix_boxes(batch: int, height: int, width: int, generator: Seed, *, p: float = 0.5,
                 area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the boxes and partners: ``(box (B, H, W) bool, partner (B,) long)``, on the CPU.

    A sample whose coin (probability ``p``) fails, or a batch of one, gets an empty box.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError("cutmix p must lie in [0, 1]")
    if not (0 < area[0] <= area[1] <= 1 and 0 < ratio[0] <= ratio[1]):
        raise ValueError("cutmix area must lie in (0, 1] and ratio be positive (lo <= hi)")
    g = as_generator(generator)
    order = torch.randperm(batch, generator=g)
    partner = torch.empty(batch, dtype=torch.long)
    partner[order] = order.roll(-1)
    apply = torch.rand(batch, generator=g) < p
    fraction = uniform(g, batch, *area)
    aspect = torch.exp(uniform(g, batch, math.log(ratio[0]), math.log(ratio[1])))
    corner = torch.rand(batch, 2, generator=g)
    box = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(batch):
        if not apply[i] or batch < 2:
            continue
        size = float(fraction[i]) * height * width
        bw = min(width, max(1, int(math.sqrt(size / float(aspect[i])))))
        bh = min(height, max(1, int(math.sqrt(size * float(aspect[i])))))
        x0 = int(float(corner[i, 0]) * (width - bw + 1))
        y0 = int(float(corner[i, 1]) * (height - bh + 1))
        box[i, y0:y0 + bh, x0:x0 + bw] = True
    return box, partner


def apply_cutmix(tensor: torch.Tensor, box: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Paste ``tensor[partner]`` into ``tensor`` where ``box`` is True.

    ``tensor``: ``(B, H, W)`` or ``(B, C, H, W)``; ``box``: ``(B, H, W)``; ``partner``: ``(B,)``.
    """
    mask = box.to(tensor.device)
    if tensor.ndim == 4:
        mask = mask.unsqueeze(1)
    elif tensor.ndim != 3:
        raise ValueError(f"cutmix expects (B, H, W) or (B, C, H, W), got {tuple(tensor.shape)}")
    if tensor.shape[0] != box.shape[0] or tensor.shape[-2:] != box.shape[-2:]:
        raise ValueError(f"cutmix box {tuple(box.shape)} does not fit tensor {tuple(tensor.shape)}")
    return torch.where(mask, tensor[partner.to(tensor.device)], tensor)


def cutmix(images: torch.Tensor, pseudo_labels: torch.Tensor, confidence: torch.Tensor, generator: Seed, *,
           p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
           ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> CutMixResult:
    """CutMix a batch of strong views and mix their pseudo-labels and confidences identically.

    Args:
        images: ``(B, H, W)`` or ``(B, C, H, W)`` strong views.
        pseudo_labels: ``(B, H, W)`` pseudo-labels made on the weak views (pixel-aligned).
        confidence: ``(B, H, W)`` confidence map or mask, mixed like the labels.
        generator: torch.Generator or seed.
        p / area / ratio: see :func:`cutmix_boxes`.
    """
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    for name, t in (("pseudo_labels", pseudo_labels), ("confidence", confidence)):
        if tuple(t.shape) != (b, h, w):
            raise ValueError(f"cutmix: {name} must be (B, H, W) = {(b, h, w)}, got {tuple(t.shape)}")
    box, partner = cutmix_boxes(b, h, w, generator, p=p, area=area, ratio=ratio)
    return CutMixResult(apply_cutmix(images, box, partner), apply_cutmix(pseudo_labels, box, partner),
                        apply_cutmix(confidence, box, partner), box.to(images.device), partner.to(images.device))
