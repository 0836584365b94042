"""Weak augmentation of labeled slices (SSS_METHOD.md section 4) on cached embeddings.

Training runs on cached image embeddings, so an augmented labeled slice needs its own embedding.
The cheapest correct way: each training case gets ``views`` **weak views**, each one random
zoom/crop, flip and small rotation (:class:`sss_lib.semisup.WeakAugment`) drawn once (seeded by
the run's seed, the view number and the case id) and applied to the case's whole preprocessed
stack and its label stack together (bilinear for the image, nearest for the labels; pixels from
outside the slice are :data:`~sss_lib.trainer.data.IGNORE` in the labels and 0 in the image).
A view is embedded once and then sampled like any other labeled case, so every step draws its
slices from the originals and the views alike; prompts come from the view's own labels (a box
around the rotated structure) and carried prompts step between slices of one view, which share
the geometry.

Cost: ``views`` extra embeddings per labeled training slice, once per run, kept in memory by the
training set's own store (LiteMedSAM: 4 MiB each; with the encoder's last blocks training, the
prefix output instead: :mod:`.encoder_tuning`). Validation and the task model never see a view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..backbones.base import Backbone
from ..embedding_cache import EmbeddingKey, EmbeddingStore
from ..errors import Cancelled
from ..semisup.weak import WeakAugment, WeakParams
from .data import IGNORE

#: Mixed into each view's seed so that its draws differ from every other seeded stream of the run.
_SEED_TAG = 0x3EA4


@dataclasses.dataclass
class WeakViewSession:
    """The engine-session part a trainer reads: ``slices``, ``key``, ``store``, ``embedding(s)``."""

    slices: np.ndarray
    key: EmbeddingKey
    store: EmbeddingStore
    backbone: Backbone

    def embedding(self, slice_index: int) -> Any:
        return self.store.get_or_compute(self.key, slice_index,
                                         lambda: self.backbone.embed_slice(self.slices[slice_index]))


@dataclasses.dataclass
class WeakView:
    """One weak view of a training case, used by the trainers like a
    :class:`~sss_lib.trainer.data.LabeledCase`.

    Attributes:
        case_id: ``"<case>~weak<n>"``.
        labels: ``(S, H, W)`` int16 labels of the view (:data:`IGNORE` outside the slice).
        session: the view's slices and their embeddings.
        spacing_xy: the view's pixel spacing in mm (the case's, divided by the zoom).
        params: the drawn transform (the same for every slice of the view).
    """

    case_id: str
    labels: np.ndarray
    session: WeakViewSession
    spacing_xy: tuple[float, float]
    params: WeakParams

    @property
    def n_slices(self) -> int:
        return int(self.labels.shape[0])


def view_generator(seed: int, case_id: str, view: int) -> torch.Generator:
    """The generator of view ``view`` of ``case_id`` in a run seeded ``seed``."""
    state = np.random.SeedSequence([int(seed), _SEED_TAG, int(view), zlib.crc32(case_id.encode())])
    return torch.Generator().manual_seed(int(state.generate_state(1)[0]))


def make_weak_views(cases: Sequence[Any], backbone: Backbone, views: int, seed: int,
                    augment: WeakAugment | None = None, store: EmbeddingStore | None = None) -> list[WeakView]:
    """``views`` weak views of each of ``cases`` (LabeledCases), not embedded yet.

    Args:
        cases: training cases (``case_id``, ``labels``, ``spacing_xy``, ``session.slices``/``key``).
        backbone: embeds the views.
        views: views per case (0: none).
        seed: the run's seed.
        augment: the transform (default :class:`WeakAugment` with ``ignore_index`` = :data:`IGNORE`).
        store: where the views' embeddings live (default: a store of their own, no limit).
    """
    augment = augment or WeakAugment(ignore_index=IGNORE)
    if augment.ignore_index != IGNORE:
        raise ValueError(f"weak views need WeakAugment(ignore_index={IGNORE}), the trainers' ignore value")
    store = store if store is not None else EmbeddingStore(max_volumes=None)
    out: list[WeakView] = []
    for case in cases:
        stack = np.asarray(case.session.slices, dtype=np.float32)
        n = stack.shape[0]
        for v in range(views):
            drawn = augment.draw(1, view_generator(seed, case.case_id, v))
            params = WeakParams(**{f.name: getattr(drawn, f.name).expand(n) for f in dataclasses.fields(WeakParams)})
            images, labels = augment.apply(torch.from_numpy(stack), torch.from_numpy(case.labels.astype(np.int64)),
                                           params)
            assert labels is not None
            images_np = np.ascontiguousarray(images.clamp(0.0, 1.0).numpy(), dtype=np.float32)
            # The view's identity is its content: a shared store can never confuse two views.
            digest = hashlib.sha256(images_np.tobytes()).hexdigest()[:16]
            key = dataclasses.replace(case.session.key, volume_hash=f"{case.session.key.volume_hash}+weak-{digest}",
                                      backbone=backbone.cache_key())
            zoom = float(drawn.scale[0])
            sx, sy = case.spacing_xy
            out.append(WeakView(f"{case.case_id}~weak{v}", labels.numpy().astype(np.int16),
                                WeakViewSession(images_np, key, store, backbone), (sx / zoom, sy / zoom), drawn))
    return out


def training_set(train: Sequence[Any], config: Any, backbone: Backbone, encoder: Any = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> list[Any]:
    """The cases a trainer samples labeled slices from: ``train``, plus ``config.weak_views`` weak
    views of each, all through the tuned encoder's tail when ``encoder`` (a
    :class:`~.encoder_tuning.TrainingEncoder`) is given. What needs embedding is embedded now
    (weak views; with ``encoder``, the prefix of every slice), reporting to ``progress``.

    Raises:
        Cancelled: ``should_cancel()`` became true while embedding.
    """
    views = make_weak_views(train, backbone, int(config.weak_views), int(config.seed)) if config.weak_views else []
    cases: list[Any] = [*train, *views]
    todo: list[tuple[Any, int]] = []
    if encoder is not None:
        todo = [(c.session, s) for c in cases for s in range(c.n_slices)]
        cases = encoder.wrap(cases)
    else:
        todo = [(v.session, s) for v in views for s in range(v.n_slices)]
    for done, (session, s) in enumerate(todo, start=1):
        if should_cancel is not None and should_cancel():
            raise Cancelled("training cancelled; nothing was written")
        if encoder is not None:
            encoder.cache.prefix(session, s)
        else:
            session.embedding(s)
        if progress is not None:
            progress(done, len(todo), f"embedded training view slice {done}/{len(todo)}")
    return cases


def switch_notes(config: Any) -> str:
    """The task model's note on the labeled-slice switches of ``config`` (weak views, encoder blocks)."""
    enc = "frozen image encoder"
    if config.encoder_blocks:
        how = f"LoRA rank {config.encoder_lora_rank}" if config.encoder_lora_rank else "their weights"
        enc = f"image encoder's last {config.encoder_blocks} block(s) trained ({how})"
    return f"weak views per labeled case: {config.weak_views}; {enc}"
