"""SAM-2.1 (hiera tiny / small / base+ / large) as a :class:`~.base.Backbone`, fed from memory.

Slices are embedded one at a time by :meth:`Sam2Backbone.embed_slice` (the engine caches the
result); propagation runs SAM-2's video memory over the slice stack with each class as one SAM-2
object (object id = class label), reading features only from the cache.

Propagation follows :mod:`.spans` (each class on its own; SAM-2's objects never interact anyway):
    * a key slice is SAM-2's output for its own prompts alone (an initial conditioning frame, no
      memory): XYXY box, positive XY points label 1, negative XY points label 0;
    * a span between markers gets a fresh inference state holding only its bounding key slices as
      conditioning frames; the run from the key below tracks upwards, the run from the key above
      tracks downwards, both in that state, and :func:`.spans.resolve_span` picks each slice's
      result (nearest key slice whose run reached it). A key slice's memory therefore reaches no
      further than its neighbouring markers, so an edit changes nothing beyond them;
    * a run has *ended* once its mask has been empty (every logit <= 0, or SAM-2's object score < 0)
      on ``stop_after_empty`` consecutive slices (those slices are still yielded).

This module imports no torch at import time; :mod:`.sam2_predictor` (torch + sam2) is imported when
a model is built.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterator, Mapping, Sequence

import numpy as np

from ..errors import PromptError, WeightsError
from ..prompts import SlicePrompt
from .base import Backbone, EmbeddingLookup, PropagationStep, span_steps
from .spans import Gate, Span

if TYPE_CHECKING:
    import torch

    from .encoder_runtime import EncoderRuntime
    from .sam2_predictor import InMemoryVideoPredictor

log = logging.getLogger(__name__)

#: registry name -> hydra config inside the installed ``sam2`` package.
SAM2_CONFIGS: dict[str, str] = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
DEFAULT_IMAGE_SIZE = 1024
# The Hiera trunk halves the map 5 times (stride 32) and the FPN adds the stride-32 map, upsampled
# x2, to the stride-16 map: both must have integer sizes.
_SIZE_MULTIPLE = 32
_MIN_IMAGE_SIZE = 64
_RANDOM_INIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Sam2Embedding:
    """One slice's SAM-2 image features (what :meth:`Sam2Backbone.propagate` needs).

    Attributes:
        features: the FPN levels, high to low resolution, each ``(1, C_l, h_l, w_l)`` on the model's
            device, detached: ``(1, 32, s/4, s/4)``, ``(1, 64, s/8, s/8)`` and ``(1, 256, s/16, s/16)``
            for ``s = image_size`` (the first two already projected by the mask decoder's
            ``conv_s0`` / ``conv_s1``). bf16 where computed under CUDA autocast, float16 where the
            backbone stores half-precision embeddings (``half_embeddings``), else float32.
            Positional encodings are not stored: they are the same for every slice.
        image_size: the network input side ``s`` they were computed at.
    """

    features: tuple["torch.Tensor", ...]
    image_size: int

    @property
    def nbytes(self) -> int:
        """Memory held by the features, in bytes."""
        return sum(f.numel() * f.element_size() for f in self.features)


class Sam2Backbone(Backbone):
    """SAM-2.1 with its video memory; see the module docstring for how propagation runs.

    Build one with :func:`build_sam2_backbone`.

    Attributes:
        model: the :class:`~.sam2_predictor.InMemoryVideoPredictor` (eval mode).
        stop_after_empty: consecutive empty slices after which a run has ended; None: never stop
            (a run goes to the edge of its span).
    """

    eager_embedding = True
    #: the image encoder's CPU runtime (:mod:`.encoder_runtime`); None runs it in torch.
    encoder: "EncoderRuntime | None" = None
    #: float32 features are stored as float16 (half the memory; propagation computes in float32
    #: again). An embedding with values beyond float16's range stays float32.
    half_embeddings: bool = False

    def __init__(
        self,
        name: str,
        model: "InMemoryVideoPredictor",
        weights_sha256: str,
        *,
        stop_after_empty: int | None = 2,
    ) -> None:
        if stop_after_empty is not None and stop_after_empty < 1:
            raise ValueError(f"stop_after_empty must be >= 1 or None, got {stop_after_empty}")
        self.name = name
        self.model = model
        self.image_size = int(model.image_size)
        self.weights_sha256 = weights_sha256
        self.stop_after_empty = stop_after_empty

    @property
    def encoder_runtime(self) -> str:
        """Where the image encoder runs: ``"torch"``, ``"openvino"``, ``"onnxruntime"`` ..."""
        return self.encoder.name if self.encoder is not None else "torch"

    def cache_key(self) -> str:
        """The base key, plus the runtime's suffix when its features differ from torch's."""
        return super().cache_key() + (self.encoder.cache_suffix if self.encoder is not None else "")

    @property
    def device(self) -> "torch.device":
        return self.model.device

    def embed_slice(self, image: np.ndarray) -> Sam2Embedding:
        """Embed one preprocessed slice ``(H, W)`` float32 in ``[0, 1]`` (see :class:`Sam2Embedding`)."""
        image = np.asarray(image)
        if image.ndim != 2 or min(image.shape) < 1:
            raise ValueError(f"embed_slice expects one (H, W) slice, got shape {image.shape}")
        if not np.isfinite(image).all():
            raise ValueError("embed_slice got NaN or infinite pixels; preprocess the slice first")
        if self.encoder is None:
            emb = self.model.sss_embed(image)
        else:
            import torch

            with torch.inference_mode():
                x = self.model.sss_preprocess(image)
            emb = Sam2Embedding(self.encoder(x), self.image_size)
        return _to_half(emb) if self.half_embeddings else emb

    def coarse_features(self, embedding: Sam2Embedding) -> list["torch.Tensor"]:
        """The coarse head's input: the three FPN levels of :class:`Sam2Embedding`, finest first."""
        return list(embedding.features)

    def to_slice_grid(self, maps: "torch.Tensor", embedding: Sam2Embedding,
                      shape_hw: tuple[int, int]) -> "torch.Tensor":
        """Maps ``(N, C, h, w)`` over the square network input -> ``(N, C, H, W)`` on the slice grid.

        The slice was resized (not padded) to the input, so this is a bilinear resize to
        ``shape_hw``, as propagation treats mask logits. Differentiable.
        """
        import torch.nn.functional as F

        return F.interpolate(maps, size=tuple(shape_hw), mode="bilinear", align_corners=False)

    def check_prompts(self, label: int, key_slices: Mapping[int, Sequence[SlicePrompt]],
                      shape_shw: tuple[int, int, int]) -> None:
        """Prompts inside the stack, at most one box per key slice.

        Raises:
            PromptError: a prompt lies outside the stack, or two boxes on one slice.
        """
        for k, ps in key_slices.items():
            _merge_prompts(label, list(ps), shape_shw)

    def segment_key(self, slices: np.ndarray, embedding: EmbeddingLookup, label: int, index: int,
                    prompts: Sequence[SlicePrompt]) -> np.ndarray:
        """SAM-2's mask for key slice ``index`` from its own (merged) prompts: ``(H, W)`` float32."""
        num_slices, height, width = (int(n) for n in slices.shape)
        box, pos, neg = _merge_prompts(label, list(prompts), (num_slices, height, width))[index]
        state = self.model.sss_new_state(num_slices, height, width, embedding)
        try:
            self.model.sss_add_prompt(state, index, label, box, pos, neg)
            self.model.sss_finish_prompts(state)
            return self.model.sss_track_slice(state, index, [label], False)[label][0]
        finally:
            state.clear()

    def propagate_span(self, slices: np.ndarray, embedding: EmbeddingLookup, label: int,
                       span: Span) -> Iterator[PropagationStep]:
        """Track ``label`` through ``span`` with only its bounding key slices in SAM-2's memory.

        Args:
            slices: the ``(S, H, W)`` stack; only its shape is read (features come from ``embedding``).
            embedding: slice index -> :class:`Sam2Embedding`, the engine's cache.
        """
        from ..device import autocast_cache_held

        num_slices, height, width = (int(n) for n in slices.shape)
        # Each run goes one way slice by slice: what lies behind its memory's reach is dropped.
        state = self.model.sss_new_state(num_slices, height, width, embedding, forget_behind=True)
        # The span's weights are cast to bf16 once, not once per slice (under autocast).
        with autocast_cache_held():
            try:
                for key in (span.below, span.above):
                    if key is not None:
                        box, pos, neg = _merge_prompts(label, list(key.prompts), (num_slices, height, width))[key.index]
                        self.model.sss_add_prompt(state, key.index, label, box, pos, neg)
                self.model.sss_finish_prompts(state)
                yield from span_steps(label, span, lambda key, direction, stop, gate: self._run(
                    state, label, key.index + direction, stop, direction, gate))
            finally:
                # Drop the memory bank now, not when the generator object is collected.
                state.clear()

    def _run(self, state: dict, label: int, start: int, stop: int, direction: int,
             gate: Gate) -> Iterator[tuple[int, np.ndarray | None]]:
        """Track ``label`` from ``start`` towards ``stop`` (exclusive) until it has ended, asking
        ``gate`` before each slice.

        Each slice is handed to SAM-2 before the previous slice's result is read, so on a GPU the
        host's work on one slice (reading it, SAM-2's bookkeeping, queueing the next) overlaps the
        GPU's work on the next. Where the run ends, the one slice queued past it is dropped unread; a
        gate that holds the run gets the slice already computed first.
        """
        pending: tuple[int, Any] | None = None
        empty_run = 0
        for s in range(start, stop, direction):
            if pending is not None and not gate.allow(s):
                ended, empty_run = yield from self._settle(label, *pending, empty_run)
                pending = None
                if ended:
                    return
            yield from gate.wait(s)
            tracked = self.model.sss_track_slice_async(state, s, [label], direction < 0)
            if pending is not None:
                ended, empty_run = yield from self._settle(label, *pending, empty_run)
                if ended:
                    return
            pending = (s, tracked)
        if pending is not None:
            yield from self._settle(label, *pending, empty_run)

    def _settle(self, label: int, s: int, tracked: Any,
                empty_run: int) -> Generator[tuple[int, np.ndarray], None, tuple[bool, int]]:
        """Yield slice ``s``'s result; returns (whether the object has ended there, the empty run)."""
        logits, score = tracked.result()[label]
        yield s, logits
        if self.stop_after_empty is None:
            return False, 0
        empty_run = empty_run + 1 if (score < 0 or not (logits > 0).any()) else 0
        if empty_run >= self.stop_after_empty:
            log.debug("object %d ended at slice %d", label, s)
            return True, empty_run
        return False, empty_run


