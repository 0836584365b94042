"""A stand-in for ``python -m sss_lib train`` in the JobManager's unit tests: the same run contract
(progress JSON lines on stdout, the stop file through the real StopRequest, checkpoints/last.pt,
model.ssstask, --resume, exit codes) without a network, so a job takes a fraction of a second.

Environment: FAKE_STEP_S (seconds per step, default 0.05), FAKE_FAIL_AT (step at which it reports an
error and exits 2). Its "start" message records the options it got and CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sss_lib.runs.layout import RunPaths
from sss_lib.runs.progress import ProgressReporter
from sss_lib.runs.stop import StopRequest


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labeled", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--unlabeled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    args, _ = parser.parse_known_args()
    paths = RunPaths.of(args.run_dir).create()
    step = json.loads(paths.last_checkpoint.read_text())["step"] if args.resume else 0
    if not args.resume and paths.last_checkpoint.exists():
        print("already holds a run", file=sys.stderr)
        return 2
    reporter = ProgressReporter(args.iterations, stream=sys.stdout, console=sys.stderr, history=paths.history)
    fail_at = int(os.environ.get("FAKE_FAIL_AT", "0"))
    info = {"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "resumed_from": step}
    with StopRequest(paths.root) as stop:
        reporter.start(step, message=json.dumps(info))
        while step < args.iterations:
            time.sleep(float(os.environ.get("FAKE_STEP_S", "0.05")))
            step += 1
            if step == fail_at:
                reporter.error("fake failure: the labeled data could not be read", step)
                return 2
            reporter.step(step, {"total": 1.0 / step})
            if step % args.checkpoint_every == 0 or stop.requested:
                paths.last_checkpoint.write_text(json.dumps({"step": step}))
                reporter.checkpoint(step, paths.last_checkpoint)
            if stop.requested:
                (paths.root / "model.ssstask").write_bytes(b"model at %d" % step)
                reporter.stop(step)
                return 0
    paths.last_checkpoint.write_text(json.dumps({"step": step}))
    paths.curves.write_bytes(b"\x89PNG fake")
    (paths.root / "model.ssstask").write_bytes(b"model at %d" % step)
    reporter.done(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
