"""Peak memory of a large CT on the CPU path: a synthetic 512x512x300 CT, SAM-2.1 tiny at 1024.

The backbone is built as :func:`sss_lib.backbones.registry.build_backbone` builds it on a CPU
(encoder runtime "auto", float16 embeddings), at random initialisation (memory does not depend on
the weights). The engine embeds every slice (SAM-2 embeds eagerly), then propagation starts from one
box and is stopped after a few slices. Peak RSS is the kernel's high-water mark (``VmHWM``) of the
measuring process; the one-time encoder export runs first in its own process (its peak is reported
separately) so the measured run uses the cached export, as every run after the first does.

    nice -n 10 python benchmarks/bench_memory.py [--slices 300] [--half | --no-half] [--runtime auto]

Results go to ``benchmarks/results/memory_cpu.json`` (rewritten every 25 slices, so a stopped run
keeps what it measured, marked ``complete: false``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table, write_results  # noqa: E402

GIB = 2**30


def proc_status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` in bytes: ``"VmHWM"`` (peak resident set so far) or
    ``"VmRSS"`` (resident now). Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def vm_hwm_bytes() -> int:
    return proc_status_bytes("VmHWM")


def synthetic_ct(slices: int, size: int) -> np.ndarray:
    """``(slices, size, size)`` int16 Hounsfield units: air, a body ellipse, two lungs, a spine."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    lungs = (((xx - 0.32) / 0.12) ** 2 + ((yy - 0.47) / 0.17) ** 2 <= 1) | (
        ((xx - 0.68) / 0.12) ** 2 + ((yy - 0.47) / 0.17) ** 2 <= 1)
    spine = ((xx - 0.5) / 0.05) ** 2 + ((yy - 0.72) / 0.05) ** 2 <= 1
    rng = np.random.default_rng(0)
    out = np.empty((slices, size, size), dtype=np.int16)
    for s in range(slices):
        sl = np.full((size, size), -1000, dtype=np.float32)
        sl[body] = 40
        sl[lungs] = -850
        sl[spine] = 500
        r = 0.03 + 0.02 * np.sin(s / 15)  # a nodule whose size changes along the stack
        sl[((xx - 0.3) ** 2 + (yy - 0.45) ** 2) <= r * r] = 30
        sl += rng.normal(0, 20, sl.shape).astype(np.float32)
        out[s] = np.clip(sl, -1024, 3000).astype(np.int16)
    return out


def build(args):
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone

    return build_sam2_backbone("sam2.1_hiera_tiny", image_size=args.image_size, random_init=True,
                               encoder_runtime=args.runtime, half_embeddings=args.half, stop_after_empty=None)


def prepare(args) -> dict:
    """Build once (exports and checks the encoder if not cached); report this process's peak."""
    t0 = time.perf_counter()
    backbone = build(args)
    return {"encoder_runtime": backbone.encoder_runtime, "build_s": time.perf_counter() - t0,
            "peak_rss_gib": vm_hwm_bytes() / GIB}


def measure(args) -> None:
    import torch

    from sss_lib.embedding_cache import nbytes_of
    from sss_lib.engine import SegmentationSession
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis, Volume

    torch.set_num_threads(int(os.environ.get("SSS_BENCH_THREADS", os.cpu_count() or 1)))
    rss0 = proc_status_bytes("VmRSS")
    voxels = synthetic_ct(args.slices, args.size)
    volume = Volume(voxels, np.array([0.8, 0.8, 1.5]), np.zeros(3), np.eye(3), "synthetic CT")
    t0 = time.perf_counter()
    backbone = build(args)
    build_s = time.perf_counter() - t0
    session = SegmentationSession(volume, backbone, slice_axis=SliceAxis(2))
    after_setup = vm_hwm_bytes()
    axis = session.slice_axis
    key = args.slices // 2
    c = args.size / 2
    box = (c * 0.45, c * 0.7, c * 0.75, c * 1.1)
    prompts = PromptSet(axis, [ClassPrompts(1, "nodule", [SlicePrompt(key, box=box)])])

    out: dict = {
        "volume_shape_kji": list(voxels.shape), "volume_dtype": str(voxels.dtype),
        "backbone": backbone.name, "image_size": backbone.image_size, "random_init": True,
        "encoder_runtime": backbone.encoder_runtime, "half_embeddings": backbone.half_embeddings,
        "build_s": build_s, "rss_at_start_gib": rss0 / GIB, "peak_rss_after_setup_gib": after_setup / GIB,
    }
    embedded, steps, t_embed0, t_embed = 0, 0, time.perf_counter(), None
    events = session.run(prompts)
    try:
        for event in events:
            if event.stage == "embed":
                embedded = event.done
                if embedded % 25 == 0:
                    _write(args, out, embedded, steps, t_embed0, session, nbytes_of, complete=False)
            elif event.stage == "propagate":
                if t_embed is None:
                    t_embed = time.perf_counter() - t_embed0
                steps += 1
                if steps >= args.propagate_steps:
                    break
    finally:
        events.close()
    out["embed_all_s"] = t_embed
    _write(args, out, embedded, steps, t_embed0, session, nbytes_of, complete=True)


def _write(args, out, embedded, steps, t0, session, nbytes_of, *, complete: bool) -> None:
    held = [session.store.get(session.key, s) for s in sorted(session.store.cached_slices(session.key))]
    per_slice = nbytes_of(held[0]) if held else 0
    out.update({
        "slices_embedded": embedded, "propagation_steps": steps, "complete": complete,
        "seconds_so_far": time.perf_counter() - t0,
        "embed_s_per_slice": (time.perf_counter() - t0) / max(embedded, 1) if not complete else
        (out.get("embed_all_s") or 0) / max(embedded, 1),
        "embedding_bytes_per_slice": per_slice, "embeddings_held_gib": sum(nbytes_of(h) for h in held) / GIB,
        "peak_rss_gib": vm_hwm_bytes() / GIB, "load_average": os.getloadavg(),
    })
    write_results(args.name, {"prepare": getattr(args, "prepared", None), "run": out})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--propagate-steps", type=int, default=3)
    parser.add_argument("--name", default="memory_cpu")
    parser.add_argument("--stage", choices=["all", "prepare", "measure"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "prepare":
        print("RESULT " + json.dumps(prepare(args)))
        return
    if args.stage == "all":
        cmd = [sys.executable, __file__, "--stage", "prepare", "--image-size", str(args.image_size),
               "--runtime", args.runtime, "--half" if args.half else "--no-half"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit("preparing the encoder failed")
        args.prepared = json.loads(lines[-1][7:])
    measure(args)
    run = json.loads((Path(__file__).parent / "results" / f"{args.name}.json").read_text())["run"]
    print(markdown_table(
        ["volume", "backbone", "size", "runtime", "fp16 store", "slices embedded", "MiB/slice",
         "embeddings GiB", "s/slice", "peak RSS GiB"],
        [["x".join(map(str, run["volume_shape_kji"][::-1])), run["backbone"], run["image_size"],
          run["encoder_runtime"], run["half_embeddings"], run["slices_embedded"],
          run["embedding_bytes_per_slice"] / 2**20, run["embeddings_held_gib"], run["embed_s_per_slice"],
          run["peak_rss_gib"]]]))
    print(f"(peak of this process since start, ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
