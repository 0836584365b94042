"""Benchmark: semi-supervised training on synthetic cardiac phantoms (RV, Myo, LV), CPU, LiteMedSAM.

For each number of labeled cases (default 1, 3, 7) out of a pool of training phantoms (the rest
are the unlabeled cases), three task models are trained with the same seed, steps and supervised
batch: supervised only, consistency without DFE, and full SSS (consistency + DFE + PCSW teacher
prompts). Each is Auto-segmented on held-out test phantoms (another seed); the table reports mean
Dice and HD95 (mm) over test cases and classes. Every run shares one embedding store and one
strong-view cache (the image encoder is frozen), so each slice is encoded once for the whole
benchmark. Results go to ``benchmarks/results/ssl_cpu.json`` after every run (partial results
survive) and a markdown table is printed at the end.

    python benchmarks/bench_ssl.py                         # the reported configuration
    python benchmarks/bench_ssl.py --smoke                 # a 2-minute check that it runs
    python benchmarks/bench_ssl.py --merge A.json B.json --name ssl_cpu   # one table from side-by-side runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import markdown_table, write_results  # noqa: E402

from sss_lib.phantoms import CLASS_NAMES, make_phantom_dataset  # noqa: E402

log = logging.getLogger("bench_ssl")

CONFIGS = {
    "sup": ("supervised only", dict(consistency=False)),
    "nodfe": ("consistency, no DFE", dict(use_dfe=False)),
    "full": ("full SSS (DFE + PCSW)", dict()),
    "full_formula": ("full SSS, DFE as specified (no gain, head's rate)", dict(dfe_zero_init_gain=False, lr_dfe=None)),
}


def make_pool(work: Path, n_pool: int, n_val: int, n_test: int, slices: int, size: int, seed: int) -> tuple[Path, Path]:
    spacing = (192.0 / size, 192.0 / size, 8.0)  # a 192 mm field of view holds the whole heart
    pool = make_phantom_dataset(work / "pool", n_pool + n_val, seed=1000 + seed, layout="plain",
                                n_slices=slices, size=(size, size), spacing=spacing)
    test = make_phantom_dataset(work / "test", n_test, seed=2000 + seed, layout="plain",
                                n_slices=slices, size=(size, size), spacing=spacing)
    return pool, test


def split_folders(work: Path, pool: Path, n_labeled: int, n_pool: int, n_val: int) -> tuple[Path, Path, list[str]]:
    """Case lists: ``n_labeled`` labeled training cases + the validation cases, and the rest of the
    training pool as unlabeled images."""
    ids = [f"case_{c:03d}" for c in range(n_pool + n_val)]
    val = ids[n_pool:]
    lab_dir = work / f"n{n_labeled}" / "labeled"
    unl_dir = work / f"n{n_labeled}" / "unlabeled"
    lab_dir.mkdir(parents=True, exist_ok=True)
    unl_dir.mkdir(parents=True, exist_ok=True)
    rows = [f"{c},{pool / 'images' / f'{c}.nii.gz'},{pool / 'labels' / f'{c}.nii.gz'}"
            for c in ids[:n_labeled] + val]
    (lab_dir / "cases.csv").write_text("case_id,image,label\n" + "\n".join(rows) + "\n")
    (lab_dir / "classes.json").write_text(json.dumps({str(k): v for k, v in CLASS_NAMES.items()}))
    rows = [f"{c},{pool / 'images' / f'{c}.nii.gz'}," for c in ids[n_labeled:n_pool]]
    (unl_dir / "cases.csv").write_text("case_id,image,label\n" + "\n".join(rows) + "\n")
    return lab_dir, unl_dir, val


def precompute(pool: Path, test: Path, args: argparse.Namespace, backbone, store, strong_cache: dict) -> None:  # noqa: ANN001
    """Embed every slice (and the strong views of every training-pool slice) once, the way the
    runs will ask for them (same preprocessing, same cache keys), so that they can be saved and a
    restarted benchmark does not pay for them again."""
    from sss_lib.datasets import open_dataset
    from sss_lib.engine import SegmentationSession
    from sss_lib.task_model import TaskPreprocessing
    from sss_lib.trainer.config import TrainConfig
    from sss_lib.trainer.semisup_config import StrongViewSettings
    from sss_lib.trainer.unlabeled import UnlabeledCase, embed_strong_views
    from sss_lib.volume import axis_from_name
    from sss_lib.volume_io import read_volume

    t = TrainConfig(pool, pool / "unused.ssstask")
    prep = TaskPreprocessing(t.modality, tuple(t.window), tuple(t.percentiles), t.slice_axis,  # type: ignore[arg-type]
                             int(backbone.image_size)).to_preprocessing()
    train_ids = {f"case_{c:03d}" for c in range(args.pool_cases)}
    todo = [(c, True) for c in open_dataset(pool).cases] + [(c, False) for c in open_dataset(test).cases]
    unlabeled = []
    for n, (case, in_pool) in enumerate(todo, 1):
        image = read_volume(case.image_path)
        session = SegmentationSession(image, backbone, slice_axis=axis_from_name(t.slice_axis, image),
                                      preprocessing=prep, store=store)
        for s in range(session.stack_shape[0]):
            session.embedding(s)
        if in_pool and case.case_id in train_ids:
            unlabeled.append(UnlabeledCase(case.case_id, image, session))
        print(f"  embedded {case.case_id} ({n}/{len(todo)})", flush=True)
    strong = StrongViewSettings().build()
    embed_strong_views(unlabeled, backbone, args.strong_views, strong, args.seed, cache=strong_cache)


def evaluate(model_path: Path, test: Path, backbone, store) -> dict:  # noqa: ANN001
    """Auto-segment every test case with the task model and score it. Besides the pipeline as it
    ships (``dice``; for LiteMedSAM its automatic prompts are boxes alone), each case is also scored
    with PCSW's points in the prompts (``dice_points``, see
    :attr:`sss_lib.auto_segment.TaskRuntime.prompt_points`) and by the coarse head alone (the
    argmax of its probabilities, ``dice_coarse``), which shows what training did to each stage."""
    import dataclasses as dc

    from sss_lib.auto_segment import AutoSegmentSession, TaskRuntime
    from sss_lib.datasets import open_dataset
    from sss_lib.metrics import dice, hd95
    from sss_lib.task_model import load_task_model
    from sss_lib.volume_io import read_label, read_volume

    runtime = TaskRuntime.from_task_model(load_task_model(model_path), backbone=backbone)
    points = dc.replace(runtime, prompt_points=True)
    rows = []
    for case in open_dataset(test).cases:
        image, truth = read_volume(case.image_path), read_label(case.label_path)
        t = time.perf_counter()
        session = AutoSegmentSession(image, runtime, store=store)
        pred = session.run().labels.voxels
        seconds = time.perf_counter() - t
        probs = session.probabilities()
        background = 1.0 - sum(probs[k] for k in CLASS_NAMES)
        coarse = np.stack([background, *[probs[k] for k in CLASS_NAMES]]).argmax(0)
        with_points = AutoSegmentSession(image, points, store=store).run().labels.voxels
        gt = truth.voxels
        rows.append({
            "case": case.case_id, "seconds": seconds,
            "dice": {CLASS_NAMES[k]: dice(pred == k, gt == k) for k in CLASS_NAMES},
            "hd95": {CLASS_NAMES[k]: hd95(pred == k, gt == k, truth.spacing[::-1]) for k in CLASS_NAMES},
            "dice_points": {CLASS_NAMES[k]: dice(with_points == k, gt == k) for k in CLASS_NAMES},
            "dice_coarse": {CLASS_NAMES[k]: dice(coarse == n, gt == k) for n, k in enumerate(CLASS_NAMES, start=1)},
        })
    dice_all = [v for r in rows for v in r["dice"].values()]
    hd_all = [v for r in rows for v in r["hd95"].values()]
    finite = [v for v in hd_all if math.isfinite(v)]
    return {
        "cases": rows,
        "mean_dice": float(np.mean(dice_all)),
        "dice_per_class": {n: float(np.mean([r["dice"][n] for r in rows])) for n in CLASS_NAMES.values()},
        "mean_dice_points": float(np.mean([v for r in rows for v in r["dice_points"].values()])),
        "mean_dice_coarse": float(np.mean([v for r in rows for v in r["dice_coarse"].values()])),
        "mean_hd95_mm": float(np.mean(finite)) if finite else None,
        "hd95_missing": len(hd_all) - len(finite),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool-cases", type=int, default=12, help="training phantoms (labeled + unlabeled)")
    ap.add_argument("--labeled", type=int, nargs="+", default=[3, 1, 7],
                    help="labeled counts to compare (3 first: the target is stated for it)")
    ap.add_argument("--val-cases", type=int, default=2)
    ap.add_argument("--test-cases", type=int, default=20)
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: twice per run)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--labeled-batch", type=int, default=8)
    ap.add_argument("--decoder-batch", type=int, default=2)
    ap.add_argument("--unlabeled-batch", type=int, default=2)
    ap.add_argument("--strong-views", type=int, default=2)
    ap.add_argument("--unsup-decoder-classes", type=int, default=1)
    ap.add_argument("--dfe-width", type=int, default=64)
    ap.add_argument("--confidence", type=float, default=0.95, help="pseudo-label confidence threshold")
    ap.add_argument("--unsup-decoder-weight", type=float, default=1.0,
                    help="weight of the mask decoder's consistency term (0: the coarse head's alone)")
    ap.add_argument("--lr-dfe", type=float, default=None, help="DFE's learning rate (default: the trainer's)")
    ap.add_argument("--decoder-agreement", choices=["on", "off"], default="on",
                    help="decoder consistency only where the teacher's coarse head agrees (SemiSupConfig.decoder_agreement)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (pool, validation and test cases)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=None,
                    help="training seeds; each (labeled, model) pair is trained once per seed and the table "
                         "reports the mean and the spread over seeds (default: --seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--name", default="ssl_cpu", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="train nothing: combine the runs of results files made with the same settings (e.g. "
                         "by processes that ran different seeds or models side by side) into --name; "
                         "FILE:sup,nodfe takes only those models' runs from FILE")
    ap.add_argument("--embed-only", action="store_true", help="compute and save the embeddings, train nothing")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: check that everything runs")
    ap.add_argument("--reuse", default=None, metavar="RESULTS_JSON",
                    help="take the rows of --reuse-configs from an earlier results file with the same settings")
    ap.add_argument("--reuse-configs", nargs="*", default=["sup"], choices=list(CONFIGS))
    ap.add_argument("--reevaluate", default=None, metavar="RESULTS_JSON",
                    help="train nothing: score the models of an earlier run (WORKDIR/nN/CONFIG/model.ssstask) on "
                         "--test-cases test phantoms (the first ones are the earlier test cases) and rewrite the table")
    args = ap.parse_args(argv)
    if args.smoke:
        args.pool_cases, args.labeled, args.val_cases, args.test_cases = 4, [1], 1, 1
        args.slices, args.iterations, args.name = 4, 6, "ssl_cpu_smoke"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        return _merge(args)

    import torch

    torch.set_num_threads(args.threads)
    from sss_lib.backbones.registry import build_backbone
    from sss_lib.embedding_cache import EmbeddingStore
    from sss_lib.runs.progress import ProgressReporter
    from sss_lib.trainer.config import TrainConfig
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import run_training

    defaults = SemiSupConfig(train=TrainConfig(Path("."), Path("unused.ssstask")), run_dir=Path("."))
    args.lr_dfe = args.lr_dfe if args.lr_dfe is not None else defaults.dfe_lr  # a number in the results file
    args.dfe_zero_init_gain = defaults.dfe_zero_init_gain  # the "full" model's
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sss_bench_ssl_"))
    t_all = time.perf_counter()
    pool, test = make_pool(work, args.pool_cases, args.val_cases, args.test_cases, args.slices, args.size, args.seed)
    backbone = build_backbone("litemedsam", device="cpu")
    pristine = {k: {n: t.clone() for n, t in v.items()} for k, v in
                {"pe": backbone.net.prompt_encoder.state_dict(), "md": backbone.net.mask_decoder.state_dict()}.items()}
    settings = (backbone.stop_rule, backbone.carry_points)
    n_volumes = args.pool_cases + args.val_cases + args.test_cases
    store = EmbeddingStore(max_volumes=n_volumes + 2)
    strong_cache: dict = {}
    cache_file = work / "embeddings.pt"
    saved = _load_embeddings(cache_file, store, strong_cache)
    results: dict = {"settings": {k: v for k, v in vars(args).items()}, "runs": []}
    earlier = _reusable(args)
    if args.reevaluate:
        return _reevaluate(args, work, test, backbone, store, strong_cache, cache_file, saved, t_all)
    t0 = time.perf_counter()
    precompute(pool, test, args, backbone, store, strong_cache)
    saved = _save_embeddings(cache_file, store, strong_cache, saved)
    results["embed_seconds"] = time.perf_counter() - t0
    print(f"embeddings ready in {results['embed_seconds']:.0f} s", flush=True)
    if args.embed_only:
        return 0

    seeds = args.train_seeds or [args.seed]
    for n_lab, train_seed, key in [(n, t, k) for n in args.labeled for t in seeds for k in args.configs]:
        lab, unl, val_ids = split_folders(work, pool, n_lab, args.pool_cases, args.val_cases)
        title, overrides = CONFIGS[key]
        if (n_lab, key) in earlier and train_seed == args.seed:
            results["runs"].append(earlier[(n_lab, key)])
            print(f"{n_lab} labeled, {title}: reused from {args.reuse}", flush=True)
            continue
        backbone.net.prompt_encoder.load_state_dict(pristine["pe"])
        backbone.net.mask_decoder.load_state_dict(pristine["md"])
        backbone.stop_rule, backbone.carry_points = settings
        run_dir = work / f"n{n_lab}" / (key if train_seed == args.seed else f"{key}_seed{train_seed}")
        train = TrainConfig(lab, run_dir / "model.ssstask", backbone="litemedsam", device="cpu",
                            val_cases=tuple(val_ids), iterations=args.iterations, seed=train_seed,
                            head_batch=args.labeled_batch, decoder_batch=args.decoder_batch,
                            val_every=args.val_every or max(1, args.iterations // 2))
        ssl_settings = dict(unlabeled_batch=args.unlabeled_batch, strong_views=args.strong_views,
                            strong_view_seed=args.seed, dfe_width=args.dfe_width,
                            unsup_decoder_classes=args.unsup_decoder_classes, confidence=args.confidence,
                            unsup_decoder_weight=args.unsup_decoder_weight,
                            decoder_agreement=args.decoder_agreement == "on", lr_dfe=args.lr_dfe,
                            checkpoint_every=max(1, args.iterations))
        cfg = SemiSupConfig(train=train, run_dir=run_dir, unlabeled=unl, **{**ssl_settings, **overrides})
        reporter = ProgressReporter(cfg.total_steps, json_lines=False, console_view=False,
                                    history=run_dir / "history.jsonl")
        t0 = time.perf_counter()
        outcome = run_training(cfg, backbone=backbone, reporter=reporter, store=store, strong_cache=strong_cache,
                               console=lambda text: print(f"  {text}", flush=True))
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = evaluate(outcome.model_path, test, backbone, store)
        eval_s = time.perf_counter() - t0
        saved = _save_embeddings(cache_file, store, strong_cache, saved)
        row = {"labeled": n_lab, "config": key, "title": title, "train_seed": train_seed, "train_seconds": train_s,
               "eval_seconds": eval_s, "timings": outcome.timings, "best_step": outcome.best_step, "best_val_dice": outcome.best_dice,
               "last_losses": outcome.last, "unlabeled_cases": len(outcome.unlabeled_cases),
               "seconds_per_step": outcome.timings["train"] / max(1, outcome.step), **scores}
        results["runs"].append(row)
        print(f"{n_lab} labeled, {title}: test Dice {scores['mean_dice']:.4f}, HD95 {scores['mean_hd95_mm']} mm "
              f"(train {train_s:.0f} s, {row['seconds_per_step']:.2f} s/step; eval {eval_s:.0f} s; "
              f"kept step {outcome.best_step}, val Dice {outcome.best_dice})", flush=True)
        _write(results, args, t_all)
    table = _write(results, args, t_all)
    print()
    print(table)
    return 0


def _merge(args: argparse.Namespace) -> int:
    """One table from several results files. ``FILE:CONFIG,CONFIG`` takes only those models' runs
    from FILE; a part that holds supervised-only runs alone need not agree on the settings that only
    semi-supervised training reads (:data:`_SSL_ONLY`)."""
    parts = []
    for spec in args.merge:
        path, _, only = spec.partition(":")
        data = json.loads(Path(path).read_text())
        keep = set(only.split(",")) if only else None
        runs = [r for r in data["runs"] if keep is None or r["config"] in keep]
        parts.append((spec, data, runs))
    # The reference settings: those of a file with DFE runs if any, else with consistency runs.
    ranked = sorted(parts, key=lambda part: (not any(r["config"].startswith("full") for r in part[2]),
                                             all(r["config"] == "sup" for r in part[2])))
    first_spec, first = ranked[0][0], ranked[0][1]["settings"]
    for spec, data, runs in parts:
        supervised_only = all(r["config"] == "sup" for r in runs)
        without_dfe = all(r["config"] in ("sup", "nodfe") for r in runs)
        keys = [k for k in _MATTERS if k != "threads" and not (supervised_only and k in _SSL_ONLY)
                and not (without_dfe and k in _DFE_ONLY)]
        differ = [k for k in keys if _setting(data["settings"], k) != _setting(first, k)]
        if differ:
            raise SystemExit(f"{spec}: settings {differ} differ from {first_spec}'s; cannot merge")
    runs = [r for _, _, rs in parts for r in rs]
    seen = [(r["labeled"], r["config"], r.get("train_seed", first["seed"])) for r in runs]
    twice = sorted({k for k in seen if seen.count(k) > 1})
    if twice:
        raise SystemExit(f"(labeled, model, seed) {twice} come from more than one file; pick with FILE:CONFIGS")
    seeds = sorted({r.get("train_seed", first["seed"]) for r in runs})
    merged = argparse.Namespace(**{**first, "name": args.name, "train_seeds": seeds,
                                   "labeled": sorted({r["labeled"] for r in runs})})
    results = {"settings": vars(merged), "merged_from": list(args.merge),
               "embed_seconds": max(d.get("embed_seconds", 0.0) for _, d, _ in parts), "runs": runs}
    print(_write(results, merged, time.perf_counter()))
    return 0


def _reevaluate(args: argparse.Namespace, work: Path, test: Path, backbone, store, strong_cache: dict,  # noqa: ANN001
                cache_file: Path, saved: int, t_all: float) -> int:
    old = json.loads(Path(args.reevaluate).read_text())
    pristine = (backbone.stop_rule, backbone.carry_points)
    results = {**old, "runs": [], "reevaluated": {"from": str(args.reevaluate), "test_cases": args.test_cases,
                                                  "earlier_test_cases": old["settings"]["test_cases"]}}
    args.iterations = old["settings"]["iterations"]
    for row in old["runs"]:
        model = work / f"n{row['labeled']}" / row["config"] / "model.ssstask"
        backbone.stop_rule, backbone.carry_points = pristine
        t0 = time.perf_counter()
        scores = evaluate(model, test, backbone, store)
        saved = _save_embeddings(cache_file, store, strong_cache, saved)
        results["runs"].append({**row, **scores, "eval_seconds": time.perf_counter() - t0, "model": str(model)})
        print(f"{row['labeled']} labeled, {row['title']}: test Dice {scores['mean_dice']:.4f} on {args.test_cases} "
              f"cases (was {row['mean_dice']:.4f} on {old['settings']['test_cases']})", flush=True)
        results["settings"] = {**old["settings"], "test_cases": args.test_cases}
        _write(results, argparse.Namespace(**{**vars(args), **results["settings"], "name": args.name}), t_all)
    print(_write(results, argparse.Namespace(**{**vars(args), **results["settings"], "name": args.name}), t_all))
    return 0


_MATTERS = ("pool_cases", "val_cases", "test_cases", "slices", "size", "iterations", "val_every", "labeled_batch",
            "decoder_batch", "unlabeled_batch", "strong_views", "unsup_decoder_classes", "dfe_width", "seed", "threads",
            "confidence", "unsup_decoder_weight", "decoder_agreement", "lr_dfe", "dfe_zero_init_gain")
#: Settings that supervised-only training does not read.
_SSL_ONLY = ("unlabeled_batch", "strong_views", "unsup_decoder_classes", "dfe_width", "confidence",
             "unsup_decoder_weight", "decoder_agreement", "lr_dfe", "dfe_zero_init_gain")
#: Settings that only the models with DFE read.
_DFE_ONLY = ("dfe_width", "lr_dfe", "dfe_zero_init_gain")
#: Settings added after some results were written: their value in those results.
_DEFAULTS = {"confidence": 0.95, "unsup_decoder_weight": 1.0, "decoder_agreement": "off", "lr_dfe": None,
             "dfe_zero_init_gain": False}


def _setting(settings: dict, key: str):  # noqa: ANN202
    return settings.get(key, _DEFAULTS.get(key))


def _reusable(args: argparse.Namespace) -> dict:
    """Rows of ``--reuse-configs`` from ``--reuse`` whose run settings equal this one's."""
    if not args.reuse:
        return {}
    old = json.loads(Path(args.reuse).read_text())
    same = all(_setting(old["settings"], k) == getattr(args, k) for k in _MATTERS)
    if not same:
        raise SystemExit(f"{args.reuse}: its settings differ; cannot reuse its rows")
    return {(r["labeled"], r["config"]): {**r, "reused_from": str(args.reuse)} for r in old["runs"]
            if r["config"] in args.reuse_configs}


