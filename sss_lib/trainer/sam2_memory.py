"""SAM-2's memory path in semi-supervised training (``SemiSupConfig.memory_path``; issue 13).

At inference a SAM-2 task model decodes PCSW's key slice from its prompt and every other slice
from *memory-conditioned* features: the slice's own features after memory attention over the
memory bank of the slices already tracked from the key slice (SSS_METHOD.md section 1). Without
this module training only ever sees the memory-free key-slice decode: the teacher pseudo-labels
every slice from a prompt of its own and the student's decoder learns from the same kind of
decode. With it, for every class PCSW accepts on an unlabeled volume:

* **teacher**: :class:`MemorySweeps` runs the propagation Auto-segment runs (the engine's rule of
  :meth:`sss_lib.backbones.sam2_backbone.Sam2Backbone.propagate`: the key slice from its prompt
  alone, then one sweep upwards and one downwards, each in its own SAM-2 state holding only the
  key slice as conditioning frame, ended after ``stop_after_empty`` empty slices) with the
  teacher's decoder, so a slice's pseudo-label is exactly what Auto-segment gives there;
* **student**: :func:`memory_decode` decodes a (strong) view of a non-key slice from that view's
  features conditioned on the teacher's memory bank of the sweep that reached the slice (the
  memory SAM-2 had when it tracked the slice), with gradients into the prompt encoder and mask
  decoder. Memory attention and the memory encoder stay frozen (they are not task-model parts).
  A key slice is decoded from its key prompt, as the engine does;
* **labeled slices** (supervised): half of the decoder's samples (a seeded coin each) that lie off
  their class's key slice (:func:`labeled_key_prompt`, PCSW's prompt from the label) are decoded
  the same way, from the memory of the student's own propagation from that key slice, against
  the label; the other half keep the prompted decode, so the decoder still learns to answer prompts.

**(ours)** The training decode leaves out SAM-2's object-score gate (masks of an object it calls
absent replaced by -1024), which has no gradient; where the object score is positive its logits
are the engine's. Slices a sweep never reached (the run ended first) have no target for the class.

Imports torch (and, through the backbone, sam2); used only when a SAM-2 backbone trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..pcsw import PcswConfig, run_pcsw
from ..prompts import SlicePrompt
from .adapters import DecodeOutput, DecoderAdapter

Box = tuple[float, float, float, float]


@dataclasses.dataclass
class MemoryTarget:
    """One class on one slice as Auto-segment reaches it.

    Attributes:
        logits: ``(H, W)`` float32, the teacher's logits there (the engine's propagation output).
        key_prompt: set on the class's key slice: that slice is decoded from this prompt.
        state: the teacher's SAM-2 inference state of the sweep that reached the slice (its memory
            bank), None on the key slice.
        slice_index: the slice; reverse: the sweep went downwards.
    """

    logits: np.ndarray
    key_prompt: SlicePrompt | None
    state: dict | None
    slice_index: int
    reverse: bool


def key_prompts(probabilities: Mapping[int, np.ndarray], *, in_plane_spacing: tuple[float, float],
                slice_spacing: float, class_ranges: Mapping[int, tuple[float, float]] | None,
                config: PcswConfig, points: bool = True) -> dict[int, SlicePrompt]:
    """PCSW's key-slice prompt of every class it accepts (``"ok"``), as Auto-segment would prompt.

    Args:
        probabilities: label -> ``(S, H, W)`` coarse probabilities of the whole volume.
        points: keep the prompts' points (False: boxes only, ``SemiSupConfig.teacher_points``).
    """
    results = run_pcsw(probabilities, in_plane_spacing=in_plane_spacing, slice_spacing=slice_spacing,
                       class_ranges=class_ranges, config=config)
    out = {}
    for label, res in results.items():
        if res.status == "ok" and res.prompt is not None:
            p = res.prompt
            out[int(label)] = p if points else dataclasses.replace(p, positive_points=[], negative_points=[])
    return out


def labeled_key_prompt(labels: np.ndarray, label: int, spacing_xy: tuple[float, float],
                       margin_px: int) -> SlicePrompt | None:
    """The key-slice prompt PCSW makes from a perfect coarse map (steps 6-7 of SSS_METHOD.md
    section 2): the slice where ``label`` has its largest area, its tight box plus ``margin_px``,
    and its deepest pixel as positive point. None where the class is absent from ``labels``
    ``(S, H, W)``."""
    from ..pcsw.geometry import deepest_point, tight_box

    areas = (labels == label).sum(axis=(1, 2))
    if not areas.any():
        return None
    key = int(areas.argmax())
    mask = labels[key] == label
    x, y = deepest_point(mask, spacing_xy)
    return SlicePrompt(key, tuple(float(v) for v in tight_box(mask, margin_px)),  # type: ignore[arg-type]
                       [(float(x), float(y))], [], source="auto")


class MemorySweeps:
    """The teacher's memory propagation of one class through one volume, for the slices wanted.

    Args:
        backbone: the :class:`~sss_lib.backbones.sam2_backbone.Sam2Backbone` (its decoder modules
            are the teacher's while :meth:`run` runs; see ``semisup_step.swapped_modules``).

    Each state keeps every tracked slice's memory (``sss_new_state``'s ``forget_behind`` off):
    :func:`memory_decode` reads it afterwards at slices the sweep has passed.
    """

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone
        self.model = backbone.model

    def run(self, lookup: Callable[[int], Any], shape_shw: tuple[int, int, int], label: int, prompt: SlicePrompt,
            wanted: Iterable[int]) -> dict[int, MemoryTarget]:
        """slice -> :class:`MemoryTarget` for each wanted slice the propagation reaches.

        Args:
            lookup: slice index -> the slice's cached (weak) embedding.
            shape_shw: ``(S, H, W)`` of the stack; prompt: the class's key-slice prompt (slice pixels).
        """
        model, stop_after = self.model, self.backbone.stop_after_empty
        key = int(prompt.key_slice)
        wanted = sorted({int(s) for s in wanted})
        box = tuple(float(v) for v in prompt.box) if prompt.box is not None else None
        out: dict[int, MemoryTarget] = {}
        directions = [d for d in (+1, -1) if any((s - key) * d > 0 for s in wanted)] or [+1]
        for direction in directions:
            state = model.sss_new_state(*shape_shw, lookup)
            model.sss_add_prompt(state, key, label, box, list(prompt.positive_points), list(prompt.negative_points))
            model.sss_finish_prompts(state)
            if key in wanted and key not in out:
                logits, _ = model.sss_track_slice(state, key, [label], False)[label]
                out[key] = MemoryTarget(logits, prompt, None, key, False)
            far = max(wanted) if direction > 0 else min(wanted)
            empty_run = 0
            for s in range(key + direction, far + direction, direction):
                logits, score = model.sss_track_slice(state, s, [label], direction < 0)[label]
                if s in wanted:
                    out[s] = MemoryTarget(logits, None, state, s, direction < 0)
                if stop_after is None:
                    continue
                empty_run = empty_run + 1 if (score < 0 or not (logits > 0).any()) else 0
                if empty_run >= stop_after:  # the engine's run has ended: it reaches no further
                    break
        return out


def memory_decode(adapter: DecoderAdapter, embedding: Any, target: MemoryTarget, label: int,
                  shape_hw: tuple[int, int]) -> DecodeOutput:
    """The student's decode of one view of ``target``'s slice, with gradients (module docstring).

    Args:
        embedding: the view's :class:`~sss_lib.backbones.sam2_backbone.Sam2Embedding`.
        label: the class (SAM-2 object id of ``target.state``).
        shape_hw: the slice's ``(H, W)``.

    Returns:
        ``(H, W)`` logits on the slice grid, the IoU head's score and the object score logit.
    """
    if target.key_prompt is not None:
        p = target.key_prompt
        return adapter.decode(embedding, shape_hw, p.box, list(p.positive_points), list(p.negative_points))
    assert target.state is not None
    model = adapter.backbone.model  # type: ignore[attr-defined]
    state = target.state
    with torch.no_grad():  # memory attention is frozen; the cached features need no gradient
        feats = model.sss_to_compute(embedding.features)
        _, vision, vision_pos, sizes = model._prepare_backbone_features(
            {"backbone_fpn": list(feats), "vision_pos_enc": list(model.sss_pos_enc(feats))})
        pix = model._prepare_memory_conditioned_features(
            frame_idx=target.slice_index, is_init_cond_frame=False, current_vision_feats=vision[-1:],
            current_vision_pos_embeds=vision_pos[-1:], feat_sizes=sizes[-1:],
            output_dict=state["output_dict_per_obj"][state["obj_id_to_idx"][label]],
            num_frames=state["num_frames"], track_in_reverse=target.reverse)
        # Plain (not inference-mode) copies, so that the decoder can save them for backward.
        pix = pix.clone()
        high_res = [x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *s).clone()
                    for x, s in zip(vision[:-1], sizes[:-1])]
    dev = pix.device
    pe = model.sam_prompt_encoder
    # No prompt on a tracked slice: SAM-2's padding point (label -1), as _forward_sam_heads.
    sparse, dense = pe(points=(torch.zeros(1, 1, 2, device=dev), -torch.ones(1, 1, dtype=torch.int32, device=dev)),
                       boxes=None, masks=None)
    multimask = model._use_multimask(False, None)
    low_res, iou, _, score = model.sam_mask_decoder(
        image_embeddings=pix, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=False,
        high_res_features=high_res if model.use_high_res_features_in_sam else None)
    best = int(iou[0].argmax()) if multimask else 0  # SAM-2 keeps the mask of highest predicted IoU
    logits = adapter.to_slice_grid(low_res[:, best:best + 1].float(), embedding, shape_hw)[0, 0]
    return DecodeOutput(logits, iou[0, best].float(), score.reshape(-1)[0].float() if score is not None else None)
