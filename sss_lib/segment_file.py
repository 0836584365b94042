"""``segment``: a volume file and a prompts file in, a label-map file out (typed API of the CLI)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .engine import EngineEvent, SegmentationResult, SegmentationSession
from .errors import InputError
from .preprocess import Preprocessing
from .prompts import PromptSet
from .volume import Volume

log = logging.getLogger(__name__)


def segment_file(
    image: str | Path,
    prompts: str | Path,
    output: str | Path,
    *,
    backbone: str = "auto",
    device: str = "auto",
    frame: int | None = None,
    series_uid: str | None = None,
    preprocessing: Preprocessing | None = None,
    progress: Callable[[EngineEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Segment ``image`` from the prompts in ``prompts`` (JSON) and write the label map to ``output``.

    The output has the input's exact grid. A cancelled or failed run leaves ``output`` untouched.
    """
    from .backbones.registry import build_backbone
    from .volume_io import read_volume, write_volume

    output = Path(output)
    if output.is_dir():
        raise InputError(output, "is a folder", "Give a file name such as seg.nii.gz or seg.nrrd.")
    volume = read_volume(image, frame=frame, series_uid=series_uid)
    prompt_set = PromptSet.load(prompts, volume)
    net = build_backbone(backbone, device=device)
    session = SegmentationSession(volume, net, slice_axis=prompt_set.slice_axis, preprocessing=preprocessing)
    result = session.segment(prompt_set, progress=progress, should_cancel=should_cancel)
    write_volume(result.labels, output)  # atomic: temp file + rename
    log.info("wrote %s", output)
    return result
