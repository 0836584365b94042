"""Training-time access to a backbone's prompt encoder and mask decoder, with gradients.

A backbone's own ``decode``/``propagate`` run under ``inference_mode``; fine-tuning needs the same
computation with autograd, from the same cached embeddings and the same prompt conventions, so
that what is trained is exactly what the engine later runs. A :class:`DecoderAdapter` provides it:

* :meth:`~DecoderAdapter.coarse_features` / :meth:`~DecoderAdapter.to_slice_grid`: the coarse
  head's input and the map from the network's frame back to a slice's ``(H, W)`` pixels (the
  backbone's methods of the same names, made safe for autograd);
* :meth:`~DecoderAdapter.decode`: one key-slice decode from a box and XY points in slice pixels,
  returning ``(H, W)`` mask logits on the slice grid, the IoU head's score and (SAM-2) the object
  score logit;
* :meth:`~DecoderAdapter.state_dicts` / :meth:`~DecoderAdapter.load_state_dicts`: the task-model
  components ``prompt_encoder`` and ``mask_decoder``.

Parts of a decoder that the cached embeddings already depend on (SAM-2's ``conv_s0``/``conv_s1``,
applied at embedding time) stay frozen, so a fine-tuned model can reuse every cached embedding.

This module imports torch at import time; :func:`adapter_for` is the entry point.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclasses.dataclass
class DecodeOutput:
    """One decode with gradients.

    Attributes:
        logits: ``(H, W)`` float32 mask logits on the slice grid (> 0 inside).
        iou: scalar, the IoU head's prediction for this mask.
        object_score: scalar object-presence logit (SAM-2), or None.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    object_score: torch.Tensor | None


class DecoderAdapter:
    """Base class; see the module docstring. Build one with :func:`adapter_for`."""

    #: the backbone propagates by decoding a box carried from the previous slice's mask (2D models).
    carries_boxes: bool = False
    #: the backbone's shipped decoder was trained with point prompts (SAM-2); LiteMedSAM's was
    #: trained on boxes alone and answers a point with an unrelated mask.
    knows_points: bool = True

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    @property
    def carries_points(self) -> bool:
        """The carried prompts also hold the previous mask's deep point and hole point."""
        return bool(getattr(self.backbone, "carry_points", False))  # 2D backbones only

    @property
    def device(self) -> torch.device:
        return torch.device(self.backbone.device)  # type: ignore[attr-defined]

    # -- components ------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        """Task-model component name -> the backbone's module (trained in place)."""
        raise NotImplementedError

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes (per component, ``"comp.name"``) that must not train."""
        return ()

    def trainable_parameters(self) -> list[nn.Parameter]:
        frozen = self.frozen_prefixes()
        out = []
        for comp, module in self.modules().items():
            for name, p in module.named_parameters():
                if not any(f"{comp}.{name}".startswith(f) for f in frozen):
                    out.append(p)
        return out

    def prepare_for_task(self) -> Callable[[], None]:
        """Set the backbone's propagation up the way task models run; returns an undo function.

        The default changes nothing. See :meth:`LiteMedSamAdapter.prepare_for_task`.
        """
        return lambda: None

    def train(self, mode: bool = True) -> None:
        for module in self.modules().values():
            module.train(mode)

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Detached CPU copies of every component's state dict."""
        return {comp: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for comp, m in self.modules().items()}

    def load_state_dicts(self, weights: Mapping[str, Mapping[str, Any]]) -> None:
        """Load ``component -> state dict`` (tensors or arrays) strictly into the backbone."""
        for comp, module in self.modules().items():
            if comp not in weights:
                raise KeyError(f"no {comp} weights to load")
            own = module.state_dict()
            state = {}
            for k, v in weights[comp].items():
                t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
                state[k] = t.to(device=own[k].device if k in own else "cpu",
                                dtype=own[k].dtype if k in own else t.dtype)
            module.load_state_dict(state, strict=True)

    # -- geometry --------------------------------------------------------------------------------
    def coarse_features(self, embedding: Any) -> list[torch.Tensor]:
        """The backbone's coarse-head input (finest first), float32 on the device, autograd-safe."""
        # Cached embeddings were made under inference_mode; a copy made outside it can enter autograd.
        feats = self.backbone.coarse_features(embedding)  # type: ignore[attr-defined]
        return [f.to(self.device, torch.float32).clone() for f in feats]

    def to_slice_grid(self, maps: torch.Tensor, embedding: Any, shape_hw: tuple[int, int]) -> torch.Tensor:
        """Network-frame maps ``(N, C, h, w)`` -> ``(N, C, H, W)`` on the slice grid (the backbone's rule)."""
        return self.backbone.to_slice_grid(maps, embedding, tuple(shape_hw))  # type: ignore[attr-defined]

    def with_features(self, embedding: Any, features: Sequence[torch.Tensor]) -> Any:
        """``embedding`` with its features replaced by ``features`` (the form :meth:`coarse_features`
        gives, e.g. DFE-enhanced), which :meth:`decode` then decodes, gradients included."""
        feats = tuple(features)
        single = isinstance(embedding.features, torch.Tensor)  # LiteMedSAM: one map, not a tuple
        return dataclasses.replace(embedding, features=feats[0] if single else feats)

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, embedding: Any, shape_hw: tuple[int, int], box: Box | None,
               positive: Sequence[Point] = (), negative: Sequence[Point] = ()) -> DecodeOutput:
        """Decode one mask from an XYXY ``box`` and XY points (slice pixels), with gradients."""
        raise NotImplementedError


