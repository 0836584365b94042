"""SAM-2's per-slice tracking step replayed from CUDA graphs.

A tracked slice costs SAM-2 about 700 kernel launches (memory attention, mask decoder, memory
encoder, and autocast's casts), each a few microseconds of Python and driver time, while the GPU
needs only a few milliseconds for the kernels themselves: a re-run on a GPU is bound by the host.
Captured once into a CUDA graph, the same step is one launch.

The step is split where the shapes stop depending on the slice:

* the memory SAM-2 selects for a slice (which key slices, which recent slices, which object
  pointers, with their temporal encodings) is gathered eagerly, by SAM-2's own code: a
  :class:`MemoryTap` stands in for the memory attention and records what it would be given;
* the rest (memory attention, mask decoder, memory encoder) is :func:`track_core`, a pure function
  of ``(current features, memory, memory positions)`` whose shapes depend only on how many memories
  and object pointers the slice attends to. :class:`StepGraphs` captures one graph per such shape
  the first time it is seen and replays it afterwards.

:func:`track_core` runs the same SAM-2 methods, in the same order, as ``SAM2Base.track_step`` does
for a tracked (non-key, unprompted) slice, so the eager path through it gives SAM-2's results
exactly; the tests check that on the CPU.

This module imports torch at import time; only :mod:`.sam2_predictor` imports it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

#: captured graphs kept per model (the oldest is dropped beyond); a run from one key slice meets 16
#: memory shapes, a span between two key slices as many again, and a short volume its own.
MAX_GRAPHS = 96


class MemoryTap(nn.Module):
    """Stands in for SAM-2's memory attention while SAM-2 gathers a slice's memory.

    It records the keyword arguments SAM-2 passes (``curr``, ``curr_pos``, ``memory``,
    ``memory_pos``, ``num_obj_ptr_tokens``) and returns the current features unchanged, so the
    caller's reshaping still works; the real attention then runs in :func:`track_core`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recorded: dict[str, Any] | None = None

    def forward(self, curr: Sequence[torch.Tensor], curr_pos: Sequence[torch.Tensor], memory: torch.Tensor,
                memory_pos: torch.Tensor, num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        self.recorded = {"memory": memory, "memory_pos": memory_pos, "num_obj_ptr_tokens": int(num_obj_ptr_tokens)}
        return curr[0]


@dataclasses.dataclass
class GatheredMemory:
    """What the memory attention reads for one slice.

    Attributes:
        memory: ``(M, B, mem_dim)`` spatial memories of the selected slices, then object-pointer tokens.
        memory_pos: ``(M, B, mem_dim)`` their spatial + temporal positional encodings.
        num_obj_ptr_tokens: how many of the last ``M`` rows are object-pointer tokens (no RoPE).
    """

    memory: torch.Tensor
    memory_pos: torch.Tensor
    num_obj_ptr_tokens: int


def gather_memory(model: Any, frame_idx: int, current_vision_feats: Sequence[torch.Tensor],
                  current_vision_pos_embeds: Sequence[torch.Tensor], feat_sizes: Sequence[tuple[int, int]],
                  output_dict: dict, num_frames: int, track_in_reverse: bool) -> GatheredMemory:
    """The memory SAM-2 selects for tracked slice ``frame_idx``, by SAM-2's own selection code."""
    tap = MemoryTap()
    modules = model._modules
    real = modules["memory_attention"]
    # Swapped in the module table (not re-registered): parameter names and checkpoints are untouched.
    modules["memory_attention"] = tap
    try:
        model._prepare_memory_conditioned_features(
            frame_idx=frame_idx, is_init_cond_frame=False, current_vision_feats=current_vision_feats[-1:],
            current_vision_pos_embeds=current_vision_pos_embeds[-1:], feat_sizes=feat_sizes[-1:],
            output_dict=output_dict, num_frames=num_frames, track_in_reverse=track_in_reverse)
    finally:
        modules["memory_attention"] = real
    if tap.recorded is None:
        raise RuntimeError("SAM-2 gathered no memory for a tracked slice (a model without memory?)")
    return GatheredMemory(**tap.recorded)


def track_core(model: Any, feat_sizes: tuple[tuple[int, int], ...], num_obj_ptr_tokens: int, multimask: bool,
               *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The shape-stable part of SAM-2's step for a tracked slice.

    Args:
        feat_sizes: ``(h_l, w_l)`` of each feature level, coarsest last.
        num_obj_ptr_tokens / multimask: as SAM-2 decides them for this slice.
        tensors: the ``L`` current features ``(h_l*w_l, B, C_l)``, the coarsest level's positional
            encoding ``(h*w, B, C)``, then ``memory`` and ``memory_pos`` (see :class:`GatheredMemory`).

    Returns:
        ``(low_res_masks (B, 1, h0, w0), obj_ptr (B, C), object_score_logits (B, 1),
        maskmem_features (B, mem_dim, h, w), *maskmem_pos_enc)``, as ``SAM2Base.track_step``
        computes them.
    """
    levels = len(feat_sizes)
    feats, pos, memory, memory_pos = tensors[:levels], tensors[levels], tensors[levels + 1], tensors[levels + 2]
    batch, channels = feats[-1].size(1), model.hidden_dim
    height, width = feat_sizes[-1]
    high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], feat_sizes[:-1])]
    attended = model.memory_attention(curr=list(feats[-1:]), curr_pos=[pos], memory=memory, memory_pos=memory_pos,
                                      num_obj_ptr_tokens=num_obj_ptr_tokens)
    pix_feat = attended.permute(1, 2, 0).view(batch, channels, height, width)
    _, _, _, low_res, high_res_masks, obj_ptr, score = model._forward_sam_heads(
        backbone_features=pix_feat, point_inputs=None, mask_inputs=None,
        high_res_features=high_res or None, multimask_output=multimask)
    maskmem, maskmem_pos = model._encode_new_memory(
        current_vision_feats=list(feats), feat_sizes=list(feat_sizes), pred_masks_high_res=high_res_masks,
        object_score_logits=score, is_mask_from_pts=False)
    return (low_res, obj_ptr, score, maskmem, *maskmem_pos)


@dataclasses.dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class StepGraphs:
    """Runs :func:`track_core` eagerly, or from one CUDA graph per input shape.

    ``capture=False`` always runs eagerly (the CPU, tests). With ``capture=True`` (CUDA only) the
    first call of a shape runs eagerly and captures a graph; later calls copy their inputs into the
    graph's buffers, replay it and return clones of its outputs (the graph overwrites its own on
    the next replay). A capture that fails turns graphs off for this model, with a warning: the
    step then runs eagerly, as SAM-2 does.

    A graph reads the model's weights from the tensors it was captured with. :meth:`bind` is given
    the weights in use before each run and drops every graph when any was replaced (modules
    swapped in, a checkpoint loaded into new tensors); in-place updates need nothing.
    """

    def __init__(self, *, capture: bool, max_graphs: int = MAX_GRAPHS) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        if capture and not torch.cuda.is_available():
            raise ValueError("CUDA graphs need CUDA; use capture=False elsewhere")
        self.capture = bool(capture)
        self.max_graphs = int(max_graphs)
        self.disabled_reason: str | None = None
        self.replays = 0
        self.captures = 0
        self.eager_runs = 0
        self._graphs: dict[Hashable, _Captured] = {}
        # (argument position, shape, strides, dtype, device) -> the input buffer every graph with
        # such an argument reads: replays are sequential and each copies its inputs in first, so the
        # graphs share them (the current slice's features are alike for all, ~8 MB each at 1024 px).
        self._buffers: dict[Hashable, torch.Tensor] = {}
        self._weights: tuple[torch.Tensor, ...] = ()
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def bind(self, weights: Sequence[torch.Tensor]) -> bool:
        """Drop every graph if ``weights`` are not the very tensors the graphs were captured with.

        Returns True when the weights changed (the first bind included).
        """
        weights = tuple(weights)
        if len(weights) == len(self._weights) and all(a is b for a, b in zip(weights, self._weights)):
            return False
        if self._graphs:
            log.debug("model weights replaced: dropping %d CUDA graphs", len(self._graphs))
        self.clear()
        self._weights = weights
        return True

    def clear(self) -> None:
        """Drop every captured graph (and the memory it holds)."""
        self._graphs.clear()
        self._buffers.clear()
        self._pool = None

    def input_buffer(self, position: int, value: torch.Tensor) -> torch.Tensor:
        """The static buffer of argument ``position`` for tensors like ``value`` (shared by graphs)."""
        key = (position, tuple(value.shape), value.stride(), value.dtype, value.device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty_like(value)
        return buffer

    def run(self, step: Callable[..., tuple[torch.Tensor, ...]], static_key: Hashable,
            inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``step(*inputs)``, from a graph when one fits ``static_key`` and the inputs' shapes.

        ``static_key``: everything besides the inputs' shapes that the step's kernels depend on.
        """
        inputs = tuple(inputs)
        if not self.capture or self.disabled_reason is not None:
            self.eager_runs += 1
            return step(*inputs)
        key = (static_key, tuple((tuple(x.shape), x.stride(), x.dtype, x.device) for x in inputs))
        captured = self._graphs.get(key)
        if captured is not None:
            for buffer, value in zip(captured.inputs, inputs):
                buffer.copy_(value)
            captured.graph.replay()
            self.replays += 1
            return tuple(out.clone() for out in captured.outputs)
        outputs = step(*inputs)
        self.eager_runs += 1
        while len(self._graphs) >= self.max_graphs:  # the oldest goes (volumes of many lengths)
            del self._graphs[next(iter(self._graphs))]
        self._capture(step, key, inputs)
        return outputs

    def _capture(self, step: Callable[..., tuple[torch.Tensor, ...]], key: Hashable,
                 inputs: tuple[torch.Tensor, ...]) -> None:
        buffers = tuple(self.input_buffer(i, x).copy_(x) for i, x in enumerate(inputs))
        autocast_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        try:
            # Lazy initialisation (cuBLAS workspaces, kernel choice) must not happen during capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), _autocast(autocast_dtype):
                step(*buffers)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the service's other threads may use CUDA while this one captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                # Casts inside the graph: autocast's cache would hand the graph tensors that are
                # freed when the cache is cleared.
                with _autocast(autocast_dtype):
                    outputs = step(*buffers)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            self.disabled_reason = f"{type(exc).__name__}: {exc}"
            self.clear()
            log.warning("CUDA graph capture failed (%s); SAM-2 tracks eagerly from now on", self.disabled_reason)
            return
        self._graphs[key] = _Captured(graph, buffers, tuple(outputs))
        self.captures += 1


def _autocast(dtype: "torch.dtype | None") -> Any:
    """CUDA autocast to ``dtype`` without the cast cache, or no autocast for None."""
    if dtype is None:
        return torch.autocast("cuda", enabled=False)
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)
