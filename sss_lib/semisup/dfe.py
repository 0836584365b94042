"""DFE: Discriminative Feature Enhancement (SSS_METHOD.md section 3).

For a weak view ``a`` and a strong view ``b`` of the same unlabeled slice, at every feature scale l:

1. ``P_l = proj_in_l(F_l)``: a 1x1 convolution to the common width ``D`` where the scale's
   channels differ from ``D`` (identity where they match);
2. ``A_l = Conv3x3(P_l)``, the same weights for both views;
3. ``s = cos(GAP(A^a_l), GAP(A^b_l))``, one value per sample (GAP: global average pooling);
4. ``w = sigmoid(s)``;
5. ``fused = w * MLP(A^a_l) + (1 - w) * MLP(A^b_l)``, the MLP per pixel over channels
   (D -> 2D -> 2D -> D, LayerNorm + ReLU after each hidden layer);
6. ``discrepancy = (1 - s) * (A^b_l - A^a_l)``: the more the views disagree, the more is kept;
7. ``enhanced_l = proj_out_l(fused + discrepancy)`` back to the scale's own channels, and the
   strong view's enhanced features ``F^b_l + enhanced_l`` go to the decoder.

Shapes: every feature map is ``(B, C_l, H_l, W_l)``; the weak and strong lists hold the same
shapes. LiteMedSAM gives one scale ``[(B, 256, 64, 64)]``; SAM-2 three FPN levels
``[(B, 32, 256, 256), (B, 64, 128, 128), (B, 256, 64, 64)]``.

Cost: the MLP runs on every pixel of every scale at width D (about ``8 * D^2`` multiply-adds per
pixel per view). With SAM-2's 256x256 level and D = 256 that is ~34 GMAC per view per slice; pass
a smaller ``width`` (e.g. 64) for SAM-2 on modest GPUs.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PixelMLP(nn.Module):
    """Per-pixel MLP over channels: ``(B, D, H, W) -> (B, D, H, W)``, D -> 2D -> 2D -> D.

    LayerNorm + ReLU follow each hidden layer; the output layer is linear.
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 2 * channels
        self.net = nn.Sequential(
            nn.Linear(channels, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@dataclasses.dataclass
class DfeTerms:
    """The intermediate terms of one scale, at the common width D (diagnostics and tests).

    Attributes:
        attended_weak / attended_strong: ``A^a_l`` and ``A^b_l``, ``(B, D, H_l, W_l)``.
        similarity: ``s``, ``(B,)``.
        fused: ``w * MLP(A^a) + (1 - w) * MLP(A^b)``, ``(B, D, H_l, W_l)``.
        discrepancy: ``(1 - s) * (A^b - A^a)``, ``(B, D, H_l, W_l)``.
    """

    attended_weak: torch.Tensor
    attended_strong: torch.Tensor
    similarity: torch.Tensor
    fused: torch.Tensor
    discrepancy: torch.Tensor


@dataclasses.dataclass
class DfeOutput:
    """What :class:`DFE` returns, one entry per scale.

    Attributes:
        enhanced: the enhancement ``proj_out(fused + discrepancy)``, ``(B, C_l, H_l, W_l)``.
        features: the strong view's features plus the enhancement, ``(B, C_l, H_l, W_l)``:
            what the decoder consumes.
        terms: the intermediate terms at width D.
    """

    enhanced: list[torch.Tensor]
    features: list[torch.Tensor]
    terms: list[DfeTerms]

    @property
    def similarity(self) -> torch.Tensor:
        """``s`` of every scale, ``(L, B)`` (for logging how much the views agree)."""
        return torch.stack([t.similarity for t in self.terms])


class DFE(nn.Module):
    """Discriminative Feature Enhancement over one or more feature scales.

    Args:
        in_channels: channels ``C_l`` of each scale, e.g. ``[256]`` or ``[32, 64, 256]``.
        width: the common width D (None: ``max(in_channels)``; the paper uses 256).
        shared: True shares the Conv3x3 and the MLP across scales (what the common width is
            for); False gives each scale its own (still at width D).
        zero_init_gain: **(ours)** multiply each scale's enhancement by a learnable scalar that
            starts at 0, so a pretrained decoder sees unchanged features at the first step (the
            trainer's default, ``SemiSupConfig.dfe_zero_init_gain``). Off (this class's default),
            the module is exactly the formula of the module docstring.
    """

    def __init__(self, in_channels: Sequence[int], width: int | None = None, *, shared: bool = True,
                 zero_init_gain: bool = False) -> None:
        super().__init__()
        channels = [int(c) for c in in_channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"DFE needs one positive channel count per scale, got {list(in_channels)}")
        self.in_channels = tuple(channels)
        self.width = int(width) if width is not None else max(channels)
        self.shared = shared
        d = self.width
        self.proj_in = nn.ModuleList(nn.Identity() if c == d else nn.Conv2d(c, d, 1) for c in channels)
        self.proj_out = nn.ModuleList(nn.Identity() if c == d else nn.Conv2d(d, c, 1) for c in channels)
        n = 1 if shared else len(channels)
        self.attend = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in range(n))
        self.mlp = nn.ModuleList(PixelMLP(d) for _ in range(n))
        self.gain = nn.Parameter(torch.zeros(len(channels))) if zero_init_gain else None

    def forward(self, weak: Sequence[torch.Tensor], strong: Sequence[torch.Tensor]) -> DfeOutput:
        """Enhance the strong view's features with the weak view's.

        Args:
            weak: per scale ``(B, C_l, H_l, W_l)`` features of the weak view.
            strong: the strong view's features, same shapes.
        """
        self._check(weak, strong)
        enhanced: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        terms: list[DfeTerms] = []
        for level, (fa, fb) in enumerate(zip(weak, strong)):
            t = self._scale(level, fa, fb)
            e = self.proj_out[level](t.fused + t.discrepancy)
            if self.gain is not None:
                e = e * self.gain[level]
            enhanced.append(e)
            features.append(fb + e)
            terms.append(t)
        return DfeOutput(enhanced, features, terms)

    def self_enhance(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The features of one view enhanced with themselves: ``forward(f, f).features``.

        With identical views ``s = 1``, so ``fused = MLP(A)`` and the discrepancy is zero; this
        computes that directly (one pass). It is what the coarse head reads for a labeled slice, the
        teacher's weak view and at inference, where a slice has only one view.
        """
        if len(features) != len(self.in_channels):
            raise ValueError(f"DFE was built for {len(self.in_channels)} scale(s) but got {len(features)}")
        out = []
        for level, f in enumerate(features):
            k = 0 if self.shared else level
            e = self.proj_out[level](self.mlp[k](self.attend[k](self.proj_in[level](f))))
            if self.gain is not None:
                e = e * self.gain[level]
            out.append(f + e)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, "torch.Tensor | np.ndarray"],
                        in_channels: Sequence[int]) -> "DFE":
        """A DFE for ``in_channels`` whose width, sharing and gain match ``state``, loaded strictly.

        Raises:
            ValueError: ``state`` is not the state dict of a DFE for these channels.
        """
        if "attend.0.weight" not in state:
            raise ValueError("these weights are not a DFE's (no attend.0.weight)")
        width = int(np.shape(state["attend.0.weight"])[0])
        shared = "attend.1.weight" not in state
        dfe = cls(in_channels, width, shared=shared, zero_init_gain="gain" in state)
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in state.items()}
        dfe.load_state_dict(tensors, strict=True)
        return dfe

    def _scale(self, level: int, fa: torch.Tensor, fb: torch.Tensor) -> DfeTerms:
        k = 0 if self.shared else level
        batch = fa.shape[0]
        # One pass over both views: the shared weights see them as one batch.
        both = self.attend[k](self.proj_in[level](torch.cat([fa, fb])))
        a, b = both[:batch], both[batch:]
        s = F.cosine_similarity(a.mean(dim=(2, 3)), b.mean(dim=(2, 3)), dim=1, eps=1e-8)
        mlp = self.mlp[k](both)
        w = torch.sigmoid(s)[:, None, None, None]
        fused = w * mlp[:batch] + (1.0 - w) * mlp[batch:]
        discrepancy = (1.0 - s)[:, None, None, None] * (b - a)
        return DfeTerms(a, b, s, fused, discrepancy)

    def _check(self, weak: Sequence[torch.Tensor], strong: Sequence[torch.Tensor]) -> None:
        n = len(self.in_channels)
        if len(weak) != n or len(strong) != n:
            raise ValueError(f"DFE was built for {n} scale(s) but got {len(weak)} weak and "
                             f"{len(strong)} strong feature maps; pass one map per scale")
        for level, (fa, fb) in enumerate(zip(weak, strong)):
            if fa.shape != fb.shape:
                raise ValueError(f"DFE scale {level}: weak {tuple(fa.shape)} and strong {tuple(fb.shape)} "
                                 "differ; both views must come from the same slice at the same size")
            if fa.ndim != 4 or fa.shape[1] != self.in_channels[level]:
                raise ValueError(f"DFE scale {level}: expected (B, {self.in_channels[level]}, H, W), "
                                 f"got {tuple(fa.shape)}")


class DfeCoarseHead(nn.Module):
    """A coarse head that reads its features through a DFE: ``head(dfe.self_enhance(features))``.

    **(ours)** The student's coarse head sees DFE-enhanced features of the strong views during
    semi-supervised training; reading the labeled slices, the teacher's weak views and the slices
    at inference through the same DFE (each enhanced with itself, the only view there is) keeps the
    head's input the same kind of feature everywhere. Without it the head would learn on enhanced
    features that inference never produces. Same interface as :class:`sss_lib.coarse_head.CoarseHead`
    (``num_classes``, ``in_channels``; features finest first -> logits ``(N, K + 1, h_0, w_0)``).
    """

    def __init__(self, head: nn.Module, dfe: DFE) -> None:
        super().__init__()
        if tuple(head.in_channels) != tuple(dfe.in_channels):
            raise ValueError(f"the coarse head reads channels {tuple(head.in_channels)} but the DFE was built "
                             f"for {tuple(dfe.in_channels)}")
        self.head = head
        self.dfe = dfe

    @property
    def num_classes(self) -> int:
        return int(self.head.num_classes)

    @property
    def in_channels(self) -> tuple[int, ...]:
        return tuple(self.head.in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        dtype = next(self.dfe.parameters()).dtype
        return self.head(self.dfe.self_enhance([f.to(dtype) for f in features]))
