"""Strong (intensity) augmentations of unlabeled slices (SSS_METHOD.md section 4).

Images are float tensors in [0, 1], ``(B, H, W)`` or ``(B, C, H, W)``; results have the input's
shape and stay in [0, 1]. Nothing here moves a pixel, so a pseudo-label made on the weak view
stays aligned with every strong view of it (CutMix, which does move content, is
:mod:`.cutmix`). Every random choice is per sample and comes from the given generator or seed:
the same seed gives the same output.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ._random import Seed, as_bchw, as_generator, bernoulli, per_sample, uniform


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x * factor`` per sample (``factor``: ``(B,)``), clipped to [0, 1]. ``images``: ``(B, C, H, W)``."""
    return (images * per_sample(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each image's distance from its own mean by ``factor`` (``(B,)``), clipped to [0, 1]."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * per_sample(factor, images) + mean).clamp(0.0, 1.0)


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``x ** gamma`` per sample (``gamma``: ``(B,)``, > 0); keeps 0 and 1 fixed."""
    return images.clamp(0.0, 1.0) ** per_sample(gamma, images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels, ``(B,)``) per sample, reflect padding.

    The kernel radius is ``ceil(3 * max(sigma))``, capped at ``min(H, W) - 1``.
    """
    b, c, h, w = images.shape
    sig = sigma.to(device=images.device, dtype=images.dtype).clamp_min(1e-3)
    radius = max(1, min(int(math.ceil(3.0 * float(sigma.max()))), h - 1, w - 1))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sig[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Quantise to ``2 ** bits`` grey levels per sample (``bits``: ``(B,)`` ints >= 1), 0 and 1 kept."""
    levels = per_sample(2.0 ** bits.to(torch.float32), images)
    return torch.minimum(torch.floor(images * levels), levels - 1) / (levels - 1)


def equalize(images: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram equalisation of each image over ``bins`` grey levels (all channels together).

    A constant image is returned unchanged.
    """
    b = images.shape[0]
    idx = (images.clamp(0.0, 1.0) * (bins - 1)).round().long().reshape(b, -1)
    hist = torch.zeros(b, bins, device=images.device, dtype=torch.float64)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    cdf = hist.cumsum(dim=1)
    # The first occupied level maps to 0 and the last to 1, as in the classic definition.
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float("inf"))).min(dim=1, keepdim=True).values
    total = cdf[:, -1:]
    span = total - cdf_min
    lut = ((cdf - cdf_min) / span.clamp_min(1.0)).clamp(0.0, 1.0)
    out = torch.gather(lut, 1, idx).to(images.dtype).reshape(images.shape)
    constant = (span <= 0).view(-1, 1, 1, 1)
    return torch.where(constant, images, out)


def solarize_fold(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Fold the intensities above ``threshold`` (``(B,)``, in [0.5, 1]) back below it: ``x > t``
    becomes ``2t - x``.

    A solarize that never inverts the whole image: only the brightest band changes, values stay in
    ``[2t - 1, 1]`` and the dark anatomy keeps its meaning.
    """
    t = per_sample(threshold, images)
    return torch.where(images > t, 2.0 * t - images, images)


@dataclasses.dataclass(frozen=True)
class StrongAugment:
    """The strong view: colour jitter, then a grey-level change, then blur (UniMatch-style odds).

    Attributes:
        jitter_p: probability of the brightness/contrast/gamma jitter (all three together).
        brightness: factor drawn from ``[1 - brightness, 1 + brightness]``.
        contrast: factor drawn from ``[1 - contrast, 1 + contrast]``.
        gamma: ``(lo, hi)``; gamma is log-uniform in it.
        grey_p: probability of one grey-level change, chosen uniformly from posterize
            (``posterize_bits`` inclusive range), equalize and :func:`solarize_fold` (threshold
            uniform in ``solarize_threshold``).
        blur_p: probability of a Gaussian blur with sigma uniform in ``blur_sigma`` (pixels).
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.5)
    grey_p: float = 0.2
    posterize_bits: tuple[int, int] = (3, 6)
    solarize_threshold: tuple[float, float] = (0.6, 0.95)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        for name in ("jitter_p", "grey_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"StrongAugment.{name} must lie in [0, 1]")
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1):
            raise ValueError("StrongAugment.brightness and contrast must lie in [0, 1)")
        if not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError("StrongAugment.gamma must be (lo, hi) with 0 < lo <= hi")
        if not 1 <= self.posterize_bits[0] <= self.posterize_bits[1] <= 8:
            raise ValueError("StrongAugment.posterize_bits must be (lo, hi) with 1 <= lo <= hi <= 8")
        if not 0.5 <= self.solarize_threshold[0] <= self.solarize_threshold[1] <= 1.0:
            raise ValueError("StrongAugment.solarize_threshold must lie in [0.5, 1]")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError("StrongAugment.blur_sigma must be (lo, hi) with 0 < lo <= hi")

    def __call__(self, images: torch.Tensor, generator: Seed) -> torch.Tensor:
        """A strong view of ``images`` (``(B, H, W)`` or ``(B, C, H, W)`` in [0, 1]), same shape."""
        g = as_generator(generator)
        x, back = as_bchw(images)
        n = x.shape[0]
        # Every parameter is drawn for every sample whether used or not: the stream of draws, and so
        # the result for a seed, does not depend on which coins came up.
        jitter = bernoulli(g, n, self.jitter_p)
        bright = uniform(g, n, 1 - self.brightness, 1 + self.brightness)
        contrast = uniform(g, n, 1 - self.contrast, 1 + self.contrast)
        gamma = torch.exp(uniform(g, n, math.log(self.gamma[0]), math.log(self.gamma[1])))
        grey = bernoulli(g, n, self.grey_p)
        grey_kind = torch.randint(0, 3, (n,), generator=g)
        bits = torch.randint(self.posterize_bits[0], self.posterize_bits[1] + 1, (n,), generator=g)
        thresh = uniform(g, n, *self.solarize_threshold)
        blur = bernoulli(g, n, self.blur_p)
        sigma = uniform(g, n, *self.blur_sigma)

        x = x.clamp(0.0, 1.0)
        jittered = adjust_gamma(adjust_contrast(adjust_brightness(x, bright), contrast), gamma)
        x = _where(jitter, jittered, x)
        if bool(grey.any()):
            x = _where(grey & (grey_kind == 0), posterize(x, bits), x)
            x = _where(grey & (grey_kind == 1), equalize(x), x)
            x = _where(grey & (grey_kind == 2), solarize_fold(x, thresh), x)
        if bool(blur.any()):
            x = _where(blur, gaussian_blur(x, sigma), x)
        return back(x.clamp(0.0, 1.0))


def _where(chosen: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen.to(old.device).view(-1, 1, 1, 1), new, old)
