"""Seeded draws and image-shape handling shared by the augmentations.

Every draw is made on the CPU from an explicit :class:`torch.Generator`, so the same seed gives
the same augmentation on any device; the drawn parameters are then moved to the images' device.
"""

from __future__ import annotations

from typing import Callable

import torch

Seed = int | torch.Generator | None


def as_generator(seed: Seed) -> torch.Generator:
    """A CPU generator: ``seed`` itself, a new one seeded with the int, or (None) one seeded from
    torch's global RNG (reproducible under ``torch.manual_seed``)."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(int(seed))


def uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """``n`` draws from U[low, high), float32 on the CPU."""
    return low + (high - low) * torch.rand(n, generator=generator)


def bernoulli(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    """``n`` coin flips that come up True with probability ``p`` (bool, CPU)."""
    return torch.rand(n, generator=generator) < p


def as_bchw(images: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View ``(B, H, W)`` or ``(B, C, H, W)`` images as ``(B, C, H, W)``; also return the function
    that gives a result back the caller's shape."""
    if images.ndim == 3:
        return images.unsqueeze(1), lambda x: x.squeeze(1)
    if images.ndim == 4:
        return images, lambda x: x
    raise ValueError(f"images must be (B, H, W) or (B, C, H, W), got shape {tuple(images.shape)}")


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` values shaped ``(B, 1, 1, 1)`` on ``like``'s device and dtype, to broadcast."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)
