"""Peak memory of a large CT on the CPU path: a synthetic 512x512x300 CT, SAM-2.1 tiny at 1024.

The backbone is built as :func:`sss_lib.backbones.registry.build_backbone` builds it on a CPU
(encoder runtime "auto", float16 embeddings), at random initialisation (memory does not depend on
the weights). The engine embeds every slice (SAM-2 embeds eagerly), then propagation starts from one
box and is stopped after a few slices (the engine's final label-map step is not reached). Peak RSS is the kernel's high-water mark (``VmHWM``) of the
measuring process; the one-time encoder export runs first in its own process (its peak is reported
separately) so the measured run uses the cached export, as every run after the first does.

    nice -n 10 python benchmarks/bench_memory.py [--slices 300] [--half | --no-half] [--runtime auto]

Results go to ``benchmarks/results/memory_cpu.json`` (rewritten every 25 slices, so a stopped run
keeps what it measured, marked ``complete: false``).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    """Embed every slice, then propagate a few slices as the engine does; record the peaks."""
    import torch

    from sss_lib.backbones.base import ABSENT_LOGIT
    from sss_lib.embedding_cache import nbytes_of
    from sss_lib.engine import SegmentationSession
    from sss_lib.prompts import SlicePrompt
    from sss_lib.volume import SliceAxis, Volume

    torch.set_num_threads(int(os.environ.get("SSS_BENCH_THREADS", os.cpu_count() or 1)))
    rss0 = proc_status_bytes("VmRSS")
    voxels = synthetic_ct(args.slices, args.size)
    volume = Volume(voxels, np.array([0.8, 0.8, 1.5]), np.zeros(3), np.eye(3), "synthetic CT")
    t0 = time.perf_counter()
    backbone = build(args)
    build_s = time.perf_counter() - t0
    session = SegmentationSession(volume, backbone, slice_axis=SliceAxis(2))
    n_slices = session.stack_shape[0]
    computed = n_slices if args.compute_slices is None else min(args.compute_slices, n_slices)
    key = n_slices // 2
    out: dict = {
        "volume_shape_kji": list(voxels.shape), "volume_dtype": str(voxels.dtype),
        "backbone": backbone.name, "image_size": backbone.image_size, "random_init": True,
        "encoder_runtime": backbone.encoder_runtime, "half_embeddings": backbone.half_embeddings,
        "slices_computed_by_the_encoder": computed, "slices_held": 0, "complete": False,
        "build_s": build_s, "rss_at_start_gib": rss0 / GIB, "peak_rss_after_setup_gib": vm_hwm_bytes() / GIB,
    }
    # The engine's eager loop (SegmentationSession.run) is this: session.embedding(s) for every slice.
    # Slices beyond ``computed`` hold a copy of a computed embedding (same size and dtype), so the
    # store holds what a full run holds without hours of encoding on a small CPU.
    order = sorted(range(n_slices), key=lambda s: abs(s - key))
    t_embed = time.perf_counter()
    times = []
    for n, s in enumerate(order, start=1):
        if n <= computed:
            t = time.perf_counter()
            session.embedding(s)
            times.append(time.perf_counter() - t)
        else:
            src = session.store.get(session.key, order[(n - 1) % computed])
            copy = dataclasses.replace(src, features=tuple(f.clone() for f in src.features))
            session.store.put(session.key, s, copy)
        out["slices_held"] = n
        if n % 10 == 0 or n == n_slices:
            out.update(_state(session, nbytes_of), embed_s_per_slice=float(np.median(times)) if times else None)
            write_results(args.name, {"prepare": getattr(args, "prepared", None), "run": out})
    out["embed_phase_s"] = time.perf_counter() - t_embed
    out["peak_rss_after_embedding_gib"] = vm_hwm_bytes() / GIB

    # Propagation: what SegmentationSession.run does once every slice is embedded, for a few slices.
    logits = np.full(session.stack_shape, ABSENT_LOGIT, dtype=np.float16)  # run() keeps one per class
    box = (args.size * 0.22, args.size * 0.35, args.size * 0.38, args.size * 0.55)
    steps = backbone.propagate(session.slices, session.embedding, {1: [SlicePrompt(key, box=box)]})
    t = time.perf_counter()
    try:
        for done, step in enumerate(steps, start=1):
            logits[step.slice_index] = step.logits[1]
            if done >= args.propagate_steps:
                break
    finally:
        steps.close()
    out["propagation_steps"] = done
    out["propagate_s_per_step"] = (time.perf_counter() - t) / done
    out["peak_rss_after_propagation_gib"] = vm_hwm_bytes() / GIB
    # Not measured: the engine's commit after a full propagation (its label map), which a
    # 300-slice propagation at 1024 px would reach only after hours on a small CPU.
    out.update(_state(session, nbytes_of), complete=True)
    out["peak_rss_gib"] = vm_hwm_bytes() / GIB
    write_results(args.name, {"prepare": getattr(args, "prepared", None), "run": out})


def _state(session, nbytes_of) -> dict:
    held = [session.store.get(session.key, s) for s in sorted(session.store.cached_slices(session.key))]
    return {"embedding_bytes_per_slice": nbytes_of(held[0]) if held else 0,
            "embeddings_held_gib": sum(nbytes_of(h) for h in held) / GIB,
            "peak_rss_gib": vm_hwm_bytes() / GIB, "rss_now_gib": proc_status_bytes("VmRSS") / GIB,
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--propagate-steps", type=int, default=2)
    parser.add_argument("--compute-slices", type=int, default=None,
                        help="slices the encoder computes (default all); the rest hold copies of them")
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
        ["volume", "backbone", "size", "runtime", "fp16", "slices held (computed)", "MiB/slice",
         "embeddings GiB", "encode s/slice", "peak RSS GiB: embedded", "+ propagation"],
        [["x".join(map(str, run["volume_shape_kji"][::-1])), run["backbone"], run["image_size"],
          run["encoder_runtime"], run["half_embeddings"],
          f"{run['slices_held']} ({run['slices_computed_by_the_encoder']})",
          run["embedding_bytes_per_slice"] / 2**20, run["embeddings_held_gib"], run["embed_s_per_slice"],
          run["peak_rss_after_embedding_gib"], run["peak_rss_after_propagation_gib"]]]))
    print(f"(peak of this process since start, ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
