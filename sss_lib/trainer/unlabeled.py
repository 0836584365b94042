"""Unlabeled cases for semi-supervised training: read, embedded once, with cached strong views.

The image encoder is frozen, so every embedding can be computed once:

* the weak view of a slice is the slice itself, embedded through the engine's store (the same
  embedding validation and Auto-segment use). **(ours)** No geometric augmentation is applied to
  unlabeled slices: it would need a fresh encoding every step.
* **(ours)** each slice gets ``K`` strong views (:class:`~sss_lib.semisup.StrongAugment` of the
  preprocessed slice, each drawn from its own seed, so a resumed run rebuilds exactly the same
  views), embedded once at the start. Every step picks two of the K. On a CPU with LiteMedSAM an
  embedding costs about a second, so encoding fresh strong views each step would cost more than
  the rest of the step together; K views per slice cost K embeddings per slice once, and with
  the per-step CutMix and view pairing they still give every slice ``K * (K - 1)`` ordered view
  pairs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backbones.base import Backbone
from ..datasets import Case
from ..embedding_cache import EmbeddingStore
from ..engine import SegmentationSession
from ..errors import Cancelled, InputError
from ..preprocess import Preprocessing
from ..volume import Volume, axis_from_name

log = logging.getLogger(__name__)


@dataclasses.dataclass
class UnlabeledCase:
    """One unlabeled case, ready for training.

    Attributes:
        case_id: the dataset's id.
        image: the volume.
        session: the engine session (preprocessed stack, cached weak embeddings).
        strong: per slice, its K strong-view embeddings (filled by :func:`embed_strong_views`).
    """

    case_id: str
    image: Volume
    session: SegmentationSession
    strong: list[list[Any]] = dataclasses.field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return int(self.session.stack_shape[0])

    @property
    def shape_hw(self) -> tuple[int, int]:
        return tuple(self.session.stack_shape[1:])  # type: ignore[return-value]

    @property
    def spacing_xy(self) -> tuple[float, float]:
        return self.image.in_plane_spacing(self.session.slice_axis)

    @property
    def slice_spacing(self) -> float:
        return float(self.image.spacing[self.session.slice_axis.axis])


def find_unlabeled(path: Path, exclude: Sequence[Path] = ()) -> list[Case]:
    """The unlabeled cases at ``path``: an nnU-Net dataset's ``imagesTs``, else every volume of a
    plain folder (labels, if any, are ignored). Cases whose image file is in ``exclude`` (the
    labeled cases' images) are left out.

    Raises:
        InputError: the path is missing or holds no volumes.
    """
    from ..datasets import open_dataset
    from ..datasets.nnunet import is_nnunet

    root = Path(path)
    if not root.exists():
        raise InputError(root, "not found", "Pass the folder of unlabeled volumes with --unlabeled.")
    if root.is_dir() and is_nnunet(root):
        cases = open_dataset(root, layout="nnunet", include_unlabeled=True).unlabeled
    else:
        cases = [dataclasses.replace(c, label_path=None) for c in open_dataset(root, layout="plain").cases]
    skip = {Path(p).resolve() for p in exclude}
    cases = [c for c in cases if Path(c.image_path).resolve() not in skip]
    if not cases:
        raise InputError(root, "holds no unlabeled volumes",
                         "Put the unlabeled images there (or into imagesTs/ of an nnU-Net dataset).")
    return cases


def load_unlabeled(case: Case, backbone: Backbone, preprocessing: Preprocessing, slice_axis: str,
                   store: EmbeddingStore) -> UnlabeledCase:
    """Read an unlabeled case and open its engine session (nothing is embedded yet)."""
    from ..volume_io import read_volume

    image = read_volume(case.image_path)
    axis = axis_from_name(slice_axis, image)
    session = SegmentationSession(image, backbone, slice_axis=axis, preprocessing=preprocessing, store=store)
    return UnlabeledCase(case.case_id, image, session)


def strong_view_seed(seed: int, case_id: str, slice_index: int, view: int) -> int:
    """The seed of one cached strong view: a function of the run seed, the case id, the slice and
    the view only (independent of run length, of resuming and of which other cases are used)."""
    words = [int(seed), *case_id.encode("utf-8"), 0x1D, int(slice_index), int(view), 0x57]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def strong_view_image(image: np.ndarray, augment: Any, seed: int) -> np.ndarray:
    """One strong view of a preprocessed ``(H, W)`` slice in [0, 1] (float32, same shape)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return augment(x, torch.Generator().manual_seed(seed))[0].numpy()


def embed_strong_views(cases: Sequence[UnlabeledCase], backbone: Backbone, views: int, augment: Any, seed: int,
                       progress: Callable[[int, int, str], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None,
                       cache: dict[Any, Any] | None = None) -> int:
    """Embed ``views`` strong views of every slice of every case (see the module docstring);
    returns how many embeddings were computed.

    ``cache``: a dict shared between runs on the same data (benchmarks, ablations); entries are
    keyed by the session's embedding key, slice, view, seed and augmentation settings.
    """
    total = sum(c.n_slices for c in cases) * views
    done = computed = 0
    for case in cases:
        case.strong = []
        for s in range(case.n_slices):
            row = []
            for k in range(views):
                if should_cancel is not None and should_cancel():
                    raise Cancelled("training stopped while embedding strong views")
                key = (case.session.key, s, k, int(seed), repr(augment))
                emb = cache.get(key) if cache is not None else None
                if emb is None:
                    img = strong_view_image(case.session.slices[s], augment, strong_view_seed(seed, case.case_id, s, k))
                    emb = backbone.embed_slice(img)
                    computed += 1
                    if cache is not None:
                        cache[key] = emb
                row.append(emb)
                done += 1
                if progress is not None:
                    progress(done, total, f"strong view {k + 1}/{views} of {case.case_id} slice {s + 1}")
            case.strong.append(row)
    return computed