def _embedding_count(store, strong_cache: dict) -> int:  # noqa: ANN001
    return store.computed + len(strong_cache)


def _load_embeddings(path: Path, store, strong_cache: dict) -> int:  # noqa: ANN001
    """Reload the frozen encoder's embeddings of an earlier run in this work folder (our own file)."""
    import torch

    if not path.is_file():
        return 0
    data = torch.load(path, weights_only=False)
    for key, slices in data["store"].items():
        for s, emb in slices.items():
            store.get_or_compute(key, s, lambda e=emb: e)
    strong_cache.update(data["strong"])
    print(f"reloaded {sum(len(v) for v in data['store'].values())} embeddings and {len(data['strong'])} strong views "
          f"from {path}", flush=True)
    return _embedding_count(store, strong_cache)


def _save_embeddings(path: Path, store, strong_cache: dict, saved: int) -> int:  # noqa: ANN001
    import torch

    count = _embedding_count(store, strong_cache)
    if count == saved:
        return saved
    entries = {key: dict(store._entries[key]) for key in list(store._entries)}  # noqa: SLF001 - benchmark cache
    tmp = path.with_suffix(".tmp")
    torch.save({"store": entries, "strong": strong_cache}, tmp)
    tmp.replace(path)
    return count


def _write(results: dict, args: argparse.Namespace, t_all: float) -> str:
    groups = _groups(results["runs"])
    rows = []
    order = list(CONFIGS)
    rank = lambda key: order.index(key) if key in order else len(order)  # noqa: E731 - older files name others
    for (n_lab, key), runs in sorted(groups.items(), key=lambda item: (item[0][0], rank(item[0][1]))):
        dice = [r["mean_dice"] for r in runs]
        hds = [r["mean_hd95_mm"] for r in runs if r["mean_hd95_mm"] is not None]
        spread = f" ± {np.std(dice):.3f}" if len(dice) > 1 else ""
        extra = [round(float(np.mean([r.get(k, float("nan")) for r in runs])), 3)
                 for k in ("mean_dice_points", "mean_dice_coarse")]
        rows.append([n_lab, runs[0]["title"], f"{np.mean(dice):.3f}{spread}", *extra,
                     *[round(float(np.mean([r["dice_per_class"][n] for r in runs])), 3) for n in CLASS_NAMES.values()],
                     round(float(np.mean(hds)), 2) if hds else "n/a", sum(r["hd95_missing"] for r in runs),
                     len(runs), round(float(np.mean([r["seconds_per_step"] for r in runs])), 2)])
    headers = ["labeled", "model", "mean Dice", "with points", "coarse head", *CLASS_NAMES.values(), "HD95 mm", "HD95 missing", "seeds", "s/step"]
    table = markdown_table(headers, rows)
    payload = {**results, "table_markdown": table, "total_seconds": time.perf_counter() - t_all,
               "summary": _summary(results["runs"])}
    write_results(args.name, _finite(json.loads(json.dumps(payload, default=_json_default))))
    md = Path(__file__).resolve().parent / "results" / f"{args.name}.md"
    md.write_text(f"# {args.name}\n\n{_describe(args)}\n\n{table}\n")
    return table


