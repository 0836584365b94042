"""The README's first command: segment the bundled lung CT tumour from one box, offline, on the CPU.

Sample: ``Testing/Data/lung1_crop_*.nrrd`` (a crop of pyradiomics' lung1, BSD-3). The box is what a
user would draw: the tumour's tight box on its largest slice plus a few pixels of margin.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .prompts import ClassPrompts, PromptSet, SlicePrompt
from .volume import Volume

BOX_MARGIN_PX = 3


def sample_data_dir() -> Path:
    """``$SSS_SAMPLE_DATA`` or the repository's ``Testing/Data``."""
    env = os.environ.get("SSS_SAMPLE_DATA")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "Testing" / "Data"


def box_prompt_from_label(label: Volume, class_label: int = 1, margin: int = BOX_MARGIN_PX,
                          name: str = "tumour", color: tuple[int, int, int] = (230, 80, 60)) -> PromptSet:
    """One user-style box on the label's largest slice (along the default slice axis)."""
    axis = label.default_slice_axis()
    stack = axis.to_stack(label.voxels) == class_label
    areas = stack.reshape(stack.shape[0], -1).sum(axis=1)
    if areas.max() == 0:
        raise InputError(label.source, f"label {class_label} is empty")
    key = int(np.argmax(areas))
    ys, xs = np.nonzero(stack[key])
    h, w = stack.shape[1:]
    box = (max(xs.min() - margin, 0), max(ys.min() - margin, 0),
           min(xs.max() + margin, w - 1), min(ys.max() + margin, h - 1))
    prompt = SlicePrompt(key_slice=key, box=box, source="user")
    return PromptSet(axis, [ClassPrompts(class_label, name, [prompt], color)])


@dataclasses.dataclass
class DemoReport:
    dice: float
    seconds: float
    label_path: Path
    png_path: Path
    prompts_path: Path
    backbone: str

    def summary(self) -> str:
        return (f"backbone {self.backbone}: 3D Dice {self.dice:.3f} against the sample's label "
                f"({self.seconds:.1f} s)\nlabel map: {self.label_path}\npicture:   {self.png_path}\n"
                f"prompts:   {self.prompts_path}")


def run_demo(out_dir: str | Path = "out/demo", *, device: str = "auto", backbone: str = "litemedsam") -> DemoReport:
    """Segment the lung sample, write label map, prompts and a PNG; return the Dice."""
    from .backbones.registry import build_backbone
    from .engine import SegmentationSession
    from .metrics import dice
    from .overlay import render_slice_png
    from .volume_io import read_label, read_volume, write_volume

    data = sample_data_dir()
    image = read_volume(data / "lung1_crop_image.nrrd")
    reference = read_label(data / "lung1_crop_label.nrrd", reference=image)
    prompts = box_prompt_from_label(reference)
    session = SegmentationSession(image, build_backbone(backbone, device=device), slice_axis=prompts.slice_axis)
    result = session.segment(prompts)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_path = write_volume(result.labels, out / "lung1_tumour_seg.nrrd")
    prompts_path = out / "lung1_prompts.json"
    prompts.save(prompts_path, image, coordinates="physical")
    key = prompts.classes[0].prompts[0].key_slice
    axis = prompts.slice_axis
    png_path = render_slice_png(
        out / "lung1_key_slice.png", session.slices[key], axis.to_stack(result.labels.voxels)[key],
        prompts.classes, key, reference=axis.to_stack(reference.voxels)[key],
    )
    score = float(dice(result.labels.voxels == 1, reference.voxels > 0))
    return DemoReport(score, result.seconds, label_path, png_path, prompts_path, session.backbone.name)
