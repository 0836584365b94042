"""Benchmark protocol for semi-supervised training: one command, the whole table, from nothing.

On hard cardiac short-axis phantoms (:mod:`sss_lib.phantoms_cardiac`; ACDC's sizes by default:
70 training cases of which 1, 3 or 7 are labeled and the rest unlabeled, 10 validation and 20
test cases), LiteMedSAM:

1. **Room first**: supervised only from every labeled count, and supervised on all training
   cases (the ceiling), scored on the *validation* split; the table says how much room the
   benchmark leaves (ceiling - supervised at each count) before anything is tuned.
2. **Choice on validation only**: every method (supervised only; consistency without DFE; full
   SSS) is trained with every candidate setting of ``--grid`` and every training seed; a
   candidate's score is its mean validation Dice (the full Auto-segment pipeline on the
   validation cases, over seeds). The best candidate per (labeled count, method) is chosen.
3. **Test once**: only the chosen configuration of each (labeled count, method) is scored on the
   test split, once per seed; mean Dice and per-class Dice (Myo is the class to watch), with the
   ring rule on (the pipeline as it ships) and off, every class from the decoder (the task
   model's coarse classes, :mod:`sss_lib.class_source`, ignored), and the coarse head alone. A
   class absent from both prediction and truth of a case is left out of its mean and counted
   (``n_absent``).

A candidate's validation score is that of the task model as it ships: each class's validation Dice
from the decoder pipeline, or from the coarse head for the classes the trainer took from it (both
measured at the kept checkpoint and stored in the task model).

The results file holds the commit (the run refuses a tree with uncommitted changes to tracked
files unless ``--allow-dirty``, and then says so), the machine, every setting of every run (the
trainer's whole config), every candidate's validation score and the choice. Nothing is merged
from other runs.

    python benchmarks/bench_ssl_protocol.py                       # the full protocol (a GPU's work)
    python benchmarks/bench_ssl_protocol.py --reduced             # a CPU-sized version (see --help)
    python benchmarks/bench_ssl_protocol.py --smoke               # minutes: check that it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import RESULTS, git_commit, write_results  # noqa: E402

from sss_lib.phantoms import CLASS_NAMES, make_phantom_dataset  # noqa: E402
from sss_lib.phantoms_cardiac import make_hard_cardiac_phantom  # noqa: E402

log = logging.getLogger("bench_ssl_protocol")

METHODS = {
    "sup": ("supervised only", dict(consistency=False)),
    "nodfe": ("consistency, no DFE", dict(use_dfe=False)),
    "full": ("full SSS (DFE + PCSW)", dict()),
    # Switches of the unlabeled side, each against "full": class-wise adaptive confidence thresholds,
    # DFE to the mask decoder, and SAM-2's memory path (SAM2_ONLY: this protocol trains LiteMedSAM).
    "full_thr": ("full SSS + class-wise adaptive thresholds", dict(adaptive_thresholds=True)),
    "full_dfedec": ("full SSS + DFE to the mask decoder", dict(dfe_to_decoder=True)),
    "full_memory": ("full SSS + SAM-2 memory path", dict(memory_path=True)),
    # Switches of the labeled slices (a "train" entry holds TrainConfig settings): weak views, and the
    # image encoder's last blocks (LoRA; supervised runs only), each against its base row.
    "full_weak": ("full SSS + 2 weak views of labeled cases", dict(train=dict(weak_views=2))),
    "sup_enc": ("supervised + encoder's last 2 blocks (LoRA rank 4)",
                dict(consistency=False, train=dict(encoder_blocks=2, encoder_lora_rank=4, lr_encoder=1e-4))),
}
#: Rows that need a SAM-2 backbone: left out of the default list, refused with LiteMedSAM.
SAM2_ONLY = {"full_memory"}
#: Settings that only semi-supervised training reads: the grid does not multiply "sup" by them.
SSL_ONLY = {"confidence", "class_guard", "guard_margin", "lambda_u", "cutmix_p", "ema_decay", "lr_dfe",
            "unsup_decoder_weight", "unsup_head_weight", "decoder_agreement", "teacher_points",
            "adaptive_thresholds", "adaptive_floor", "dfe_to_decoder"}

FULL = dict(train_cases=70, val_cases=10, test_cases=20, labeled=[1, 3, 7], size=None, fov_mm=None,
            slices=None, iterations=2000, train_seeds=[0, 1], grid=["confidence=0.95,0.99"])
REDUCED = dict(train_cases=12, val_cases=3, test_cases=6, labeled=[3], size=80, fov_mm=160.0, slices=8,
               iterations=60, train_seeds=[0, 1], grid=[])
SMOKE = dict(train_cases=4, val_cases=1, test_cases=1, labeled=[1], size=48, fov_mm=150.0, slices=4,
             iterations=4, train_seeds=[0, 1], grid=[], methods=["sup", "full"])


def parse_grid(items: list[str]) -> list[dict[str, Any]]:
    """``["confidence=0.95,0.99", "class_guard=true,false"]`` -> every combination as a dict."""
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid {item!r}: write NAME=V1,V2")
        axes.append([(key, _value(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def make_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The training pool (training cases, then validation cases) and the test set."""
    kw = dict(size=(args.size, args.size) if args.size else None, fov_mm=args.fov_mm, n_slices=args.slices)
    pool = make_phantom_dataset(work / "pool", args.train_cases + args.val_cases, seed=100 + args.data_seed,
                                layout="plain", generator=make_hard_cardiac_phantom, generator_kwargs=kw)
    test = make_phantom_dataset(work / "test", args.test_cases, seed=200 + args.data_seed, layout="plain",
                                generator=make_hard_cardiac_phantom, generator_kwargs=kw)
    return pool, test


