"""The image encoder's last blocks, trained with the task (SSS_METHOD.md section 4: "optionally
its last blocks train"), for LiteMedSAM (TinyViT) and SAM-2.1 (Hiera).

Training runs on cached features, which a frozen encoder makes possible; trained blocks cannot be
cached. So the encoder is cut in two at the input of its last ``N`` blocks:

* the **prefix** (patch embedding and every block before the cut) is frozen: its output is what
  the embedding cache keeps for training slices, computed once per slice (and per weak view);
* the **tail** (:class:`EncoderTail`: copies of the last ``N`` blocks, then the frozen neck, and
  for SAM-2 the mask decoder's ``conv_s0``/``conv_s1`` as ``forward_image`` applies them) runs in
  every training step, with gradients, on the cached prefix output.

The blocks train themselves (``lora_rank == 0``) or through low-rank adapters on each of their
linear layers (:class:`LoraLinear`; the blocks' weights stay the backbone's). The tail's state dict
is the task model's ``image_encoder`` component, described by
:class:`sss_lib.task_model.EncoderTuning`.

Inference (and validation during training) gets the tuned encoder through the backbone's
image-encoder runtime slot (``backbone.encoder``, which both backbones call when it is set):
:class:`TunedEncoder` runs prefix and tail in torch. Its embedding-cache suffix is a hash of the
tail's weights, so an embedding computed with other weights (or none) is never served to it.
The backbone's own modules are never changed; :func:`apply_task_encoder` puts the backbone's
previous runtime back when a model without tuned blocks is loaded onto it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backbones.base import Backbone
from ..task_model import EncoderTuning

#: Marks the runtime installed by this module (its ``previous`` is the backbone's own runtime).
_RUNTIME_NAME = "torch-tuned"


class LoraLinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with ``base`` frozen; ``B`` starts at 0, so the layer
    starts as ``base`` exactly. ``A`` is drawn from ``generator`` (Kaiming-uniform, as LoRA)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = float(alpha) / int(rank)
        bound = 1.0 / math.sqrt(base.in_features)
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(base.weight.device, base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(module: nn.Module, rank: int, alpha: float, seed: int) -> int:
    """Replace every ``nn.Linear`` inside ``module`` with a :class:`LoraLinear` (in a fixed order,
    so the same seed gives the same adapters); returns how many."""
    g = torch.Generator().manual_seed(int(seed))
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, LoraLinear(linear, rank, alpha, g))
    return len(targets)


class EncoderTail(nn.Module):
    """The last ``N`` blocks (trainable copies) and what follows them (frozen, shared).

    ``forward(*prefix_out)`` takes what :meth:`EncoderSplit.prefix` returns and gives the encoder's
    output (a tuple of feature maps, the backbone's embedding features). Only ``blocks`` is
    registered: the state dict holds the tuned blocks (and adapters), nothing of the shared parts.
    """

    def __init__(self, blocks: Sequence[nn.Module], finish: Callable[..., tuple[torch.Tensor, ...]],
                 tuning: EncoderTuning, seed: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(list(blocks)))
        self.tuning = tuning
        self._finish = finish  # (tail blocks, *prefix_out) -> features; not a registered module
        if tuning.lora_rank > 0:
            self.blocks.requires_grad_(False)
            add_lora(self.blocks, tuning.lora_rank, tuning.lora_alpha, seed)
        else:
            self.blocks.requires_grad_(True)

    def forward(self, *prefix_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._finish(self.blocks, *prefix_out)

    def weights_hash(self) -> str:
        """SHA-256 (16 hex digits) of the tail's current weights: the embedding-cache suffix."""
        h = hashlib.sha256(repr(self.tuning).encode())
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclasses.dataclass
class EncoderSplit:
    """A backbone's encoder cut before its last ``blocks`` blocks.

    Attributes:
        prefix: ``(1, 3, s, s)`` network input -> tuple of tensors (the tail's input), frozen.
        tail_blocks: the original modules of the tail (copied by :class:`EncoderTail`).
        finish: ``(tail blocks, *prefix output) -> features``: runs the tail blocks, then the
            frozen rest of the encoder.
    """

    prefix: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    tail_blocks: list[nn.Module]
    finish: Callable[..., tuple[torch.Tensor, ...]]


def split_encoder(backbone: Backbone, blocks: int) -> EncoderSplit:
    """Cut ``backbone``'s image encoder before its last ``blocks`` transformer blocks.

    Raises:
        ValueError: ``blocks`` out of range for this encoder. TypeError: an unknown backbone.
    """
    from ..backbones.litemedsam import LiteMedSamBackbone

    if isinstance(backbone, LiteMedSamBackbone):
        return _split_tinyvit(backbone.net.image_encoder, blocks)
    from ..backbones.sam2_backbone import Sam2Backbone

    if isinstance(backbone, Sam2Backbone):
        return _split_hiera(backbone.model, blocks)
    raise TypeError(f"backbone {backbone.name!r} has no trainable encoder blocks in SSS: only LiteMedSAM and "
                    "SAM-2.1 backbones are supported")


def _split_tinyvit(enc: nn.Module, blocks: int) -> EncoderSplit:
    """TinyViT (LiteMedSAM): blocks of stages 1-3 with their patch mergings between, then the neck."""
    seq: list[nn.Module] = []
    is_block: list[bool] = []
    for layer in list(enc.layers)[1:]:
        seq += list(layer.blocks)
        is_block += [True] * len(layer.blocks)
        if layer.downsample is not None:
            seq.append(layer.downsample)
            is_block.append(False)
    block_at = [i for i, b in enumerate(is_block) if b]
    if not 1 <= blocks <= len(block_at):
        raise ValueError(f"LiteMedSAM's encoder has {len(block_at)} transformer blocks; "
                         f"--encoder-blocks must lie in 1..{len(block_at)}, got {blocks}")
    cut = block_at[-blocks]
    head, tail = seq[:cut], seq[cut:]

    def prefix(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = enc.layers[0](enc.patch_embed(x))
        for m in head:
            x = m(x)
        return (x,)

    def finish(tail_blocks: nn.ModuleList, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for m in tail_blocks:
            x = m(x)
        b, n, c = x.shape
        side = int(round(math.sqrt(n)))
        return (enc.neck(x.view(b, side, side, c).permute(0, 3, 1, 2)),)

    return EncoderSplit(prefix, tail, finish)


def _split_hiera(model: nn.Module, blocks: int) -> EncoderSplit:
    """SAM-2.1 (Hiera trunk): the cut's input and the stage outputs before it, then the last
    blocks, the FPN neck and ``forward_image``'s projections of the two finest levels."""
    trunk = model.image_encoder.trunk
    n_blocks = len(trunk.blocks)
    if not 1 <= blocks <= n_blocks:
        raise ValueError(f"this SAM-2 encoder has {n_blocks} blocks; --encoder-blocks must lie in 1..{n_blocks}, "
                         f"got {blocks}")
    cut = n_blocks - blocks

    def stage_out(i: int) -> bool:
        return i == trunk.stage_ends[-1] or (i in trunk.stage_ends and trunk.return_interm_layers)

    def prefix(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = trunk.patch_embed(x)
        x = x + trunk._get_pos_embed(x.shape[1:3])
        outs = []
        for i in range(cut):
            x = trunk.blocks[i](x)
            if stage_out(i):
                outs.append(x.permute(0, 3, 1, 2))
        return (x, *outs)

    def finish(tail_blocks: nn.ModuleList, x: torch.Tensor, *outs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs_l = [o.float() for o in outs]
        x = x.float()
        for j, blk in enumerate(tail_blocks):
            x = blk(x)
            if stage_out(cut + j):
                outs_l.append(x.permute(0, 3, 1, 2))
        ie = model.image_encoder
        features, _ = ie.neck(outs_l)
        if ie.scalp > 0:
            features = features[: -ie.scalp]
        features = list(features)
        if model.use_high_res_features_in_sam:
            features[0] = model.sam_mask_decoder.conv_s0(features[0])
            features[1] = model.sam_mask_decoder.conv_s1(features[1])
        return tuple(features[-model.num_feature_levels:])

    return EncoderSplit(prefix, list(trunk.blocks)[cut:], finish)


def build_tail(backbone: Backbone, tuning: EncoderTuning, seed: int = 0) -> tuple[EncoderSplit, EncoderTail]:
    """The split of ``backbone``'s encoder and a fresh tail (the backbone's own block weights,
    adapters at their seeded start), on the backbone's device."""
    split = split_encoder(backbone, tuning.blocks)
    tail = EncoderTail(split.tail_blocks, split.finish, tuning, seed).to(_device(backbone))
    return split, tail


def _device(backbone: Backbone) -> torch.device:
    return torch.device(backbone.device)  # type: ignore[attr-defined]


class _Runtime:
    """Fills a backbone's image-encoder runtime slot (``backbone.encoder``): ``(1, 3, s, s)`` ->
    tuple of feature maps, with a cache-key suffix. Runs in torch on the backbone's device."""

    def __init__(self, backbone: Backbone, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                 suffix: Callable[[], str], previous: Any) -> None:
        self.name = _RUNTIME_NAME
        self._device = _device(backbone)
        self._fn = fn
        self._suffix = suffix
        #: the runtime the backbone had before (None: its torch encoder)
        self.previous = previous

    @property
    def cache_suffix(self) -> str:
        return self._suffix()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return tuple(t.detach().clone() for t in self._fn(x.to(self._device, torch.float32)))


def original_runtime(backbone: Backbone) -> Any:
    """The backbone's runtime under any tuned one installed by this module."""
    runtime = getattr(backbone, "encoder", None)
    while runtime is not None and getattr(runtime, "name", None) == _RUNTIME_NAME:
        runtime = runtime.previous
    return runtime


def install_tuned(backbone: Backbone, split: EncoderSplit, tail: EncoderTail) -> None:
    """Make ``backbone`` embed with the tuned encoder (prefix, then ``tail`` with its current
    weights; the cache suffix follows the weights)."""
    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        was = tail.training
        tail.eval()
        try:
            return tail(*split.prefix(x))
        finally:
            tail.train(was)

    backbone.encoder = _Runtime(backbone, run,  # type: ignore[attr-defined]
                                lambda: f"+tuned{tail.tuning.blocks}-{tail.weights_hash()}",
                                original_runtime(backbone))


def uninstall_tuned(backbone: Backbone) -> None:
    """Give ``backbone`` its own image-encoder runtime back (nothing if none was installed)."""
    if hasattr(backbone, "encoder"):
        backbone.encoder = original_runtime(backbone)  # type: ignore[attr-defined]


def apply_task_encoder(backbone: Backbone, tuning: EncoderTuning | None,
                       weights: dict[str, Any] | None) -> None:
    """Load a task model's ``image_encoder`` component into ``backbone`` for inference (or, for a
    model without one, remove one an earlier model installed).

    Raises:
        RuntimeError / KeyError / ValueError: the weights do not fit the backbone's encoder.
    """
    import numpy as np

    uninstall_tuned(backbone)
    if tuning is None:
        return
    split, tail = build_tail(backbone, tuning)
    state = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, copy=True))
             for k, v in (weights or {}).items()}
    tail.load_state_dict(state, strict=True)
    tail.eval().requires_grad_(False)
    install_tuned(backbone, split, tail)


# ------------------------------------------------------------------------------------------------
# Training: labeled slices through the tail
# ------------------------------------------------------------------------------------------------
class PrefixCache:
    """The prefix output of training slices, computed once each through the embedding store.

    ``embedding(source, s)`` gives slice ``s`` of ``source`` (an engine session or a weak view:
    anything with ``slices`` and ``key``) as the backbone's embedding object whose features are the
    tail's output, computed now with gradients. The prefix outputs live in a store of their own
    (no limit: a training set's slices are used over and over; LiteMedSAM: 5 MiB a slice).
    """

    def __init__(self, backbone: Backbone, split: EncoderSplit, tail: EncoderTail) -> None:
        self.backbone = backbone
        self.split = split
        self.tail = tail
        base = f"{backbone.name}@{backbone.image_size}#{backbone.weights_sha256[:16]}"
        self.key_part = f"{base}+prefix{tail.tuning.blocks}"
        self._prefix_runtime = _Runtime(backbone, split.prefix, lambda: "", None)
        from ..embedding_cache import EmbeddingStore

        self.store = EmbeddingStore(max_volumes=None)

    def prefix(self, source: Any, s: int) -> Any:
        """The cached prefix embedding of slice ``s`` (the backbone's embedding type, prefix output
        as its features)."""
        key = dataclasses.replace(source.key, backbone=self.key_part)
        return self.store.get_or_compute(key, s, lambda: self._embed_prefix(source.slices[s]))

    def _embed_prefix(self, image: Any) -> Any:
        bb = self.backbone
        before = getattr(bb, "encoder", None)
        bb.encoder = self._prefix_runtime  # type: ignore[attr-defined]
        try:
            return bb.embed_slice(image)
        finally:
            bb.encoder = before  # type: ignore[attr-defined]

    def embedding(self, source: Any, s: int) -> Any:
        emb = self.prefix(source, s)
        feats = emb.features if isinstance(emb.features, (tuple, list)) else (emb.features,)
        dev = _device(self.backbone)
        # Cached under inference_mode: a copy made outside it can enter autograd.
        out = self.tail(*(f.to(dev, torch.float32).clone() for f in feats))
        return dataclasses.replace(emb, features=out if isinstance(emb.features, (tuple, list)) else out[0])


class TunedSession:
    """A training case's session seen through the tuned encoder (``embedding(s)`` with gradients)."""

    def __init__(self, inner: Any, cache: PrefixCache) -> None:
        self.inner = inner
        self.cache = cache

    @property
    def slices(self) -> Any:
        return self.inner.slices

    @property
    def key(self) -> Any:
        return self.inner.key

    def embedding(self, slice_index: int) -> Any:
        return self.cache.embedding(self.inner, slice_index)


@dataclasses.dataclass
class TunedCase:
    """A :class:`~sss_lib.trainer.data.LabeledCase` (or weak view) whose session runs the tail."""

    inner: Any
    session: TunedSession

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def labels(self) -> Any:
        return self.inner.labels

    @property
    def spacing_xy(self) -> tuple[float, float]:
        return self.inner.spacing_xy

    @property
    def n_slices(self) -> int:
        return self.inner.n_slices


def tuning_from_config(config: Any) -> EncoderTuning | None:
    """The :class:`EncoderTuning` a :class:`~sss_lib.trainer.config.TrainConfig` asks for (None: off)."""
    if not config.encoder_blocks:
        return None
    rank = int(config.encoder_lora_rank)
    return EncoderTuning(int(config.encoder_blocks), rank, float(config.encoder_lora_alpha) if rank else 0.0)


@dataclasses.dataclass
class TrainingEncoder:
    """What a trainer holds while the encoder's last blocks train (see :func:`start_training`)."""

    tuning: EncoderTuning
    split: EncoderSplit
    tail: EncoderTail
    cache: PrefixCache

    def wrap(self, cases: Sequence[Any]) -> list[Any]:
        """Training cases whose ``session.embedding`` runs the tail (with gradients)."""
        return [TunedCase(c, TunedSession(c.session, self.cache)) for c in cases]

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.tail.parameters() if p.requires_grad]


def start_training(backbone: Backbone, config: Any) -> TrainingEncoder | None:
    """Set up the encoder's tail for training as ``config`` asks (None when it does not): the
    backbone embeds with the tail's current weights from now on (validation runs the tuned
    encoder); :func:`uninstall_tuned` undoes it. Blocks a task model loaded earlier put on the
    backbone are taken off first: training starts from the backbone's own encoder."""
    uninstall_tuned(backbone)
    tuning = tuning_from_config(config)
    if tuning is None:
        return None
    split, tail = build_tail(backbone, tuning, seed=int(config.seed))
    install_tuned(backbone, split, tail)
    return TrainingEncoder(tuning, split, tail, PrefixCache(backbone, split, tail))
