"""SAM-2's video predictor fed from the embedding cache instead of a folder of JPEG frames.

This module imports torch and sam2 at import time; only :mod:`.sam2_backbone` imports it, lazily,
when a SAM-2 backbone is built.

:class:`InMemoryVideoPredictor` is ``sam2.sam2_video_predictor.SAM2VideoPredictor`` with one change
of substance: ``_get_image_feature`` reads a slice's features through the engine's embedding lookup
(so no slice is ever re-encoded during propagation) and adds the positional encodings, which are the
same for every slice and are therefore kept once per model instead of once per cached slice. Its
``sss_*`` methods are the small API :class:`~.sam2_backbone.Sam2Backbone` drives:

* :meth:`~InMemoryVideoPredictor.sss_embed` one slice;
* :meth:`~InMemoryVideoPredictor.sss_new_state` a fresh per-call inference state for ``S`` slices;
* :meth:`~InMemoryVideoPredictor.sss_add_prompt` a key-slice prompt (XY points, XYXY box);
* :meth:`~InMemoryVideoPredictor.sss_track_slice` one slice of one sweep for a subset of objects.

With :attr:`~InMemoryVideoPredictor.sss_step_graphs` set, a tracked slice's step runs through
:mod:`.sam2_graphs` (CUDA graphs on a GPU) instead of SAM-2's ``track_step``, with the same results.

Every method enters ``inference_mode`` (tracking: ``no_grad``, see :meth:`~InMemoryVideoPredictor.sss_track_slice`)
and (on CUDA) bf16 autocast itself and leaves both before it returns, so a generator built on them
never leaks either mode to its caller between ``yield``\\ s.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sam2.sam2_video_predictor import SAM2VideoPredictor

from ..device import autocast_context
from .base import ABSENT_LOGIT
from .sam2_graphs import StepGraphs, gather_memory, track_core
from .sam2_backbone import Sam2Embedding

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Our keys in SAM-2's inference-state dict: the per-call feature source (see _FrameFeatures), and
# whether tracked slices beyond the memory's reach are forgotten (see sss_new_state).
_FEATURES = "sss_features"
_FORGET = "sss_forget_behind"


class _FrameFeatures:
    """Per-call source of slice features: the engine's lookup plus a one-slice memo.

    SAM-2 asks for the features of the current slice once per object and again for the memory
    encoder; the memo turns those repeated asks into one lookup (and one host-to-device copy when
    the engine keeps its cache in host memory).
    """

    def __init__(self, lookup: Callable[[int], Any], model: "InMemoryVideoPredictor") -> None:
        self._lookup = lookup
        self._model = model
        self._memo: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def get(self, frame_idx: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``(features, positional encodings)`` of slice ``frame_idx``, each ``(1, C_l, h_l, w_l)``."""
        if self._memo is None or self._memo[0] != frame_idx:
            emb = self._lookup(frame_idx)
            if not isinstance(emb, Sam2Embedding):
                raise TypeError(
                    f"slice {frame_idx}: expected a Sam2Embedding from the embedding lookup, got "
                    f"{type(emb).__name__}; embeddings of another backbone were served"
                )
            if emb.image_size != self._model.image_size:
                raise ValueError(
                    f"slice {frame_idx} was embedded at {emb.image_size} px but the model runs at "
                    f"{self._model.image_size} px; clear the embedding cache"
                )
            self._memo = (frame_idx, self._model.sss_to_compute(emb.features))
        feats = self._memo[1]
        return feats, self._model.sss_pos_enc(feats)