def score(model_path: Path, cases: list, backbone: Any, store: Any, *, rings_off: bool) -> dict[str, Any]:  # noqa: ANN401
    """Auto-segment ``cases`` (``sss_lib.datasets`` cases with labels) and score per class; with
    ``rings_off`` also without the ring rule, and the coarse head alone."""
    from sss_lib.auto_segment import AutoSegmentSession, TaskRuntime
    from sss_lib.metrics import MetricAccumulator
    from sss_lib.task_model import load_task_model
    from sss_lib.volume_io import read_label, read_volume

    runtime = TaskRuntime.from_task_model(load_task_model(model_path), backbone=backbone)
    variants = {"pipeline": runtime}
    if runtime.coarse_classes:  # else the decoder-only run is the pipeline's own
        variants["decoder_only"] = dataclasses.replace(runtime, coarse_classes=())
    if rings_off:
        variants["rings_off"] = dataclasses.replace(runtime, ring_rule=False)
    accs = {name: MetricAccumulator(("dice", "hd95")) for name in [*variants, "coarse"]}
    ring_slices = 0
    for case in cases:
        image, truth = read_volume(case.image_path), read_label(case.label_path)
        spacing = truth.spacing[::-1]
        for name, rt in variants.items():
            session = AutoSegmentSession(image, rt, store=store)
            result = session.run()
            if name == "pipeline":
                ring_slices += sum(len(v) for v in result.rings.values())
                coarse = session.coarse_labels().voxels
                for k in CLASS_NAMES:
                    accs["coarse"].add_masks(case.case_id, k, coarse == k, truth.voxels == k, spacing)
            for k in CLASS_NAMES:
                accs[name].add_masks(case.case_id, k, result.labels.voxels == k, truth.voxels == k, spacing)
    out: dict[str, Any] = {"ring_slices": ring_slices, "coarse_classes": [CLASS_NAMES[k] for k in runtime.coarse_classes]}
    for name, acc in accs.items():
        summary = acc.summary()
        per_class = {CLASS_NAMES[k]: summary[k]["dice"].mean for k in CLASS_NAMES if k in summary}
        finite = [v for v in per_class.values() if np.isfinite(v)]
        out[name] = {"mean_dice": float(np.mean(finite)) if finite else float("nan"), "dice_per_class": per_class,
                     "n_absent": {CLASS_NAMES[k]: summary[k]["dice"].n_absent for k in CLASS_NAMES if k in summary},
                     "hd95_per_class": {CLASS_NAMES[k]: summary[k]["hd95"].mean for k in CLASS_NAMES if k in summary},
                     "cases": acc.rows()}
    out.setdefault("decoder_only", out["pipeline"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help=f"CPU-sized settings: {REDUCED}")
    size.add_argument("--smoke", action="store_true", help=f"tiny settings, to check that it runs: {SMOKE}")
    ap.add_argument("--train-cases", type=int, help=f"training cases, labeled + unlabeled (full: {FULL['train_cases']})")
    ap.add_argument("--val-cases", type=int)
    ap.add_argument("--test-cases", type=int)
    ap.add_argument("--labeled", type=int, nargs="+")
    ap.add_argument("--size", type=int, help="in-plane voxels (full: drawn 208-256 per case)")
    ap.add_argument("--fov-mm", type=float, help="field of view (full: drawn 300-400 mm; reduced: a heart-centred crop)")
    ap.add_argument("--slices", type=int, help="slices per case (full: drawn 7-14)")
    ap.add_argument("--iterations", type=int)
    ap.add_argument("--train-seeds", type=int, nargs="+")
    ap.add_argument("--grid", nargs="*", help="candidate settings for the SSL methods, NAME=V1,V2 (chosen on validation)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--labeled-batch", type=int, default=8)
    ap.add_argument("--decoder-batch", type=int, default=2)
    ap.add_argument("--unlabeled-batch", type=int, default=2)
    ap.add_argument("--unsup-decoder-classes", type=int, default=1)
    ap.add_argument("--val-every", type=int, default=None, help="default: 4 validations per run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ceiling", action="store_true",
                    help="leave out supervised training on all training cases (the ceiling row and the room line); "
                         "for ablation runs whose ceiling an earlier run of the same data already gives")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--name", default=None, help="results name (default: ssl_protocol, _reduced_cpu or _smoke)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run although tracked files have uncommitted changes (the results say so)")
    args = ap.parse_args(argv)
    preset = SMOKE if args.smoke else REDUCED if args.reduced else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.methods = args.methods or [m for m in METHODS if m not in SAM2_ONLY]
    if SAM2_ONLY & set(args.methods):
        raise SystemExit(f"--methods {' '.join(sorted(SAM2_ONLY & set(args.methods)))}: needs a SAM-2 backbone, and "
                         "this protocol trains LiteMedSAM")
    args.name = args.name or ("ssl_protocol_smoke" if args.smoke else "ssl_protocol_reduced_cpu" if args.reduced
                              else "ssl_protocol")
    commit = git_commit()
    if commit.endswith("-dirty") and not args.allow_dirty:
        raise SystemExit(f"the tree has uncommitted changes to tracked files ({commit}): commit them, run from a "
                         "clean checkout (git worktree add), or pass --allow-dirty (the results will say so)")
    if max(args.labeled) >= args.train_cases:
        raise SystemExit("every labeled count must leave unlabeled training cases")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args, commit)