def _to_half(emb: Sam2Embedding) -> Sam2Embedding:
    """float32 features as float16 (others unchanged); all stay float32 if any value is beyond
    float16's range."""
    import torch

    limit = torch.finfo(torch.float16).max
    for f in emb.features:
        if f.dtype == torch.float32 and f.numel():
            low, high = torch.aminmax(f)  # (not f.abs().max(): no full-size temporary per slice)
            if high > limit or -low > limit:
                return emb
    half = tuple(f.to(torch.float16) if f.dtype == torch.float32 else f for f in emb.features)
    return dataclasses.replace(emb, features=half)


def image_encoder_module(model: "InMemoryVideoPredictor") -> "torch.nn.Module":
    """``model.forward_image`` as a module: ``(1, 3, s, s)`` -> the FPN levels of :class:`Sam2Embedding`
    (float32, finest first); what :mod:`.encoder_runtime` exports."""
    import torch

    class _ImageEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model.forward_image(x)
            return tuple(out["backbone_fpn"][-self.model.num_feature_levels:])

    return _ImageEncoder().eval()


def _merge_prompts(
    label: int, prompts: list[SlicePrompt], shape_shw: tuple[int, int, int]
) -> dict[int, tuple[tuple[float, float, float, float] | None, list, list]]:
    """key slice -> (XYXY box or None, positive XY points, negative XY points) for one object."""
    out: dict[int, tuple[Any, list, list]] = {}
    for p in prompts:
        p.check_inside(shape_shw)
        box, pos, neg = out.get(p.key_slice, (None, [], []))
        if p.box is not None and box is not None:
            raise PromptError(
                f"class {label} has two boxes on slice {p.key_slice}; SAM-2 takes one box per slice, "
                "keep one (add the other's extent as points if needed)"
            )
        out[p.key_slice] = (p.box if p.box is not None else box,
                            pos + list(p.positive_points), neg + list(p.negative_points))
    return out


