"""Labeled cases for training: read, split, stacked along the slice axis, embedded once.

Each case gets a :class:`~sss_lib.engine.SegmentationSession` on the shared
:class:`~sss_lib.embedding_cache.EmbeddingStore`, so training, validation and the final model all
see exactly the preprocessing and embeddings the engine uses at run time.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import numpy as np

from ..backbones.base import Backbone
from ..datasets import Case
from ..embedding_cache import EmbeddingStore
from ..engine import SegmentationSession
from ..errors import InputError
from ..preprocess import Preprocessing
from ..volume import Volume, axis_from_name

log = logging.getLogger(__name__)

#: Stand-in in label stacks for nnU-Net's "ignore" voxels (left out of every loss and prompt).
IGNORE = -1


@dataclasses.dataclass
class LabeledCase:
    """One labeled case, ready for training.

    Attributes:
        case_id: the dataset's id.
        image / label: the volumes (same grid).
        session: the engine session (preprocessed stack, cached embeddings).
        labels: ``(S, H, W)`` int16 label stack along the session's slice axis; :data:`IGNORE` marks
            voxels nobody labeled.
    """

    case_id: str
    image: Volume
    label: Volume
    session: SegmentationSession
    labels: np.ndarray

    @property
    def spacing_xy(self) -> tuple[float, float]:
        return self.image.in_plane_spacing(self.session.slice_axis)

    @property
    def n_slices(self) -> int:
        return int(self.labels.shape[0])


def split_cases(cases: Sequence[Case], val_cases: Sequence[str] | None,
                val_fraction: float) -> tuple[list[Case], list[Case]]:
    """``(train, val)``: the named ``val_cases``, or the last ``val_fraction`` of ``cases``.

    Raises:
        InputError: a named validation case is not labeled in the dataset, or nothing is left to train on.
    """
    cases = list(cases)
    if val_cases is not None:
        ids = {c.case_id for c in cases}
        unknown = [v for v in val_cases if v not in ids]
        if unknown:
            raise InputError(None, f"validation case(s) {', '.join(unknown)} are not labeled cases of the dataset",
                             f"Choose among: {', '.join(sorted(ids)[:10])}{' ...' if len(ids) > 10 else ''}.")
        val = [c for c in cases if c.case_id in set(val_cases)]
    else:
        n_val = int(round(len(cases) * val_fraction))
        if val_fraction > 0 and len(cases) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(cases) - 1)
        val = cases[len(cases) - n_val:] if n_val else []
    train = [c for c in cases if c not in val]
    if not train:
        raise InputError(None, "no labeled case is left for training after the validation split",
                         "Hold out fewer cases (--val-cases / --val-fraction).")
    return train, val


def load_case(case: Case, backbone: Backbone, preprocessing: Preprocessing, slice_axis: str,
              store: EmbeddingStore, ignore_label: int | None = None) -> LabeledCase:
    """Read a labeled case and open its engine session (nothing is embedded yet)."""
    from ..volume_io import read_label, read_volume

    if case.label_path is None:
        raise InputError(case.image_path, "has no label map", "Training needs labeled cases.")
    image = read_volume(case.image_path)
    label = read_label(case.label_path, image)
    axis = axis_from_name(slice_axis, image)
    session = SegmentationSession(image, backbone, slice_axis=axis, preprocessing=preprocessing, store=store)
    stack = axis.to_stack(label.voxels).astype(np.int64)
    if ignore_label is not None:
        stack[stack == ignore_label] = IGNORE
    if stack.max(initial=0) > np.iinfo(np.int16).max:
        raise InputError(case.label_path, f"holds label value {int(stack.max())}, above 32767")
    return LabeledCase(case.case_id, image, label, session, stack.astype(np.int16))


def embed_cases(cases: Sequence[LabeledCase], progress: Callable[[int, int, str], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> int:
    """Embed every slice of every case once (through the engine's store); returns how many."""
    from ..errors import Cancelled

    total = sum(c.n_slices for c in cases)
    done = 0
    for case in cases:
        for s in range(case.n_slices):
            if should_cancel is not None and should_cancel():
                raise Cancelled("training cancelled; nothing was written")
            case.session.embedding(s)
            done += 1
            if progress is not None:
                progress(done, total, f"embedded {case.case_id} slice {s + 1}/{case.n_slices}")
    return total


def class_labels(declared: dict[int, str], cases: Sequence[LabeledCase]) -> dict[int, str]:
    """The task's classes: the dataset's declared table, else every value found in the labels."""
    if declared:
        return dict(sorted(declared.items()))
    found = sorted({int(v) for c in cases for v in np.unique(c.labels) if v > 0})
    if not found:
        raise InputError(None, "the label maps hold no foreground", "Label at least one structure.")
    return {v: f"class {v}" for v in found}