class InMemoryVideoPredictor(SAM2VideoPredictor):
    """SAM-2.1 video predictor whose frames are cached slice embeddings (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (shape, dtype, device) -> (1, C, h, w) positional encoding, shared by every slice.
        self._sss_pos_cache: dict[tuple, torch.Tensor] = {}
        #: runs the step of a tracked slice (CUDA graphs on a GPU); None: SAM-2's own track_step.
        self.sss_step_graphs: StepGraphs | None = None

    # -- features ---------------------------------------------------------------------------------
    def sss_preprocess(self, image: np.ndarray) -> torch.Tensor:
        """One slice ``(H, W)`` float32 in ``[0, 1]`` -> the network input ``(1, 3, s, s)``.

        Resized to ``s = image_size`` (bilinear, antialiased when shrinking), replicated to 3
        channels, normalised with ImageNet mean/std; on the model's device, float32.
        """
        size = self.image_size
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(self.device)
        x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        return (x.expand(1, 3, size, size) - mean) / std

    def sss_embed(self, image: np.ndarray) -> Sam2Embedding:
        """Embed one slice ``(H, W)`` float32 in ``[0, 1]`` (see :meth:`sss_preprocess`).

        Only the FPN features are kept: the positional encodings are shared (:meth:`sss_pos_enc`).
        """
        with torch.inference_mode():
            x = self.sss_preprocess(image)
            with autocast_context(self.device):
                out = self.forward_image(x)
            feats = tuple(f.detach() for f in out["backbone_fpn"][-self.num_feature_levels:])
        return Sam2Embedding(features=feats, image_size=self.image_size)

    def sss_to_compute(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Move cached features to the model's device (fp32 off CUDA, where there is no autocast)."""
        if self.device.type == "cuda":
            return tuple(f.to(self.device, non_blocking=True) for f in feats)
        return tuple(f.to(self.device, dtype=torch.float32) for f in feats)

    def sss_pos_enc(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The positional encodings of feature maps of these shapes, computed once per model.

        Same values and dtype the neck attaches in ``forward_image`` (it casts each to the dtype of
        its feature map).
        """
        pe = self.image_encoder.neck.position_encoding
        out = []
        for f in feats:
            key = (tuple(f.shape[-2:]), f.dtype, f.device)
            if key not in self._sss_pos_cache:
                with torch.inference_mode():
                    self._sss_pos_cache[key] = pe(f[:1]).to(f.dtype).clone()
            out.append(self._sss_pos_cache[key])
        return tuple(out)

    def _get_image_feature(self, inference_state: dict, frame_idx: int, batch_size: int) -> tuple:
        """Replaces SAM-2's version: features come from the embedding lookup, never the encoder.

        Returns what SAM-2 expects, ``(image, backbone_out, vision_feats, vision_pos_embeds,
        feat_sizes)``, with ``image`` None (no caller in the video predictor reads it).
        """
        feats, pos = inference_state[_FEATURES].get(frame_idx)
        backbone_out = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in feats],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in pos],
        }
        return (None,) + self._prepare_backbone_features(backbone_out)

    # -- state and prompts ------------------------------------------------------------------------
    def sss_new_state(self, num_slices: int, height: int, width: int, lookup: Callable[[int], Any], *,
                      forget_behind: bool = False) -> dict:
        """A fresh inference state for ``num_slices`` slices of ``height x width`` pixels.

        It has the keys ``init_state`` builds, except that there are no decoded frames: features come
        from ``lookup`` (slice index -> :class:`Sam2Embedding`).

        ``forget_behind``: :meth:`sss_track_slice` drops the outputs of tracked slices further behind
        the current one (in its direction) than :meth:`sss_memory_reach`. Memory attention never
        reads them again in a run that goes one way slice by slice, so the results are the same, and
        the state holds a few slices' memories (~0.8 MB each at 1024 px) instead of every slice's.
        Leave it off where the state is read afterwards at slices already passed.
        """
        if self.sss_step_graphs is not None:
            self.sss_step_graphs.bind([*self.parameters(), *self.buffers()])
        return {
            _FEATURES: _FrameFeatures(lookup, self),
            _FORGET: bool(forget_behind),
            "images": None,
            "num_frames": int(num_slices),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": int(height),
            "video_width": int(width),
            "device": self.device,
            "storage_device": self.device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    def sss_add_prompt(
        self,
        state: dict,
        slice_index: int,
        obj_id: int,
        box_xyxy: tuple[float, float, float, float] | None,
        positive_xy: Sequence[tuple[float, float]],
        negative_xy: Sequence[tuple[float, float]],
    ) -> None:
        """Prompt object ``obj_id`` on ``slice_index`` with slice-pixel coordinates.

        Args:
            box_xyxy: ``(x0, y0, x1, y1)`` or None.
            positive_xy / negative_xy: ``(x, y)`` points (x = column, y = row), labels 1 / 0.
        """
        pts = [*positive_xy, *negative_xy]
        labels = [1] * len(positive_xy) + [0] * len(negative_xy)
        with autocast_context(self.device):
            self.add_new_points_or_box(
                state,
                frame_idx=slice_index,
                obj_id=obj_id,
                points=np.asarray(pts, dtype=np.float32).reshape(-1, 2) if pts else None,
                labels=np.asarray(labels, dtype=np.int32) if pts else None,
                box=np.asarray(box_xyxy, dtype=np.float32) if box_xyxy is not None else None,
                normalize_coords=True,
            )

    def sss_finish_prompts(self, state: dict) -> None:
        """Encode the key slices into memory (SAM-2's pre-propagation step)."""
        with autocast_context(self.device):
            self.propagate_in_video_preflight(state)

    # -- tracking ---------------------------------------------------------------------------------
    def sss_track_slice(
        self, state: dict, slice_index: int, obj_ids: Sequence[int], reverse: bool
    ) -> dict[int, tuple[np.ndarray, float]]:
        """Track ``obj_ids`` onto ``slice_index`` in one sweep direction and wait for the result.

        This is the per-slice body of SAM-2's ``propagate_in_video`` restricted to the given objects,
        so objects that have ended cost nothing. Key slices return their prompted output.

        Returns:
            obj_id -> (logits ``(H, W)`` float32 at slice resolution, clamped below at
            :data:`ABSENT_LOGIT`; object score logit, < 0 means SAM-2 sees no object).
        """
        return self.sss_track_slice_async(state, slice_index, obj_ids, reverse).result()

    def sss_track_slice_async(
        self, state: dict, slice_index: int, obj_ids: Sequence[int], reverse: bool
    ) -> "TrackedSlice":
        """:meth:`sss_track_slice` without waiting: on a GPU the work and the copy of its results to
        the host are queued and this returns at once, so the caller can queue the next slice before
        it reads this one's :meth:`TrackedSlice.result`."""
        masks, scores = [], []
        # no_grad rather than inference_mode: autocast caches no casts in inference mode, and a run
        # holding its casts (device.autocast_cache_held) saves a cast of every weight per slice.
        with torch.no_grad(), autocast_context(self.device):
            for obj_id in obj_ids:
                obj_idx = state["obj_id_to_idx"][obj_id]
                obj_out = state["output_dict_per_obj"][obj_idx]
                if slice_index in obj_out["cond_frame_outputs"]:
                    out = obj_out["cond_frame_outputs"][slice_index]
                    low_res = out["pred_masks"]
                else:
                    out, low_res = self._run_single_frame_inference(
                        inference_state=state,
                        output_dict=obj_out,
                        frame_idx=slice_index,
                        batch_size=1,
                        is_init_cond_frame=False,
                        point_inputs=None,
                        mask_inputs=None,
                        reverse=reverse,
                        run_mem_encoder=True,
                    )
                    obj_out["non_cond_frame_outputs"][slice_index] = out
                    if state.get(_FORGET):
                        self._sss_forget_behind(obj_out["non_cond_frame_outputs"], slice_index, reverse)
                state["frames_tracked_per_obj"][obj_idx][slice_index] = {"reverse": reverse}
                masks.append(low_res.to(self.device).float())
                scores.append(out["object_score_logits"].reshape(-1)[:1].float())
            size = (state["video_height"], state["video_width"])
            logits = F.interpolate(torch.cat(masks), size=size, mode="bilinear", align_corners=False)
            return TrackedSlice(list(obj_ids), logits[:, 0].clamp_min(ABSENT_LOGIT), torch.cat(scores))

    def track_step(self, frame_idx: int, is_init_cond_frame: bool, current_vision_feats: list,
                   current_vision_pos_embeds: list, feat_sizes: list, point_inputs: dict | None,
                   mask_inputs: torch.Tensor | None, output_dict: dict, num_frames: int,
                   track_in_reverse: bool = False, run_mem_encoder: bool = True,
                   prev_sam_mask_logits: torch.Tensor | None = None) -> dict:
        """SAM-2's ``track_step``; a tracked slice goes through :attr:`sss_step_graphs` when set.

        A tracked slice is one without prompts of its own, that is not a key slice, and whose new
        memory is encoded; everything else (key slices, training) takes SAM-2's path.
        """
        graphs = self.sss_step_graphs
        if (graphs is None or self.training or is_init_cond_frame or point_inputs is not None
                or mask_inputs is not None or prev_sam_mask_logits is not None or not run_mem_encoder
                or self.num_maskmem == 0):
            return super().track_step(
                frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse, run_mem_encoder,
                prev_sam_mask_logits)
        gathered = gather_memory(self, frame_idx, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                                 output_dict, num_frames, track_in_reverse)
        sizes = tuple((int(h), int(w)) for h, w in feat_sizes)
        multimask = self._use_multimask(False, None)
        outputs = graphs.run(
            lambda *t: track_core(self, sizes, gathered.num_obj_ptr_tokens, multimask, *t),
            (sizes, gathered.num_obj_ptr_tokens, multimask),
            [*current_vision_feats, current_vision_pos_embeds[-1], gathered.memory, gathered.memory_pos])
        low_res, obj_ptr, score, maskmem, *maskmem_pos = outputs
        return {
            "point_inputs": None,
            "mask_inputs": None,
            "pred_masks": low_res,
            # only the memory encoder reads it, inside the step
            "pred_masks_high_res": None,
            "obj_ptr": obj_ptr,
            "object_score_logits": score,
            "maskmem_features": maskmem,
            "maskmem_pos_enc": maskmem_pos,
        }

    def sss_memory_reach(self) -> int:
        """How far behind the current slice SAM-2's memory attention reads tracked slices: the last
        ``num_maskmem - 1`` memories (every ``memory_temporal_stride_for_eval``-th slice, the
        nearest one always) and the object pointers of the last ``max_obj_ptrs_in_encoder - 1``
        slices; this bounds both."""
        return max(self.num_maskmem * self.memory_temporal_stride_for_eval, self.max_obj_ptrs_in_encoder)

    def _sss_forget_behind(self, outputs: dict, slice_index: int, reverse: bool) -> None:
        """Drop tracked outputs more than :meth:`sss_memory_reach` slices behind ``slice_index``."""
        reach = self.sss_memory_reach()
        behind = [s for s in outputs if (s - slice_index if reverse else slice_index - s) > reach]
        for s in behind:
            del outputs[s]


class TrackedSlice:
    """One tracked slice's results on their way to the host (:meth:`InMemoryVideoPredictor.sss_track_slice_async`).

    On a GPU the copy goes to page-locked memory without blocking, and an event marks its end;
    :meth:`result` waits for that event only.
    """

    def __init__(self, obj_ids: list[int], logits: torch.Tensor, scores: torch.Tensor) -> None:
        self.obj_ids = obj_ids
        if logits.is_cuda:
            self._logits = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
            self._scores = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            self._logits.copy_(logits, non_blocking=True)
            self._scores.copy_(scores, non_blocking=True)
            self._copied: torch.cuda.Event | None = torch.cuda.Event()
            self._copied.record()
        else:
            self._logits, self._scores, self._copied = logits, scores, None

    def result(self) -> dict[int, tuple[np.ndarray, float]]:
        """obj_id -> (``(H, W)`` float32 logits, object score logit); see :meth:`~InMemoryVideoPredictor.sss_track_slice`."""
        if self._copied is not None:
            self._copied.synchronize()
        # a copy: the page-locked buffer goes back to torch's pool, not to the caller
        logits = self._logits.numpy().copy()
        scores = self._scores.tolist()
        return {obj_id: (logits[i], scores[i]) for i, obj_id in enumerate(self.obj_ids)}
