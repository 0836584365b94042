"""How many autocast casts a one-class SAM-2 re-run makes, with and without the span's cast cache held.

Under bf16 autocast (forced on this CPU with ``SSS_CPU_BF16=1``, as on a GPU), each slice's tracking
opens its own autocast region; :func:`sss_lib.device.autocast_cache_held` keeps the weights' casts
across a span. This counts ``aten::_to_copy`` calls (one per cast) in a re-run after moving the box,
both ways, checks that the logits are identical, and writes ``results/autocast_casts_cpu.json``.
SAM-2.1 tiny at 64 px, random init, no early stop (every slice tracked).

    python benchmarks/bench_autocast_casts.py [--slices 12]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_results  # noqa: E402


def count_rerun(slices: int, hold: bool) -> tuple[int, np.ndarray]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sss_lib import device
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone
    from sss_lib.engine import SegmentationSession
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis, Volume

    torch.manual_seed(0)
    backbone = build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, stop_after_empty=None)
    voxels = np.random.default_rng(0).normal(0, 1, (slices, 48, 48)).astype(np.float32)
    volume = Volume(voxels, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "noise")

    def prompts(shift: float) -> PromptSet:
        return PromptSet(SliceAxis(2), [ClassPrompts(1, "a", [SlicePrompt(key_slice=0, box=(10 + shift, 10, 30, 30))])])

    session = SegmentationSession(volume, backbone, slice_axis=SliceAxis(2))
    session.segment(prompts(0.0))  # embeds every slice: the re-run below only tracks
    held = device.autocast_cache_held
    if not hold:
        device.autocast_cache_held = contextlib.nullcontext  # type: ignore[assignment]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            session.segment(prompts(1.0))
    finally:
        device.autocast_cache_held = held
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    return casts, session.class_logits(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=12)
    args = ap.parse_args()
    os.environ["SSS_CPU_BF16"] = "1"
    import torch

    torch.set_num_threads(1)
    plain, plain_logits = count_rerun(args.slices, hold=False)
    held, held_logits = count_rerun(args.slices, hold=True)
    identical = bool(np.array_equal(plain_logits, held_logits))
    rows = [["per slice region (cache not held)", plain, plain / args.slices],
            ["cache held over the span", held, held / args.slices]]
    table = markdown_table(["tracking", f"casts in a {args.slices}-slice re-run", "per slice"], rows)
    path = write_results("autocast_casts_cpu", {"settings": vars(args), "casts_not_held": plain,
                                                "casts_held": held, "identical_logits": identical,
                                                "table_markdown": table})
    print(table)
    print(f"identical logits: {identical}; wrote {path}")


if __name__ == "__main__":
    main()