# -- building -------------------------------------------------------------------------------------
def build_sam2_backbone(
    name: str,
    *,
    image_size: int | None = None,
    checkpoint: Path | None = None,
    device: "str | torch.device" = "cpu",
    random_init: bool = False,
    stop_after_empty: int | None = 2,
    encoder_runtime: str = "torch",
    half_embeddings: bool = False,
    cuda_graphs: bool | None = None,
) -> Sam2Backbone:
    """Build a SAM-2.1 backbone from sam2's own config.

    Args:
        name: one of :data:`SAM2_CONFIGS` (``"sam2.1_hiera_tiny"`` ... ``"sam2.1_hiera_large"``).
        image_size: network input side; 1024 by default, 512 for 512-trained fine-tunes; any
            multiple of 32 from 64 up (small sizes are for tests). Size-dependent settings (the
            memory attention's RoPE grid, ``image_size / 16``) follow it.
        checkpoint: a SAM-2.1 checkpoint file (strictly matched to the model).
        device: "cpu", "cuda", "cuda:N", "mps" or "auto" (or a ``torch.device``).
        random_init: build untrained weights (seeded, reproducible) instead of loading a checkpoint;
            ``weights_sha256`` is then ``"random-init"``.
        stop_after_empty: see :class:`Sam2Backbone`.
        encoder_runtime: where the image encoder runs on a CPU (see
            :func:`~.encoder_runtime.build_encoder_runtime`): "torch" (default here), "auto",
            "openvino", "onnxruntime" or "openvino-bf16". The export is cached in the SSS cache.
        half_embeddings: store embeddings as float16 (see :class:`Sam2Backbone`).
        cuda_graphs: replay each tracked slice's step from a CUDA graph (:mod:`.sam2_graphs`);
            None: on CUDA devices unless ``SSS_CUDA_GRAPHS=0``. Only CUDA devices can.

    Raises:
        ValueError: unknown name or unusable image size. WeightsError: no checkpoint and not
        ``random_init``, or the checkpoint is unreadable or does not fit (strict key and shape
        match, see :func:`sss_lib.weights.load_weights_into`). DeviceError: the device is absent.
    """
    if name not in SAM2_CONFIGS:
        raise ValueError(f"unknown SAM-2.1 model {name!r}; choose one of {', '.join(SAM2_CONFIGS)}")
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < _MIN_IMAGE_SIZE or size % _SIZE_MULTIPLE:
        raise ValueError(
            f"SAM-2 image size must be a multiple of {_SIZE_MULTIPLE} and at least {_MIN_IMAGE_SIZE}, "
            f"got {size}; use 1024 (or 512 for 512-trained fine-tunes)"
        )
    if checkpoint is None and not random_init:
        raise WeightsError(
            f"no checkpoint given for {name}; pass the .pt file (sss_lib.weights finds and downloads "
            "it) or random_init=True for an untrained test model"
        )
    from ..device import cuda_graphs_wanted, resolve_device

    torch_device = resolve_device(device)
    if cuda_graphs is None:
        cuda_graphs = cuda_graphs_wanted(torch_device)
    elif cuda_graphs and torch_device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {torch_device}; leave it None")

    import torch

    if random_init:
        # Seed without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            model = _instantiate(SAM2_CONFIGS[name], size)
        sha = "random-init"
    else:
        model = _instantiate(SAM2_CONFIGS[name], size)
        sha = _load_checkpoint(model, Path(checkpoint))  # type: ignore[arg-type]
    model = model.to(torch_device).eval()
    if cuda_graphs:
        from .sam2_graphs import StepGraphs

        model.sss_step_graphs = StepGraphs(capture=True)
    log.info("built %s at %d px on %s (weights %s)", name, size, torch_device, sha[:16])
    from .encoder_runtime import build_encoder_runtime

    backbone = Sam2Backbone(name, model, sha, stop_after_empty=stop_after_empty)
    backbone.encoder = build_encoder_runtime(image_encoder_module(model), model_name=name, weights_sha256=sha,
                                             image_size=size, requested=encoder_runtime,
                                             device_type=torch_device.type)
    backbone.half_embeddings = half_embeddings
    return backbone