class LiteMedSamAdapter(DecoderAdapter):
    """LiteMedSAM: one 256x64x64 embedding; slices are scaled to 256 on the long side and padded."""

    carries_boxes = True
    knows_points = False

    def prepare_for_task(self) -> Callable[[], None]:
        """Carry points as well as boxes, and stop on an empty mask only.

        The stop rule's other tests judge the shipped decoder, which always outlines something in
        a box; a task model's decoder is trained on carried prompts that step past the end of a
        structure, where the answer is an empty mask, and those tests misfire on its masks
        (measured on held-out phantoms, propagating from PCSW's key slice alone: mean Dice 0.84
        with them, 0.89 without). Carried points (the previous mask's deep point, and a negative
        point in its hole) keep a ring a ring (0.89 -> 0.94 there).
        """
        bb = self.backbone
        before = (bb.stop_rule, bb.carry_points)  # type: ignore[attr-defined]
        bb.stop_rule = dataclasses.replace(bb.stop_rule, enabled=False)  # type: ignore[attr-defined]
        bb.carry_points = True  # type: ignore[attr-defined]

        def undo() -> None:
            bb.stop_rule, bb.carry_points = before  # type: ignore[attr-defined]

        return undo

    def modules(self) -> dict[str, nn.Module]:
        net = self.backbone.net  # type: ignore[attr-defined]
        return {"prompt_encoder": net.prompt_encoder, "mask_decoder": net.mask_decoder}

    def decode(self, embedding: Any, shape_hw: tuple[int, int], box: Box | None,
               positive: Sequence[Point] = (), negative: Sequence[Point] = ()) -> DecodeOutput:
        net = self.backbone.net  # type: ignore[attr-defined]
        dev = self.device
        boxes = points = None
        if box is not None:
            boxes = torch.tensor([[list(box)]], dtype=torch.float32, device=dev) * embedding.scale
        pts = [*positive, *negative]
        if pts:
            coords = torch.tensor([pts], dtype=torch.float32, device=dev) * embedding.scale
            labels = torch.tensor([[1] * len(positive) + [0] * len(negative)], dtype=torch.float32, device=dev)
            points = (coords, labels)
        pe = net.prompt_encoder
        sparse, dense = pe(points=points, boxes=boxes, masks=None)
        low_res, iou = net.mask_decoder(
            image_embeddings=embedding.features.to(dev, torch.float32).clone(),
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        logits = self.to_slice_grid(low_res.float(), embedding, shape_hw)[0, 0]
        return DecodeOutput(logits, iou.reshape(-1)[0].float(), None)


class Sam2Adapter(DecoderAdapter):
    """SAM-2.1: three FPN levels; the slice is resized (not padded) to the square input.

    A key-slice decode is SAM-2's conditioning-frame decode: no memory yet, so the lowest-resolution
    features get ``no_mem_embed`` added (``directly_add_no_mem_embed``), box corners are points with
    labels 2 and 3 before the clicks, and coordinates are scaled from the slice to the input size.
    """

    def modules(self) -> dict[str, nn.Module]:
        model = self.backbone.model  # type: ignore[attr-defined]
        return {"prompt_encoder": model.sam_prompt_encoder, "mask_decoder": model.sam_mask_decoder}

    def frozen_prefixes(self) -> tuple[str, ...]:
        # Applied when the slice was embedded: training them would make every cached embedding stale.
        return ("mask_decoder.conv_s0.", "mask_decoder.conv_s1.")

    def decode(self, embedding: Any, shape_hw: tuple[int, int], box: Box | None,
               positive: Sequence[Point] = (), negative: Sequence[Point] = ()) -> DecodeOutput:
        model = self.backbone.model  # type: ignore[attr-defined]
        dev = self.device
        h, w = shape_hw
        size = float(model.image_size)
        pts: list[Point] = []
        labels: list[int] = []
        if box is not None:
            pts += [(box[0], box[1]), (box[2], box[3])]
            labels += [2, 3]
        pts += [*positive, *negative]
        labels += [1] * len(positive) + [0] * len(negative)
        coords = torch.tensor([pts], dtype=torch.float32, device=dev)
        coords = coords / torch.tensor([w, h], dtype=torch.float32, device=dev) * size
        point_labels = torch.tensor([labels], dtype=torch.int32, device=dev)
        feats = [f.to(dev, torch.float32).clone() for f in embedding.features]
        image_embed = feats[-1]
        if model.directly_add_no_mem_embed:
            image_embed = image_embed + model.no_mem_embed.view(1, -1, 1, 1).to(image_embed.dtype)
        pe = model.sam_prompt_encoder
        sparse, dense = pe(points=(coords, point_labels), boxes=None, masks=None)
        low_res, iou, _, object_score = model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=feats[:-1] if model.use_high_res_features_in_sam else None,
        )
        logits = self.to_slice_grid(low_res.float(), embedding, shape_hw)[0, 0]
        score = object_score.reshape(-1)[0].float() if object_score is not None else None
        return DecodeOutput(logits, iou.reshape(-1)[0].float(), score)


def adapter_for(backbone: Backbone) -> DecoderAdapter:
    """The adapter of a built backbone (LiteMedSAM or SAM-2.1).

    Raises:
        TypeError: a backbone this module does not know how to fine-tune.
    """
    from ..backbones.litemedsam import LiteMedSamBackbone

    if isinstance(backbone, LiteMedSamBackbone):
        return LiteMedSamAdapter(backbone)
    from ..backbones.sam2_backbone import Sam2Backbone  # imports sam2 itself only when a model is built

    if isinstance(backbone, Sam2Backbone):
        return Sam2Adapter(backbone)
    raise TypeError(f"backbone {backbone.name!r} ({type(backbone).__name__}) cannot be fine-tuned: "
                    "only LiteMedSAM and SAM-2.1 backbones are supported")
