"""The coarse head: a light multi-class decoder on a backbone's frozen image features.

It gives every slice a softmax over background + the task's classes; PCSW (section 2 of
SSS_METHOD.md) turns those probabilities into box and point prompts. It never sees prompts.

Input: the feature maps a backbone's ``coarse_features(embedding)`` returns, high to low
resolution, each ``(N, C_l, h_l, w_l)`` in the network's input frame (LiteMedSAM: one
``(N, 256, 64, 64)`` map; SAM-2: ``(N, 32, s/4, s/4)``, ``(N, 64, s/8, s/8)``, ``(N, 256, s/16, s/16)``).
Output: logits ``(N, K + 1, h_0, w_0)`` at the first (finest) map's resolution, channel 0 =
background, channel ``c`` = the ``c``-th class of the task in label order. The backbone's
``to_slice_grid`` maps them onto a slice's ``(H, W)`` pixels.

Architecture (**ours**): per level a 1x1 projection to ``width`` channels, upsampled to the finest
level and summed (an FPN top-down sum without the lateral refinements), then two 3x3 conv +
GroupNorm + GELU blocks and a 1x1 classifier. The architecture is read back from the weights alone
(:meth:`CoarseHead.from_state_dict`), so a task-model file needs no extra settings for it.

This module imports torch at import time; import it only where torch is needed.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_WIDTH = 32
_GROUPS = 8


class CoarseHead(nn.Module):
    """Per-pixel class logits from multi-scale image features (see the module docstring).

    Args:
        in_channels: channels of each input level, finest first.
        num_classes: foreground classes ``K`` (the output has ``K + 1`` channels).
        width: hidden channels (a multiple of 8).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        if not in_channels or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"in_channels must list at least one positive channel count, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if width < _GROUPS or width % _GROUPS:
            raise ValueError(f"width must be a positive multiple of {_GROUPS}, got {width}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(_GROUPS, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(_GROUPS, width), nn.GELU(),
        )
        self.classifier = nn.Conv2d(width, num_classes + 1, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features`` (finest first, each ``(N, C_l, h_l, w_l)``) -> logits ``(N, K + 1, h_0, w_0)``."""
        if len(features) != len(self.lateral):
            raise ValueError(f"coarse head expects {len(self.lateral)} feature level(s), got {len(features)}")
        size = features[0].shape[-2:]
        dtype = self.classifier.weight.dtype
        x = None
        for proj, f in zip(self.lateral, features):
            y = proj(f.to(dtype))
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        return self.classifier(self.fuse(x))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, "torch.Tensor | np.ndarray"]) -> "CoarseHead":
        """A head whose architecture matches ``state`` (as saved in a task model), loaded strictly.

        Raises:
            ValueError: ``state`` is not the state dict of a :class:`CoarseHead`.
        """
        levels = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"lateral\.(\d+)\.weight", k)))
        if not levels or levels != list(range(len(levels))) or "classifier.weight" not in state:
            raise ValueError("these weights are not a coarse head's (no lateral.N.weight / classifier.weight)")
        in_channels = [int(np.shape(state[f"lateral.{n}.weight"])[1]) for n in levels]
        width = int(np.shape(state["lateral.0.weight"])[0])
        num_classes = int(np.shape(state["classifier.weight"])[0]) - 1
        head = cls(in_channels, num_classes, width)
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in state.items()}
        head.load_state_dict(tensors, strict=True)
        return head


def build_coarse_head(features: Sequence[torch.Tensor], num_classes: int, *, width: int = DEFAULT_WIDTH,
                      seed: int | None = None) -> CoarseHead:
    """A fresh head sized for ``features`` (one slice's ``coarse_features``), seeded if asked."""
    channels = [int(f.shape[1]) for f in features]
    if seed is None:
        return CoarseHead(channels, num_classes, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CoarseHead(channels, num_classes, width)


def slice_probabilities(head: CoarseHead, geometry: Any, embedding: Any, shape_hw: tuple[int, int]) -> np.ndarray:
    """Softmax probabilities ``(K + 1, H, W)`` float32 of one slice of ``shape_hw``, on its grid.

    ``geometry`` provides ``coarse_features(embedding)`` and ``to_slice_grid(maps, embedding,
    shape_hw)``: a :class:`sss_lib.trainer.adapters.DecoderAdapter` (or a backbone with those methods).
    """
    device = next(head.parameters()).device
    with torch.inference_mode():
        feats = [f.to(device) for f in geometry.coarse_features(embedding)]
        logits = geometry.to_slice_grid(head(feats).float(), embedding, tuple(shape_hw))
        return torch.softmax(logits, dim=1)[0].cpu().numpy().astype(np.float32)


def stack_probabilities(head: CoarseHead, geometry: Any, lookup: Callable[[int], Any],
                        stack_shape: tuple[int, int, int], labels: Sequence[int]) -> dict[int, np.ndarray]:
    """Class label -> ``(S, H, W)`` float32 probabilities over a stack of ``stack_shape``.

    ``lookup`` maps a slice index to its embedding (e.g.
    :meth:`sss_lib.engine.SegmentationSession.embedding`, so the engine's cache is used);
    ``labels`` are the task's class labels in channel order (channel ``c`` -> ``labels[c - 1]``).
    """
    if len(labels) != head.num_classes:
        raise ValueError(f"the head has {head.num_classes} classes but {len(labels)} labels were given")
    n_slices, h, w = stack_shape
    was_training = head.training
    head.eval()
    try:
        probs = np.empty((head.num_classes + 1, n_slices, h, w), np.float32)
        for s in range(n_slices):
            probs[:, s] = slice_probabilities(head, geometry, lookup(s), (h, w))
    finally:
        head.train(was_training)
    return {int(label): probs[c + 1] for c, label in enumerate(labels)}
