"""The ``train`` command (the training contract, /work/notes/train_contract.md):

    python -m sss_lib train --labeled DATA --run-dir RUN [--unlabeled DIR] [--out MODEL.ssstask] ...
    torchrun --nproc_per_node N -m sss_lib train ...

stdout carries only JSON progress lines (:mod:`sss_lib.runs.progress`); everything a person reads
goes to stderr. Exit codes: 0 done or stopped on request (resumable), 2 bad input (including a GPU
out of memory: the message says what to lower), 1 a bug, 130 a second Ctrl+C.

:func:`add_train_arguments` and :func:`run_train_command` are what ``sss_lib.cli`` wires up; this
module also runs on its own (``python -m sss_lib.trainer.run ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

OOM_ADVICE = ("the GPU ran out of memory. Lower --labeled-batch, --unlabeled-batch or --decoder-batch, use a "
              "smaller --image-size or --dfe-width, or a smaller backbone (e.g. sam2.1_hiera_tiny or litemedsam)")


def add_train_arguments(tr: argparse.ArgumentParser) -> None:
    """The ``train`` command's options (defaults: SSS_METHOD.md section 4 and the contract)."""
    from ..backbones.registry import BACKBONE_NAMES

    # Required for a run here (checked in run_train_command); with --server the service keeps the
    # run folder, and --job names an existing job instead of the data.
    tr.add_argument("--labeled", help="dataset folder with labeled cases (nnU-Net v2 raw, ACDC, plain); required "
                                      "(with --server: a local folder to upload, or server:PATH under the service's "
                                      "--data-root)")
    tr.add_argument("--run-dir", help="run folder: config, checkpoints, history, curves, model; required (not with "
                                      "--server)")
    tr.add_argument("--unlabeled", default=None,
                    help="folder of unlabeled volumes (or an nnU-Net folder: its imagesTs); enables semi-supervised "
                         "training")
    tr.add_argument("--out", default=None, help="also copy the final task model here (e.g. heart.ssstask)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --run-dir exactly (its config.json settings are used)")
    tr.add_argument("--backbone", default="litemedsam", choices=BACKBONE_NAMES,
                    help="backbone to fine-tune (default: litemedsam, which runs offline on a CPU)")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    tr.add_argument("--iterations", type=int, default=300, help="optimiser steps (default: 300)")
    tr.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    tr.add_argument("--warmup-iterations", type=int, default=None,
                    help="supervised-only steps first (default: 20%% of --iterations); with "
                         "--warmup-until-plateau the fewest")
    tr.add_argument("--warmup-until-plateau", action=argparse.BooleanOptionalAction, default=True,
                    help="semi-supervised: the warm-up goes on while validation Dice improves (up to "
                         "--max-warmup-fraction of the run), and consistency starts from the best validated "
                         "weights; needs validation cases (default: on)")
    tr.add_argument("--max-warmup-fraction", type=float, default=0.5,
                    help="the longest warm-up with --warmup-until-plateau, as a share of --iterations (default: 0.5)")
    tr.add_argument("--rampup-iterations", type=int, default=None,
                    help="steps over which lambda_u ramps up after the warm-up (default: 20%% of --iterations)")
    tr.add_argument("--lambda-u", type=float, default=1.0, help="weight of the unsupervised loss (default: 1)")
    tr.add_argument("--confidence", type=float, default=0.95,
                    help="pseudo-label pixels count from this teacher probability on (default: 0.95)")
    tr.add_argument("--untrusted-floor", type=float, default=None,
                    help="a pixel is not trusted where the teacher's coarse head gives an unprompted class this "
                         "probability (default: 1 - --confidence)")
    tr.add_argument("--ema-decay", type=float, default=0.99, help="EMA teacher decay (default: 0.99)")
    tr.add_argument("--no-dfe", action="store_true", help="ablation: no DFE on the strong views")
    tr.add_argument("--no-pcsw", action="store_true", help="ablation: the teacher prompts with coarse boxes only")
    tr.add_argument("--no-consistency", action="store_true", help="ablation: supervised only")
    tr.add_argument("--on-bad-case", default="stop", choices=["skip", "stop"],
                    help="an unreadable case is skipped with a warning, or stops the run (default: stop)")
    tr.add_argument("--val-cases", nargs="+", metavar="CASE", help="labeled case ids held out for validation")
    tr.add_argument("--val-fraction", type=float, default=0.2,
                    help="share of labeled cases held out when --val-cases is not given (default: 0.2)")
    tr.add_argument("--layout", default="auto", choices=["auto", "nnunet", "acdc", "plain"],
                    help="labeled dataset layout (default: detected)")
    tr.add_argument("--max-cases", type=int, default=None, help="use only the first N labeled cases")
    tr.add_argument("--checkpoint", default=None, help="SAM-2 checkpoint file instead of the cached one")
    tr.add_argument("--random-init", action="store_true", help="untrained SAM-2 weights (tests and GPU checks only)")
    tr.add_argument("--image-size", type=int, default=None, help="SAM-2 input size (default: 1024)")
    tr.add_argument("--modality", default="auto", choices=["auto", "CT", "MR", "other"],
                    help="intensity rule: CT window or MR percentiles (default: guessed per volume)")
    tr.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT window in HU")
    tr.add_argument("--slice-axis", default="auto", choices=["auto", "i", "j", "k"],
                    help="stack axis (default: the axis of largest spacing)")
    tr.add_argument("--labeled-batch", "--head-batch", dest="labeled_batch", type=int, default=8,
                    help="labeled slices per step for the coarse head (default: 8)")
    tr.add_argument("--decoder-batch", type=int, default=4, help="labeled prompts per step for the decoder (default: 4)")
    tr.add_argument("--unlabeled-batch", type=int, default=4, help="unlabeled slices per step (default: 4)")
    tr.add_argument("--lr-head", type=float, default=5e-3, help="coarse-head learning rate (default: 5e-3)")
    tr.add_argument("--lr-decoder", type=float, default=1e-4, help="decoder learning rate (default: 1e-4)")
    tr.add_argument("--lr-dfe", type=float, default=None, help="DFE learning rate (default: a tenth of --lr-head)")
    tr.add_argument("--head-only", action="store_true", help="train the coarse head only, keep the decoder")
    tr.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: 4 times)")
    tr.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps (default: 50)")
    tr.add_argument("--strong-views", type=int, default=2,
                    help="strong views cached per unlabeled slice (default: 2; each costs one embedding)")
    tr.add_argument("--strong-view-seed", type=int, default=None,
                    help="seed of the cached strong views (default: --seed)")
    tr.add_argument("--teacher-points", choices=["auto", "on", "off"], default="auto",
                    help="teacher prompts with PCSW's points (default auto: on for SAM-2, off for LiteMedSAM, "
                         "whose decoder was trained on boxes alone)")
    tr.add_argument("--no-decoder-agreement", action="store_true",
                    help="the decoder's consistency also on trusted pixels where the teacher's coarse head disagrees "
                         "with the pseudo-label (default: only where they agree)")
    tr.add_argument("--dfe-zero-init-gain", action=argparse.BooleanOptionalAction, default=True,
                    help="start DFE's enhancement at 0 through a learned gain (default: on; "
                         "--no-dfe-zero-init-gain: the formula as specified)")
    tr.add_argument("--cutmix-p", type=float, default=0.5, help="CutMix probability (default: 0.5)")
    tr.add_argument("--dfe-width", type=int, default=None, help="DFE common width (default: widest feature scale)")
    tr.add_argument("--unsup-head-weight", type=float, default=1.0,
                    help="weight of the coarse head's consistency in the unsupervised loss (default: 1)")
    tr.add_argument("--unsup-decoder-weight", type=float, default=1.0,
                    help="weight of the mask decoder's consistency in the unsupervised loss (default: 1)")
    tr.add_argument("--unsup-decoder-classes", type=int, default=None,
                    help="at most this many classes per unlabeled slice in the decoder's consistency (default: all)")
    tr.add_argument("--class-guard", action=argparse.BooleanOptionalAction, default=True,
                    help="drop a class from the unsupervised loss when its validation Dice falls below its "
                         "warm-up value by --guard-margin, and reset the teacher to the best weights (default: on)")
    tr.add_argument("--guard-margin", type=float, default=0.05, help="see --class-guard (default: 0.05 Dice)")
    tr.add_argument("--adaptive-thresholds", action="store_true",
                    help="class-wise adaptive confidence thresholds: --confidence scaled per class by the teacher's "
                         "confidence in that class, so a class it is rarely sure of is not erased (default: off)")
    tr.add_argument("--adaptive-floor", type=float, default=0.5,
                    help="lowest class threshold with --adaptive-thresholds (default: 0.5)")
    tr.add_argument("--dfe-to-decoder", action="store_true",
                    help="the mask decoder's consistency decodes the DFE-enhanced strong features "
                         "(default: DFE feeds the coarse head only)")
    tr.add_argument("--memory-path", action="store_true",
                    help="SAM-2 only: pseudo-labels from memory propagation and decoder consistency on "
                         "memory-conditioned features (default: key-slice decodes of every slice)")
    tr.add_argument("--weak-views", type=int, default=0,
                    help="weak views (random zoom/crop, flip, small rotation) of each labeled training case, each "
                         "embedded once and sampled with the originals (default: 0, off; each view costs one "
                         "embedding per labeled slice)")
    tr.add_argument("--encoder-blocks", type=int, default=0,
                    help="also train the image encoder's last N blocks, stored in the task model (supervised runs; "
                         "default: 0, encoder frozen)")
    tr.add_argument("--encoder-lora-rank", type=int, default=0,
                    help="with --encoder-blocks: train low-rank adapters of this rank instead of the blocks' weights "
                         "(default: 0, the weights)")
    tr.add_argument("--lr-encoder", type=float, default=1e-5,
                    help="learning rate of the encoder blocks or adapters (default: 1e-5)")
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def config_from_args(args: argparse.Namespace):  # noqa: ANN201 - SemiSupConfig, imported lazily
    """The :class:`~sss_lib.trainer.semisup_config.SemiSupConfig` the options describe."""
    from .config import TrainConfig
    from .semisup_config import SemiSupConfig

    run_dir = Path(args.run_dir)
    val_cases = tuple(v for part in args.val_cases for v in part.split(",") if v) if args.val_cases else None
    train = TrainConfig(
        labeled=Path(args.labeled), out=run_dir / "model.ssstask", layout=args.layout, val_cases=val_cases,
        val_fraction=args.val_fraction, max_cases=args.max_cases, backbone=args.backbone, checkpoint=args.checkpoint,
        device=args.device, image_size=args.image_size, modality=args.modality,
        window=tuple(args.window) if args.window else (-1000.0, 1000.0), slice_axis=args.slice_axis,
        iterations=args.iterations, seed=args.seed, head_batch=args.labeled_batch, decoder_batch=args.decoder_batch,
        lr_head=args.lr_head, lr_decoder=args.lr_decoder, train_decoder=not args.head_only, val_every=args.val_every,
        weak_views=args.weak_views, encoder_blocks=args.encoder_blocks, encoder_lora_rank=args.encoder_lora_rank,
        lr_encoder=args.lr_encoder,
    )
    return SemiSupConfig(
        train=train, run_dir=run_dir, copy_to=Path(args.out) if args.out else None,
        checkpoint_every=args.checkpoint_every, on_bad_case=args.on_bad_case, random_init=args.random_init,
        unlabeled=Path(args.unlabeled) if args.unlabeled else None, consistency=not args.no_consistency,
        use_dfe=not args.no_dfe, use_pcsw=not args.no_pcsw, warmup_iterations=args.warmup_iterations,
        warmup_until_plateau=args.warmup_until_plateau, max_warmup_fraction=args.max_warmup_fraction,
        rampup_iterations=args.rampup_iterations, lambda_u=args.lambda_u, confidence=args.confidence,
        untrusted_floor=args.untrusted_floor,
        ema_decay=args.ema_decay, unlabeled_batch=args.unlabeled_batch, strong_views=args.strong_views,
        strong_view_seed=args.strong_view_seed, cutmix_p=args.cutmix_p, dfe_width=args.dfe_width, dfe_zero_init_gain=args.dfe_zero_init_gain,
        teacher_points={"auto": None, "on": True, "off": False}[args.teacher_points],
        decoder_agreement=not args.no_decoder_agreement, lr_dfe=args.lr_dfe,
        unsup_decoder_classes=args.unsup_decoder_classes, unsup_head_weight=args.unsup_head_weight,
        unsup_decoder_weight=args.unsup_decoder_weight, class_guard=args.class_guard, guard_margin=args.guard_margin,
        adaptive_thresholds=args.adaptive_thresholds, adaptive_floor=args.adaptive_floor,
        dfe_to_decoder=args.dfe_to_decoder, memory_path=args.memory_path,
    )


