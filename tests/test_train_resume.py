"""A run a user can trust, through the command line: kill -9 during training then --resume gives
bit-identical weights to an uninterrupted run; a stop file ends the run with a checkpoint and exit
code 0; stdout holds only JSON progress lines; bad input gives an error event and exit code 2.

Each run is a subprocess (SAM-2.1 tiny at random init, 64 px, tiny phantoms, one CPU thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sss_lib.phantoms import make_phantom_dataset
from sss_lib.runs.progress import parse_progress_line

TRAIN = [sys.executable, "-m", "sss_lib", "train"]
PHANTOM = dict(n_slices=4, size=(48, 48), spacing=(4.0, 4.0, 8.0))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume_data")
    lab = make_phantom_dataset(root / "lab", 3, seed=7, **PHANTOM)
    unl = make_phantom_dataset(root / "unl", 1, seed=8, layout="plain", labeled=False, **PHANTOM)
    return lab, unl


def args(data: tuple[Path, Path], run: Path, iterations: int = 8) -> list[str]:
    lab, unl = data
    return ["--labeled", str(lab), "--unlabeled", str(unl), "--run-dir", str(run), "--backbone", "sam2.1_hiera_tiny",
            "--random-init", "--image-size", "64", "--device", "cpu", "--threads", "1", "--seed", "3",
            "--iterations", str(iterations), "--warmup-iterations", "3", "--rampup-iterations", "2",
            "--labeled-batch", "2", "--decoder-batch", "2", "--unlabeled-batch", "2", "--checkpoint-every", "2",
            "--val-every", "4", "--val-cases", "case_002"]


def records(stdout: str) -> list:
    """Every stdout line must be a progress record."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    parsed = [parse_progress_line(line) for line in lines]
    assert all(r is not None for r in parsed), [line for line, r in zip(lines, parsed) if r is None][:3]
    return parsed


def test_kill_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    whole = subprocess.run([*TRAIN, *args(data, tmp_path / "whole")], capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    events = records(whole.stdout)
    assert events[0].event == "start" and events[-1].event == "done"
    assert [r.step for r in events if r.event == "step"] == list(range(1, 9))

    run = tmp_path / "killed"
    proc = subprocess.Popen([*TRAIN, *args(data, run)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV)
    seen = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            r = parse_progress_line(line)
            if r is not None and r.event == "checkpoint" and r.step >= 4:  # after the warm-up: EMA and SSL matter
                seen = r.step
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert seen is not None and proc.returncode == -signal.SIGKILL
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] < 8

    resumed = subprocess.run([*TRAIN, *args(data, run), "--resume"], capture_output=True, text=True, env=ENV,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    events = records(resumed.stdout)
    assert events[0].event == "start" and events[0].step >= seen and events[-1].event == "done"

    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key]), key
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 8
    # The warm-up ended at its longest (step 4 of 8, validated there) before the kill; the resumed run knew.
    assert a["extra"]["warmup"]["end"] == b["extra"]["warmup"]["end"] == 4
    # The kept step's coarse-head Dice (what the task model's coarse classes are chosen from) too.
    assert a["extra"]["best_coarse_dice"] and a["extra"]["best_coarse_dice"] == b["extra"]["best_coarse_dice"]
    # The history holds each step once, across the kill.
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["event"] == "step"] == list(range(1, 9))
    for name in ("config.json", "curves.png", "model.ssstask", "checkpoints/best.pt"):
        assert (run / name).is_file(), name


def test_stop_file_ends_the_run_with_a_checkpoint(data, tmp_path):
    run = tmp_path / "stopped"
    proc = subprocess.Popen([*TRAIN, *args(data, run, iterations=500)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            r = parse_progress_line(line)
            if r is not None and r.event == "step" and r.step >= 2:
                (run / "STOP").write_text("")
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    events = records("".join(lines) + out)
    assert [r.event for r in events[-2:]] == ["checkpoint", "stop"]
    stopped = events[-1].step
    assert 2 <= stopped < 500 and events[-2].step == stopped
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped
    assert "resume to continue" in err
    assert (run / "model.ssstask").is_file()


def test_bad_input_gives_an_error_event_and_exit_code_2(data, tmp_path):
    missing = subprocess.run([*TRAIN, *args(data, tmp_path / "r1"), "--labeled", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert missing.returncode == 2
    (event,) = records(missing.stdout)
    assert event.event == "error" and "nowhere" in event.message
    assert "error:" in missing.stderr and "nowhere" in missing.stderr
