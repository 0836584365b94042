"""Peak memory of a large CT on the CPU path: a synthetic 512x512x300 CT, SAM-2.1 tiny at 1024.

The backbone is built as :func:`sss_lib.backbones.registry.build_backbone` builds it on a CPU
(encoder runtime "auto", float16 embeddings), at random initialisation (memory does not depend on
the weights), and the engine's own embedding store is used (on a CPU it keeps
``$SSS_EMBEDDING_RAM_MB``, default 1 GiB, of embeddings in RAM and the rest in a spool file). One
:meth:`SegmentationSession.run` does everything a first run does: it embeds every slice (SAM-2
embeds eagerly), decodes the key slice's box, propagates up and down to two "not on this slice"
markers ``--propagate-steps`` slices away (SAM-2's memory bank is full after 6), and commits the
label map. Peak RSS is the kernel's high-water mark (``VmHWM``) of the measuring process; the
one-time encoder export runs first in its own process (its peak is reported separately) so the
measured run uses the cached export, as every run after the first does. Each ``--ram-budget`` is
measured in its own process.

Encoding 300 slices at 1024 px takes over an hour on a small CPU, so the encoder computes the first
``--compute-slices`` slices and then *replays* its last output for the rest: the replay hands the
backbone fresh float32 arrays of the same shapes, exactly as the runtime does, so every slice goes
through the same conversion to float16, the same store and the same allocations; only the network
is skipped (it holds its last output, 16 MiB, as the runtime's request does anyway).

    nice -n 10 python benchmarks/bench_memory.py [--slices 300] [--ram-budget default off 512]

Results go to ``benchmarks/results/memory_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def memory_now() -> dict[str, float]:
    """``{rss_gib, peak_rss_gib}`` of this process now."""
    return {"rss_gib": proc_status_bytes("VmRSS") / GIB, "peak_rss_gib": vm_hwm_bytes() / GIB}


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


class ReplayingEncoder:
    """Runs ``encoder`` for the first ``compute`` calls, then returns fresh float32 copies of its
    last output (what an :class:`~sss_lib.backbones.encoder_runtime.EncoderRuntime` returns)."""

    def __init__(self, encoder, compute: int) -> None:
        self.encoder, self.compute = encoder, compute
        self.name, self.cache_suffix = encoder.name, encoder.cache_suffix
        self.calls, self.seconds = 0, []
        self.last: list[np.ndarray] = []

    def __call__(self, x):
        import torch

        self.calls += 1
        if self.calls <= self.compute:
            t = time.perf_counter()
            out = self.encoder(x)
            self.seconds.append(time.perf_counter() - t)
            self.last = [o.numpy() for o in out]
            return out
        return tuple(torch.from_numpy(np.array(o, dtype=np.float32)) for o in self.last)


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


def measure(args) -> dict:
    """One first run of the engine under ``args.ram_budget``; returns what it measured."""
    import torch

    if args.ram_budget != "default":
        os.environ["SSS_EMBEDDING_RAM_MB"] = args.ram_budget
    from sss_lib.engine import SegmentationSession
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis, Volume

    torch.set_num_threads(int(os.environ.get("SSS_BENCH_THREADS", os.cpu_count() or 1)))
    out: dict = {"ram_budget_mb": args.ram_budget, "complete": False, "after_imports": memory_now()}
    voxels = synthetic_ct(args.slices, args.size)
    volume = Volume(voxels, np.array([0.8, 0.8, 1.5]), np.zeros(3), np.eye(3), "synthetic CT")
    out["after_volume"] = memory_now()
    t0 = time.perf_counter()
    backbone = build(args)
    out["build_s"] = time.perf_counter() - t0
    out["after_build"] = memory_now()
    session = SegmentationSession(volume, backbone, slice_axis=SliceAxis(2))
    out["after_session"] = memory_now()
    n_slices = session.stack_shape[0]
    computed = n_slices if args.compute_slices is None else min(args.compute_slices, n_slices)
    if computed < n_slices:
        if backbone.encoder is None:
            raise SystemExit("--compute-slices needs an encoder runtime (not torch); or compute every slice")
        backbone.encoder = ReplayingEncoder(backbone.encoder, computed)
    store = session.store
    out.update({
        "volume_shape_kji": list(voxels.shape), "volume_dtype": str(voxels.dtype),
        "backbone": backbone.name, "image_size": backbone.image_size, "random_init": True,
        "encoder_runtime": backbone.encoder_runtime, "half_embeddings": backbone.half_embeddings,
        "slices_computed_by_the_encoder": computed, "store_ram_bytes": store.ram_bytes,
    })

    key, steps = n_slices // 2, args.propagate_steps
    box = (args.size * 0.22, args.size * 0.35, args.size * 0.38, args.size * 0.55)
    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "nodule", [
        SlicePrompt(key, box=box), SlicePrompt.not_on_slice(max(key - steps - 1, 0)),
        SlicePrompt.not_on_slice(min(key + steps + 1, n_slices - 1))])])
    t_run = time.perf_counter()
    t_embedded, propagated = t_run, 0
    for event in session.run(prompts):
        if event.stage != "embed" and "after_embedding" not in out:  # (and after the key slice's decode)
            t_embedded = time.perf_counter()
            out["embed_phase_s"] = t_embedded - t_run
            out["after_embedding"] = memory_now()
        if event.stage == "propagate":
            propagated = event.done
            out["after_propagation"] = memory_now()
        if event.stage == "embed" and event.done % 25 == 0:
            log_progress(f"embedded {event.done}/{event.total}, {memory_now()}")
    result = event.result
    out["propagate_and_commit_s"] = time.perf_counter() - t_embedded
    out["run_s"] = time.perf_counter() - t_run
    out["after_commit"] = memory_now()
    out.update({
        "propagated_slices": propagated, "recomputed_slices": result.recomputed_slices[1],
        "embed_s_per_slice": float(np.median(backbone.encoder.seconds)) if computed < n_slices else None,
        "embeddings_computed": result.embeddings_computed,
        "embedding_bytes_per_slice": store.bytes_used // max(store.slice_count, 1),
        "embeddings_gib": store.bytes_used / GIB, "embeddings_in_ram_gib": (store.bytes_used - store.disk_bytes) / GIB,
        "embeddings_on_disk_gib": store.disk_bytes / GIB, "spilled": store.spilled, "reloaded": store.reloaded,
        "load_average": os.getloadavg(), "complete": True, "peak_rss_gib": vm_hwm_bytes() / GIB,
    })
    return out


def log_progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def child(args, stage: str, extra: list[str]) -> dict:
    """Run this script's ``stage`` in a fresh process (its own peak RSS); its RESULT line."""
    cmd = [sys.executable, __file__, "--stage", stage, "--image-size", str(args.image_size), "--runtime", args.runtime,
           "--half" if args.half else "--no-half", *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{stage} failed (exit {proc.returncode})")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--propagate-steps", type=int, default=7, help="slices propagated on each side of the key")
    parser.add_argument("--compute-slices", type=int, default=8,
                        help="slices the encoder computes (the rest replay its output; 0: all)")
    parser.add_argument("--ram-budget", nargs="+", default=["default"],
                        help="$SSS_EMBEDDING_RAM_MB values to measure, each in its own process ('default', 'off', MiB)")
    parser.add_argument("--name", default="memory_cpu")
    parser.add_argument("--stage", choices=["all", "prepare", "measure"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.compute_slices = args.compute_slices or None
    if args.stage == "prepare":
        print("RESULT " + json.dumps(prepare(args)))
        return
    if args.stage == "measure":
        args.ram_budget = args.ram_budget[0]
        print("RESULT " + json.dumps(measure(args)))
        return
    payload: dict = {"prepare": child(args, "prepare", []), "runs": []}
    for budget in args.ram_budget:
        extra = ["--slices", str(args.slices), "--size", str(args.size), "--propagate-steps", str(args.propagate_steps),
                 "--compute-slices", str(args.compute_slices or 0), "--ram-budget", budget]
        payload["runs"].append(child(args, "measure", extra))
        write_results(args.name, payload)
    rows = []
    for run in payload["runs"]:
        rows.append([run["ram_budget_mb"], "x".join(map(str, run["volume_shape_kji"][::-1])), run["backbone"],
                     run["image_size"], run["encoder_runtime"], run["half_embeddings"],
                     run["embedding_bytes_per_slice"] / 2**20, run["embeddings_in_ram_gib"], run["embeddings_on_disk_gib"],
                     run["after_session"]["peak_rss_gib"], run["after_embedding"]["peak_rss_gib"],
                     run["after_propagation"]["peak_rss_gib"], run["peak_rss_gib"], run["run_s"]])
    print(markdown_table(
        ["RAM budget MiB", "volume", "backbone", "size", "runtime", "fp16", "MiB/slice", "embeddings in RAM GiB",
         "on disk GiB", "peak RSS GiB: setup", "+ embedding", "+ propagation", "+ commit (peak)", "run s"], rows))


if __name__ == "__main__":
    main()