def _resumed_config(args: argparse.Namespace):  # noqa: ANN202
    import dataclasses

    from ..runs.config import RunConfig
    from .semisup_config import SemiSupConfig

    stored = RunConfig.load(Path(args.run_dir))
    cfg = SemiSupConfig.from_run_config(stored, Path(args.run_dir) / "config.json")
    # The device may change between sessions (the numbers then differ from an uninterrupted run).
    cfg.train = dataclasses.replace(cfg.train, device=args.device)
    if args.out:
        cfg.copy_to = Path(args.out)
    return cfg


def run_train_command(args: argparse.Namespace) -> int:
    """Run ``train`` with parsed options; returns the exit code (see the module docstring).

    With ``args.server`` (``--server URL``) the run is a job on that SSS service
    (:mod:`sss_lib.service.remote_train`).
    """
    if getattr(args, "server", None):
        from ..service.remote_train import run_remote_train

        return run_remote_train(args)
    missing = [name for name, value in (("--labeled", args.labeled), ("--run-dir", args.run_dir)) if not value]
    if missing:
        print(f"error: the following arguments are required: {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    from ..errors import SSSError
    from ..runs.progress import ProgressReporter
    from ..runs.stop import StopRequest
    from .distributed import init_distributed, shutdown_distributed
    from .semisup_loop import run_training

    json_out = sys.stdout
    sys.stdout = sys.stderr  # whatever a library prints must not break the JSON-lines stream
    if args.threads:
        torch.set_num_threads(int(args.threads))
    dist = None
    reporter = ProgressReporter(max(1, int(args.iterations)), stream=json_out, console=sys.stderr)
    try:
        dist, device = init_distributed(args.device)
        args.device = device
        config = _resumed_config(args) if args.resume else config_from_args(args)
        from ..runs.layout import RunPaths

        main = dist.is_main
        reporter = ProgressReporter(config.total_steps, stream=json_out, console=sys.stderr, json_lines=main,
                                    console_view=main, history=RunPaths.of(config.run_dir).history if main else None)
        say = (lambda text: print(text, file=sys.stderr, flush=True)) if main else (lambda text: None)
        with StopRequest(config.run_dir, clear_stale=main) as stop:
            run_training(config, resume=args.resume, reporter=reporter, stop=stop, dist=dist, console=say)
        return 0
    except torch.cuda.OutOfMemoryError:
        reporter.error(OOM_ADVICE)
        return 2
    except SSSError as err:
        reporter.error(str(err))
        return 2
    except KeyboardInterrupt:
        reporter.error("interrupted twice: stopped without a checkpoint; resume from the last one")
        return 130
    except Exception as err:  # a bug: say so, with the traceback for the report
        traceback.print_exc(file=sys.stderr)
        reporter.error(f"internal error ({type(err).__name__}: {err}); please report it with the log above")
        return 1
    finally:
        sys.stdout = json_out
        if dist is not None:
            shutdown_distributed(dist)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sss_lib.trainer.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_train_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