def sam2_overrides(image_size: int) -> list[str]:
    """Hydra overrides: our predictor class, sam2's video post-processing, and the input size."""
    feat = image_size // 16
    try:
        import sam2._C  # noqa: F401  (the CUDA hole-filling kernel; optional)

        fill_hole_area = 8
    except ImportError:
        # Without the kernel sam2 skips hole filling anyway, warning on every slice.
        fill_hole_area = 0
    return [
        "++model._target_=sss_lib.backbones.sam2_predictor.InMemoryVideoPredictor",
        # The same post-processing build_sam2_video_predictor applies.
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        f"++model.fill_hole_area={fill_hole_area}",
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
        f"++model.image_encoder.neck.position_encoding.image_size={image_size}",
        f"++model.memory_encoder.position_encoding.image_size={image_size}",
    ]


def _instantiate(config: str, image_size: int) -> "InMemoryVideoPredictor":
    import sam2  # noqa: F401  (registers sam2's config module with hydra)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .sam2_predictor import InMemoryVideoPredictor

    cfg = compose(config_name=config, overrides=sam2_overrides(image_size))
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    assert isinstance(model, InMemoryVideoPredictor)
    return model


def _load_checkpoint(model: Any, path: Path) -> str:
    """Strictly load checkpoint ``path`` into ``model``; returns the file's SHA-256."""
    from .. import weights
    from ..download import file_sha256

    weights.load_weights_into(model, weights.load_state_dict(path), str(path))
    return file_sha256(path)
