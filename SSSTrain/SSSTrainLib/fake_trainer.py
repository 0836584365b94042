"""A stand-in for ``python -m sss_lib train`` that follows the training run contract, for the
SSSTrain tests and self-test: the same arguments (parsed strictly, so a misspelt flag fails), JSON
progress lines on stdout through sss_lib's own ProgressReporter, history.jsonl, checkpoints, a
curves PNG, model.ssstask, the stop file and SIGTERM (sss_lib's StopRequest), --resume from the
last checkpoint, exit code 2 on bad input. It reads the labeled data with sss_lib's dataset
readers, so it proves the panel's scene export is a dataset the real trainer can open.

It trains nothing: a step sleeps ``$SSS_FAKE_STEP_S`` seconds (default 0.02); a validation comes
every ``$SSS_FAKE_VAL_EVERY`` steps (default 5); ``$SSS_FAKE_FAIL_AT`` makes that step crash.

Usage: python fake_trainer.py train --labeled DATA --run-dir RUN [...]
This file is a script for a child process (Python 3.10+, sss_lib importable); SSSTrainLib never
imports it.
"""

import argparse
import json
import os
import struct
import sys
import time
import zlib


def parse(argv):
    parser = argparse.ArgumentParser(prog="fake_trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--labeled", required=True)
    t.add_argument("--run-dir", required=True)
    t.add_argument("--unlabeled")
    t.add_argument("--out")
    t.add_argument("--backbone", default="sam2.1_hiera_tiny")
    t.add_argument("--device", default="auto")
    t.add_argument("--iterations", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--warmup-iterations", type=int, default=10)
    t.add_argument("--warmup-until-plateau", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--lambda-u", type=float, default=1.0)
    t.add_argument("--confidence", type=float, default=0.95)
    t.add_argument("--ema-decay", type=float, default=0.99)
    t.add_argument("--no-dfe", action="store_true")
    t.add_argument("--no-pcsw", action="store_true")
    t.add_argument("--no-consistency", action="store_true")
    t.add_argument("--class-guard", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--adaptive-thresholds", action="store_true")
    t.add_argument("--dfe-to-decoder", action="store_true")
    t.add_argument("--memory-path", action="store_true")
    t.add_argument("--weak-views", type=int, default=0)
    t.add_argument("--encoder-blocks", type=int, default=0)
    t.add_argument("--encoder-lora-rank", type=int, default=0)
    t.add_argument("--on-bad-case", choices=["skip", "stop"], default="skip")
    t.add_argument("--val-cases", nargs="+")
    return parser.parse_args(argv)


def write_png(path, step):
    """A small solid-colour PNG (its colour changes with ``step``), written atomically."""
    width, height = 32, 16
    colour = bytes([(40 * step) % 256, 120, 200])
    raw = b"".join(b"\x00" + colour * width for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def write_json(path, data):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv):
    args = parse(argv)
    from sss_lib.datasets import open_dataset
    from sss_lib.errors import SSSError
    from sss_lib.runs import ProgressReporter, RunPaths, StopRequest

    paths = RunPaths.of(args.run_dir).create()
    reporter = ProgressReporter(args.iterations, history=paths.history)
    try:
        cases = open_dataset(args.labeled)
        labeled = [c.case_id for c in cases.labeled]
        if not labeled:
            raise SSSError(f"{args.labeled}: no labeled case")
        unlabeled = [c.case_id for c in open_dataset(args.unlabeled, layout="plain").cases] if args.unlabeled else []
    except SSSError as e:
        reporter.error(str(e))
        return 2
    start = 0
    if args.resume:
        if not paths.last_checkpoint.is_file():
            reporter.error(f"{paths.last_checkpoint} not found: nothing to resume")
            return 2
        start = json.loads(paths.last_checkpoint.read_text())["step"]
    else:
        write_json(paths.config, {"args": vars(args), "labeled": labeled, "unlabeled": unlabeled,
                                  "classes": {str(k): v for k, v in cases.class_names.items()}})
    delay = float(os.environ.get("SSS_FAKE_STEP_S", "0.02"))
    val_every = max(1, int(os.environ.get("SSS_FAKE_VAL_EVERY", "5")))
    fail_at = int(os.environ.get("SSS_FAKE_FAIL_AT", "0"))
    names = list(cases.class_names.values()) or ["class 1"]

    def save(step):
        write_json(paths.last_checkpoint, {"step": step})
        reporter.checkpoint(step, paths.last_checkpoint)

    with StopRequest(paths.root) as stop:
        reporter.start(step=start, message="resuming" if start else "")
        for step in range(start + 1, args.iterations + 1):
            if stop.requested:
                save(step - 1)
                reporter.stop(step - 1)
                return 0
            time.sleep(delay)
            if step == fail_at:
                reporter.error(f"simulated failure at step {step}", step=step)
                print(f"simulated failure at step {step}", file=sys.stderr)
                return 1
            reporter.step(step, {"total": 1.0 / step, "sup": 0.6 / step, "unsup": 0.4 / step}, lr=1e-4,
                          mask_ratio=min(1.0, step / args.iterations))
            if step % val_every == 0 or step == args.iterations:
                reporter.val(step, {n: min(1.0, 0.5 + step / (2.0 * args.iterations)) for n in names})
                write_png(paths.curves, step)
                write_json(paths.root / "model.ssstask", {"step": step, "classes": names})
                save(step)
    reporter.done(args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