def run(args: argparse.Namespace, commit: str) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from bench_ssl import split_folders

    from sss_lib.backbones.registry import build_backbone
    from sss_lib.datasets import open_dataset
    from sss_lib.embedding_cache import EmbeddingStore
    from sss_lib.runs.progress import ProgressReporter
    from sss_lib.trainer.config import TrainConfig
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import run_training

    t_all = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sss_ssl_protocol_"))
    pool, test = make_data(work, args)
    test_cases = open_dataset(test).cases
    backbone = build_backbone("litemedsam", device=args.device)
    pristine = {"pe": {n: t.clone() for n, t in backbone.net.prompt_encoder.state_dict().items()},
                "md": {n: t.clone() for n, t in backbone.net.mask_decoder.state_dict().items()}}
    settings = (backbone.stop_rule, backbone.carry_points)
    store = EmbeddingStore(max_volumes=args.train_cases + args.val_cases + args.test_cases + 2)
    strong_cache: dict = {}
    grid = parse_grid(args.grid)
    # The last: supervised on all (the ceiling).
    counts = sorted(set(args.labeled)) + ([] if args.no_ceiling else [args.train_cases])
    results: dict[str, Any] = {"protocol": __doc__.split("\n\n")[1].strip(), "clean_commit": not commit.endswith("-dirty"),
                               "settings": dict(vars(args)), "grid": grid, "runs": [], "chosen": {}, "test": []}

    def train(n_lab: int, method: str, candidate: dict[str, Any], seed: int) -> dict[str, Any]:
        lab, unl, val_ids = split_folders(work, pool, n_lab, args.train_cases, args.val_cases)
        title, overrides = METHODS[method]
        overrides = dict(overrides)
        train_overrides = overrides.pop("train", {})
        tag = "_".join(f"{k}{v}" for k, v in candidate.items()) or "default"
        run_dir = work / f"n{n_lab}" / f"{method}_{tag}_seed{seed}"
        backbone.net.prompt_encoder.load_state_dict(pristine["pe"])
        backbone.net.mask_decoder.load_state_dict(pristine["md"])
        backbone.stop_rule, backbone.carry_points = settings
        tcfg = TrainConfig(lab, run_dir / "model.ssstask", backbone="litemedsam", device=args.device,
                           val_cases=tuple(val_ids), iterations=args.iterations, seed=seed,
                           head_batch=args.labeled_batch, decoder_batch=args.decoder_batch,
                           val_every=args.val_every or max(1, args.iterations // 4), **train_overrides)
        unlabeled = unl if n_lab < args.train_cases else None
        cfg = SemiSupConfig(train=tcfg, run_dir=run_dir, unlabeled=unlabeled, unlabeled_batch=args.unlabeled_batch,
                            strong_view_seed=args.data_seed, unsup_decoder_classes=args.unsup_decoder_classes,
                            checkpoint_every=max(1, args.iterations), **{**overrides, **candidate})
        reporter = ProgressReporter(cfg.total_steps, json_lines=False, console_view=False,
                                    history=run_dir / "history.jsonl")
        t0 = time.perf_counter()
        outcome = run_training(cfg, backbone=backbone, reporter=reporter, store=store, strong_cache=strong_cache,
                               console=lambda text: log.info("%s", text))
        row = {"labeled": n_lab, "method": method, "title": title, "candidate": candidate, "seed": seed,
               "config": cfg.to_dict(), "model": str(outcome.model_path), "val_dice": shipped_val_dice(outcome),
               "val_dice_decoder": outcome.best_dice,
               "best_step": outcome.best_step, "warmup_end": outcome.warmup_end,
               "warmup_reason": outcome.warmup_reason, "train_seconds": time.perf_counter() - t0,
               "seconds_per_step": outcome.timings["train"] / max(1, outcome.step)}
        print(f"  n={n_lab} {method} {candidate or ''} seed {seed}: validation Dice {row['val_dice']:.4f} "
              f"(decoder only {outcome.best_dice:.4f}) "
              f"(step {outcome.best_step}; warm-up to step {outcome.warmup_end}; {row['train_seconds']:.0f} s)", flush=True)
        results["runs"].append(row)
        _write(results, args, t_all)
        return row

    # 1-2: every candidate on validation (supervised at every count first: the room).
    plan = [(n, "sup") for n in counts] + [(n, m) for n in sorted(set(args.labeled)) for m in args.methods
                                           if m != "sup"]
    for n_lab, method in plan:
        supervised = METHODS[method][1].get("consistency", True) is False
        candidates = [c for c in grid if not supervised] or [{}]
        if supervised:
            candidates = [{k: v for k, v in c.items() if k not in SSL_ONLY} for c in grid]
            candidates = [dict(t) for t in {tuple(sorted(c.items())) for c in candidates}]
        scored = []
        for candidate in candidates:
            rows = [train(n_lab, method, candidate, seed) for seed in args.train_seeds]
            scored.append((float(np.mean([r["val_dice"] for r in rows])), candidate, rows))
        best = max(scored, key=lambda item: item[0])
        results["chosen"][f"{n_lab}/{method}"] = {"candidate": best[1], "val_dice": best[0],
                                                  "candidates": [[c, v] for v, c, _ in scored]}
        # 3: the chosen configuration, on the test split, once per seed.
        for row in best[2]:
            t0 = time.perf_counter()
            scores = score(Path(row["model"]), test_cases, backbone, store, rings_off=True)
            results["test"].append({"labeled": n_lab, "method": method, "candidate": best[1], "seed": row["seed"],
                                    "eval_seconds": time.perf_counter() - t0, **scores})
            _write(results, args, t_all)
    table = _write(results, args, t_all)
    print(table)
    return 0


def shipped_val_dice(outcome: Any) -> float | None:  # noqa: ANN401
    """The kept checkpoint's mean validation Dice as the task model ships: the coarse head's Dice
    for its coarse classes, the decoder pipeline's for the others."""
    from sss_lib.task_model import load_task_model

    if outcome.model_path is None:
        return outcome.best_dice
    model = load_task_model(outcome.model_path)
    if model.validation is None:
        return outcome.best_dice
    v = model.validation
    per_class = [v.coarse_dice[k] if k in model.coarse_classes else d for k, d in v.dice.items()]
    return float(np.mean(per_class)) if per_class else outcome.best_dice


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def _write(results: dict[str, Any], args: argparse.Namespace, t_all: float) -> str:
    results["seconds"] = time.perf_counter() - t_all
    path = write_results(args.name, results)
    s = args
    head = (f"Semi-supervised protocol (`benchmarks/bench_ssl_protocol.py`), commit `{git_commit()}`"
            f"{'' if results['clean_commit'] else ' (NOT clean: uncommitted changes)'}; hard cardiac phantoms: "
            f"{s.train_cases} training cases, {s.val_cases} validation, {s.test_cases} test; "
            f"{'size ' + str(s.size) + ' px' if s.size else '208-256 px'}, "
            f"{'FOV ' + str(s.fov_mm) + ' mm' if s.fov_mm else 'FOV 300-400 mm'}, "
            f"{str(s.slices) + ' slices' if s.slices else '7-14 slices'}; LiteMedSAM on {s.device}; "
            f"{s.iterations} steps; training seeds {s.train_seeds}; candidates {results['grid']} chosen on "
            f"validation; test Dice (mean ± spread over seeds) of the chosen configuration, scored once.\n")
    lines = [head, "| labeled | method | chosen | val Dice | test Dice | RV | Myo | LV | from coarse head (per seed) | "
                   "test Dice, decoder only | Myo, decoder only | Myo, ring rule off | Myo, coarse head | "
                   "test Dice, ring rule off |", "|" + "---|" * 14]
    for key, chosen in results["chosen"].items():
        n_lab, method = key.split("/")
        tests = [t for t in results["test"] if str(t["labeled"]) == n_lab and t["method"] == method]
        label = f"{n_lab} (all)" if int(n_lab) == s.train_cases else n_lab
        per = lambda variant, cls: _fmt([t[variant]["dice_per_class"].get(cls) for t in tests])  # noqa: E731
        lines.append(f"| {label} | {METHODS[method][0]} | {chosen['candidate'] or 'defaults'} | "
                     f"{chosen['val_dice']:.3f} | {_fmt([t['pipeline']['mean_dice'] for t in tests])} | "
                     f"{per('pipeline', 'RV')} | {per('pipeline', 'Myo')} | {per('pipeline', 'LV')} | "
                     f"{'; '.join(','.join(t.get('coarse_classes', [])) or '-' for t in tests)} | "
                     f"{_fmt([t['decoder_only']['mean_dice'] for t in tests if 'decoder_only' in t])} | "
                     f"{per('decoder_only', 'Myo') if all('decoder_only' in t for t in tests) else '-'} | "
                     f"{per('rings_off', 'Myo')} | {per('coarse', 'Myo')} | "
                     f"{_fmt([t['rings_off']['mean_dice'] for t in tests])} |")
    room = _room(results, s)
    text = "\n".join(lines) + "\n" + (f"\n{room}\n" if room else "")
    (RESULTS / f"{args.name}.md").write_text(text)
    log.info("wrote %s", path)
    return text


def _room(results: dict[str, Any], s: argparse.Namespace) -> str:
    """The room the benchmark leaves on validation: ceiling minus supervised at each count."""
    ceiling = results["chosen"].get(f"{s.train_cases}/sup")
    if ceiling is None:
        return ""
    parts = []
    for n_lab in sorted(set(s.labeled)):
        sup = results["chosen"].get(f"{n_lab}/sup")
        if sup is not None:
            parts.append(f"{n_lab} labeled {100 * (ceiling['val_dice'] - sup['val_dice']):+.1f} points")
    return (f"Room (validation Dice, supervised on all {s.train_cases} minus supervised only): " + ", ".join(parts)
            + ". The +5 points target needs at least 5 points of room.")


if __name__ == "__main__":
    raise SystemExit(main())
