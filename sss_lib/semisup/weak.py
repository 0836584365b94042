"""Weak (geometric) augmentation: random scale/crop, flip and a small rotation, applied identically
to images and labels (SSS_METHOD.md section 4).

Images: float ``(B, H, W)`` or ``(B, C, H, W)`` (bilinear); labels: integer ``(B, H, W)`` or
``(B, 1, H, W)`` (nearest, values kept exactly). The output has the input's size: a zoom-in is a
crop, a zoom-out or shift leaves a border that is 0 in the image and ``ignore_index`` in the label.
Axes: x is the last (width) axis, y the one before it; a horizontal flip reverses x.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ._random import Seed, as_bchw, as_generator, bernoulli, uniform


@dataclasses.dataclass(frozen=True)
class WeakParams:
    """The drawn transform of each sample (CPU tensors, ``(B,)``).

    ``hflip``/``vflip``: bool; ``scale``: zoom factor (> 1 zooms in); ``angle_deg``: rotation,
    counter-clockwise on screen with y pointing down; ``shift_x``/``shift_y``: offset of the
    sampled window's centre as a fraction of the width/height.
    """

    hflip: torch.Tensor
    vflip: torch.Tensor
    scale: torch.Tensor
    angle_deg: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor


@dataclasses.dataclass(frozen=True)
class WeakAugment:
    """Random zoom/crop, flips and a small rotation.

    Attributes:
        scale: zoom factor range (``(0.8, 1.25)``: up to 20% out, 25% in).
        max_shift: the window's centre moves up to this fraction of the size along each axis.
        max_rotation_deg: rotation uniform in ``[-max, max]`` degrees.
        hflip_p / vflip_p: flip probabilities.
        ignore_index: label value of pixels that come from outside the slice.
        image_mode: "bilinear" (default) or "nearest" interpolation of the images.
    """

    scale: tuple[float, float] = (0.8, 1.25)
    max_shift: float = 0.1
    max_rotation_deg: float = 15.0
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    ignore_index: int = -1
    image_mode: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError("WeakAugment.scale must be (lo, hi) with 0 < lo <= hi")
        if not (0 <= self.max_shift <= 1 and 0 <= self.max_rotation_deg <= 180):
            raise ValueError("WeakAugment.max_shift must lie in [0, 1] and max_rotation_deg in [0, 180]")
        if not (0 <= self.hflip_p <= 1 and 0 <= self.vflip_p <= 1):
            raise ValueError("WeakAugment flip probabilities must lie in [0, 1]")
        if self.image_mode not in ("bilinear", "nearest"):
            raise ValueError("WeakAugment.image_mode must be 'bilinear' or 'nearest'")

    def draw(self, batch: int, generator: Seed) -> WeakParams:
        """Draw the transforms of ``batch`` samples (the same draws for the same seed)."""
        g = as_generator(generator)
        return WeakParams(
            hflip=bernoulli(g, batch, self.hflip_p),
            vflip=bernoulli(g, batch, self.vflip_p),
            scale=torch.exp(uniform(g, batch, math.log(self.scale[0]), math.log(self.scale[1]))),
            angle_deg=uniform(g, batch, -self.max_rotation_deg, self.max_rotation_deg),
            shift_x=uniform(g, batch, -self.max_shift, self.max_shift),
            shift_y=uniform(g, batch, -self.max_shift, self.max_shift),
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None, generator: Seed
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transform ``images`` and (optionally) ``labels`` with the same drawn geometry."""
        return self.apply(images, labels, self.draw(images.shape[0], generator))

    def apply(self, images: torch.Tensor, labels: torch.Tensor | None, params: WeakParams
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transform with given parameters (e.g. the same geometry for several tensors)."""
        x, back = as_bchw(images)
        y = y_back = None
        if labels is not None:
            y, y_back = as_bchw(labels)
            if y.shape[0] != x.shape[0] or y.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        # Flips are exact index reversals; the affine part below only runs when it can move pixels.
        x = _flip(x, params.hflip, -1)
        x = _flip(x, params.vflip, -2)
        if y is not None:
            y = _flip(y, params.hflip, -1)
            y = _flip(y, params.vflip, -2)
        if self._moves_pixels():
            theta = _affine(params, x.shape[-2], x.shape[-1]).to(device=x.device, dtype=torch.float32)
            grid = F.affine_grid(theta, [x.shape[0], 1, x.shape[-2], x.shape[-1]], align_corners=False)
            x = F.grid_sample(x.float(), grid, mode=self.image_mode, padding_mode="zeros",
                              align_corners=False).to(images.dtype)
            if y is not None:
                inside = F.grid_sample(torch.ones_like(y, dtype=torch.float32), grid, mode="nearest",
                                       padding_mode="zeros", align_corners=False) > 0.5
                moved = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros",
                                      align_corners=False).round().to(y.dtype)
                y = torch.where(inside, moved, torch.full_like(moved, self.ignore_index))
        return back(x), (y_back(y) if y is not None and y_back is not None else None)

    def _moves_pixels(self) -> bool:
        return self.scale != (1.0, 1.0) or self.max_shift > 0 or self.max_rotation_deg > 0


def _flip(x: torch.Tensor, chosen: torch.Tensor, dim: int) -> torch.Tensor:
    if not bool(chosen.any()):
        return x
    return torch.where(chosen.to(x.device).view(-1, 1, 1, 1), x.flip(dim), x)


def _affine(p: WeakParams, height: int, width: int) -> torch.Tensor:
    """``(B, 2, 3)`` maps from output to input normalised coordinates (affine_grid's convention).

    The rotation is done in pixel units (normalised x and y differ in scale when H != W), so a
    square stays square on a non-square slice.
    """
    a = torch.deg2rad(p.angle_deg)
    cos, sin = torch.cos(a) / p.scale, torch.sin(a) / p.scale
    theta = torch.zeros(len(a), 2, 3)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = sin * width / height
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = 2.0 * p.shift_x
    theta[:, 1, 2] = 2.0 * p.shift_y
    return theta
