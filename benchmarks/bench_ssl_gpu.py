"""GPU check of semi-supervised training: a short SSL run, bf16 autocast, SAM-2.1 tiny at random init.

Self-contained (no checkpoint, no download): writes seeded cardiac phantoms, trains for a few dozen
steps (supervised warm-up, then the full SSL step: EMA teacher -> PCSW prompts -> pseudo-labels,
two cached strong views, CutMix, DFE, masked consistency), and reports the embedding rate,
steps per second of each phase, the peak GPU memory and whether every loss stayed finite. Writes
``benchmarks/results/ssl_cuda.json``. About a minute on an H100 (`scripts/gpu_check.sh ssl`).

    python benchmarks/bench_ssl_gpu.py [--image-size 1024] [--iterations 40]
    python benchmarks/bench_ssl_gpu.py --all-parts --name ssl_cuda_all_parts
    python benchmarks/bench_ssl_gpu.py --supervised --memory-path --encoder-blocks 2 --encoder-lora-rank 4 \
        --name ssl_cuda_supervised_encoder

``--all-parts`` turns on every spec part semi-supervised training takes (SAM-2's memory path, weak
views of labeled slices, DFE to the mask decoder); the encoder's last blocks train in supervised
runs only. ``scripts/gpu_check.sh ssl`` runs all three.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import markdown_table, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--labeled-batch", type=int, default=8)
    ap.add_argument("--decoder-batch", type=int, default=4)
    ap.add_argument("--unlabeled-batch", type=int, default=4)
    ap.add_argument("--dfe-width", type=int, default=None, help="DFE width (default: 256, the paper's)")
    ap.add_argument("--cases", type=int, default=6, help="unlabeled phantoms (3 labeled are added)")
    ap.add_argument("--name", default="ssl_cuda")
    parts = ap.add_argument_group("the spec parts behind switches (issue 13), all off by default")
    parts.add_argument("--memory-path", action="store_true",
                       help="pseudo-labels from SAM-2's memory propagation, decoder on memory-conditioned features")
    parts.add_argument("--weak-views", type=int, default=0, help="weak views per labeled case")
    parts.add_argument("--encoder-blocks", type=int, default=0, help="image encoder's last N blocks trainable")
    parts.add_argument("--encoder-lora-rank", type=int, default=0, help="LoRA rank on those blocks (0: the blocks)")
    parts.add_argument("--dfe-to-decoder", action="store_true", help="DFE features reach the mask decoder")
    parts.add_argument("--all-parts", action="store_true",
                       help="every part semi-supervised training takes: memory path, 2 weak views, DFE to decoder")
    ap.add_argument("--supervised", action="store_true",
                    help="no unlabeled cases, no consistency (the encoder's blocks train only this way)")
    args = ap.parse_args(argv)
    if args.all_parts:
        args.memory_path, args.dfe_to_decoder = True, True
        args.weak_views = args.weak_views or 2
    if args.encoder_blocks and not args.supervised:
        ap.error("--encoder-blocks trains in supervised runs only: add --supervised")
    try:
        import scipy  # noqa: F401 - PCSW and the phantoms need it
    except ImportError:
        print("bench_ssl_gpu needs scipy (PCSW, phantoms); add its wheel to .whl/", file=sys.stderr)
        return 1

    import torch

    from sss_lib.backbones.sam2_backbone import build_sam2_backbone
    from sss_lib.phantoms import make_phantom_dataset
    from sss_lib.runs.history import read_history
    from sss_lib.runs.progress import ProgressReporter
    from sss_lib.trainer.config import TrainConfig
    from sss_lib.trainer.semisup_config import SemiSupConfig
    from sss_lib.trainer.semisup_loop import run_training

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="sss_ssl_gpu_"))
    phantom = dict(n_slices=8, size=(128, 128), spacing=(1.5, 1.5, 8.0))
    lab = make_phantom_dataset(work / "lab", 3, seed=11, **phantom)
    unl = make_phantom_dataset(work / "unl", args.cases, seed=12, layout="plain", labeled=False, **phantom)

    t0 = time.perf_counter()
    backbone = build_sam2_backbone(args.backbone, image_size=args.image_size, random_init=True, device=args.device)
    build_s = time.perf_counter() - t0
    train = TrainConfig(lab, work / "run" / "model.ssstask", backbone=args.backbone, device=args.device,
                        image_size=args.image_size, iterations=args.iterations, seed=0,
                        head_batch=args.labeled_batch, decoder_batch=args.decoder_batch, val_cases=("case_002",),
                        val_every=args.iterations, weak_views=args.weak_views, encoder_blocks=args.encoder_blocks,
                        encoder_lora_rank=args.encoder_lora_rank)
    cfg = SemiSupConfig(train=train, run_dir=work / "run", unlabeled=None if args.supervised else unl,
                        consistency=not args.supervised, warmup_iterations=args.warmup,
                        rampup_iterations=args.warmup, warmup_until_plateau=False, unlabeled_batch=args.unlabeled_batch, dfe_width=args.dfe_width,
                        checkpoint_every=args.iterations, memory_path=args.memory_path,
                        dfe_to_decoder=args.dfe_to_decoder)
    history = work / "run" / "history.jsonl"
    reporter = ProgressReporter(cfg.total_steps, json_lines=False, console_view=True, history=history)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    outcome = run_training(cfg, backbone=backbone, reporter=reporter, console=lambda t: print(t, flush=True))
    total_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None

    steps = [r for r in read_history(history) if r.event == "step"]
    finite = all(v is not None and math.isfinite(v) for r in steps for k, v in r.losses.items() if k != "unsup") and \
        (args.supervised or all(r.losses.get("unsup") is not None and math.isfinite(r.losses["unsup"])
                                for r in steps if r.step > args.warmup))
    times = {r.step: r.elapsed_s for r in steps}

    def rate(first: int, last: int) -> float | None:
        if first not in times or last not in times or last <= first:
            return None
        return (last - first) / (times[last] - times[first])

    sup_rate = rate(2, args.warmup)
    ssl_rate = rate(args.warmup + 2, args.iterations)
    embedded = 3 * 8 * (1 + args.weak_views) + (0 if args.supervised else args.cases * 8 * (1 + cfg.strong_views))
    switches = [name for name, on in (("supervised only", args.supervised), ("memory path", args.memory_path), (f"{args.weak_views} weak views", args.weak_views),
                                      (f"encoder {args.encoder_blocks} blocks" + (f" LoRA {args.encoder_lora_rank}" if args.encoder_lora_rank else ""),
                                       args.encoder_blocks),
                                      ("DFE to decoder", args.dfe_to_decoder)) if on]
    result = {
        "settings": vars(args),
        "switches": switches,
        "device": str(backbone.device),
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "autocast": "bf16" if args.device.startswith("cuda") else "none",
        "build_seconds": build_s,
        "embed_seconds": outcome.timings["embed"],
        "embeddings": embedded,
        "embeddings_per_second": embedded / outcome.timings["embed"] if outcome.timings["embed"] else None,
        "supervised_steps_per_second": sup_rate,
        "ssl_steps_per_second": ssl_rate,
        "validate_seconds": outcome.timings["validate"],
        "total_seconds": total_s,
        "peak_gpu_memory_gib": peak,
        "losses_finite": finite,
        "last_losses": {k: (v if isinstance(v, float) and math.isfinite(v) else None) for k, v in outcome.last.items()},
        "status": outcome.status,
    }
    rows = [[args.backbone, args.image_size, ", ".join(switches) or "defaults", f"{result['embeddings_per_second'] or 0:.1f}",
             f"{sup_rate or 0:.2f}", f"{ssl_rate or 0:.2f}", f"{peak or 0:.2f}", finite]]
    table = markdown_table(["backbone", "image size", "switches", "embeddings/s", "supervised it/s", "SSL it/s",
                            "peak GiB", "losses finite"], rows)
    result["table_markdown"] = table
    path = write_results(args.name, result)
    print(table)
    print(f"wrote {path}")
    return 0 if finite and outcome.status == "done" else 1


if __name__ == "__main__":
    raise SystemExit(main())