def _groups(runs: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """(labeled, config) -> its runs (one per training seed), in the order first seen."""
    out: dict[tuple[int, str], list[dict]] = {}
    for r in runs:
        out.setdefault((r["labeled"], r["config"]), []).append(r)
    return out


def _summary(runs: list[dict]) -> dict:
    """Per labeled count: the mean test Dice of each model over seeds, and the differences in Dice
    points (also per seed, where both models ran with the same seed)."""
    out: dict = {}
    groups = _groups(runs)
    for n in sorted({n for n, _ in groups}):
        by = {k: [r for r in rs] for (m, k), rs in groups.items() if m == n}
        entry: dict = {k: float(np.mean([r["mean_dice"] for r in rs])) for k, rs in by.items()}
        for a, b in (("full", "sup"), ("full", "nodfe"), ("nodfe", "sup")):
            if a in by and b in by:
                entry[f"{a}_minus_{b}_points"] = 100 * (entry[a] - entry[b])
                seeds_b = {r.get("train_seed"): r["mean_dice"] for r in by[b]}
                entry[f"{a}_minus_{b}_points_per_seed"] = {
                    str(r.get("train_seed")): 100 * (r["mean_dice"] - seeds_b[r.get("train_seed")])
                    for r in by[a] if r.get("train_seed") in seeds_b}
        out[str(n)] = entry
    return out


def _describe(args: argparse.Namespace) -> str:
    return (f"Synthetic cardiac phantoms ({args.size}x{args.size} px, {args.slices} slices); training pool "
            f"{args.pool_cases} cases (labeled {args.labeled}, the rest unlabeled), {args.val_cases} validation, "
            f"{args.test_cases} test cases; LiteMedSAM on the CPU ({args.threads} thread), {args.iterations} steps "
            f"(validation every {args.val_every or max(1, args.iterations // 2)}), "
            f"labeled batch {args.labeled_batch}, decoder batch {args.decoder_batch}, unlabeled batch "
            f"{args.unlabeled_batch}, {args.strong_views} cached strong views per slice, DFE width {args.dfe_width}, "
            f"decoder consistency on {args.unsup_decoder_classes} class(es) per slice; pseudo-label confidence "
            f"{getattr(args, 'confidence', 0.95)}, decoder consistency weight "
            f"{getattr(args, 'unsup_decoder_weight', 1.0)}, decoder consistency only where the coarse head agrees: "
            f"{getattr(args, 'decoder_agreement', 'off')}, DFE learning rate "
            f"{getattr(args, 'lr_dfe', None) or 'as the coarse head'}, DFE gain from 0 (full SSS): "
            f"{'on' if getattr(args, 'dfe_zero_init_gain', False) else 'off'}; phantom seed {args.seed}, "
            f"training seed(s) {', '.join(map(str, getattr(args, 'train_seeds', None) or [args.seed]))}. "
            "Mean Dice: Auto-segment as shipped (box prompts for LiteMedSAM), mean over test cases and classes, "
            "then over training seeds (± standard deviation over seeds); 'with points': the same with PCSW's "
            "points in the prompts; 'coarse head': the coarse head's argmax alone. Per-class Dice and HD95 are "
            "the shipped pipeline's.")


def _finite(value):  # noqa: ANN001, ANN202 - JSON has no NaN: write null
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value):  # noqa: ANN001, ANN202
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
