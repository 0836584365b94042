"""SSSTrain's process handling: a detached launch whose output goes to files, following those
files, stopping, killing a launcher's whole process tree, the run-state file, and the status texts.
Real child processes throughout; the trainer is a stand-in where the test needs one."""

import argparse
import json
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "SSSTrain") not in sys.path:
    sys.path.insert(0, str(REPO / "SSSTrain"))


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


# -- FileTail ------------------------------------------------------------------------------------------


def test_file_tail_returns_complete_lines_only(tmp_path):
    from SSSTrainLib.process import FileTail

    path = tmp_path / "out.log"
    tail = FileTail(str(path))
    assert tail.read_lines() == []  # no file yet
    with open(path, "ab") as f:
        f.write(b"one\ntw")
    assert tail.read_lines() == ["one"]
    with open(path, "ab") as f:
        f.write(b"o\r\nthr\xc3\xa9e\n")
    assert tail.read_lines() == ["two", "thr\u00e9e"]
    assert tail.read_lines() == []


def test_file_tail_rereads_a_replaced_or_truncated_file(tmp_path):
    from SSSTrainLib.process import FileTail

    path = tmp_path / "history.jsonl"
    path.write_text("a\nb\nc\n")
    tail = FileTail(str(path))
    assert tail.read_lines() == ["a", "b", "c"]
    replacement = tmp_path / "new"
    replacement.write_text("a\nb\nc\nd\n")
    os.replace(replacement, path)  # what truncate_history does on resume: another inode
    assert tail.read_lines() == ["a", "b", "c", "d"]
    path.write_text("x\n")  # same inode, shorter
    assert tail.read_lines() == ["x"]


def test_file_tail_backlog_starts_at_a_line(tmp_path):
    from SSSTrainLib.process import FileTail

    path = tmp_path / "out.log"
    path.write_text("".join(f"line {n}\n" for n in range(100)))
    assert FileTail(str(path), backlog=0).read_lines() == []
    assert FileTail(str(path), backlog=20).read_lines() == ["line 98", "line 99"]
    assert FileTail(str(path), backlog=16).read_lines() == ["line 98", "line 99"]  # exactly at a line start
    assert len(FileTail(str(path)).read_lines()) == 100


# -- launch, stop, kill -----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time
    print("pid", os.getpid(), "pgid", os.getpgid(0), flush=True)
    print("stop file", os.environ["SSS_STOP_FILE"], file=sys.stderr, flush=True)
    while not os.path.exists(os.environ["SSS_STOP_FILE"]):
        time.sleep(0.02)
    print("stopping", file=sys.stderr, flush=True)
""")

# A launcher like PythonSlicer: it starts the real interpreter as its child and waits for it.
LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"])
    sys.exit(child.wait())
""")


def test_launch_is_detached_writes_files_and_obeys_the_stop_file(tmp_path):
    from SSSTrainLib import process
    from SSSTrainLib.runstate import read_state

    run = str(tmp_path / "run")
    os.makedirs(run)
    (tmp_path / "run" / "STOP").write_text("left by an earlier run")
    proc, state = process.launch([sys.executable, "-c", CHILD], run, {"EXTRA": "1"})
    assert read_state(run) == state and state.pid == proc.pid and state.host == socket.gethostname()
    assert not os.path.exists(process.stop_file(run)), "a stale stop file must go before the launch"
    out = process.FileTail(process.stdout_file(run))
    lines = []
    _wait(lambda: lines.extend(out.read_lines()) or lines)
    assert lines == [f"pid {proc.pid} pgid {proc.pid}"], "the trainer leads its own process group (outlives Slicer)"
    assert process.pid_alive(proc.pid) is True
    process.request_stop(run)
    assert proc.wait(30) == 0
    console = Path(process.console_file(run)).read_text().splitlines()
    assert console == [f"stop file {os.path.abspath(process.stop_file(run))}", "stopping"]


def test_kill_process_tree_ends_the_launcher_and_its_child(tmp_path):
    from SSSTrainLib import process

    run = str(tmp_path / "run")
    proc, _ = process.launch([sys.executable, "-c", LAUNCHER], run)
    out = process.FileTail(process.stdout_file(run))
    lines = []
    _wait(lambda: lines.extend(out.read_lines()) or lines)
    child = int(lines[0])
    assert process.pid_alive(child)
    process.kill_process_tree(proc.pid)
    assert proc.wait(30) == -signal.SIGKILL
    _wait(lambda: not process.pid_alive(child))


def test_pid_alive_for_ended_and_unknown_processes(tmp_path):
    import subprocess

    from SSSTrainLib.process import pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert pid_alive(proc.pid) is False
    assert pid_alive(os.getpid()) is True and pid_alive(0) is False


def test_a_reused_pid_is_not_taken_for_the_run(tmp_path):
    """A run that ended long ago whose pid now belongs to another process (here: a process started
    after the recorded launch) is not running: the panel offers Resume instead of "still going"."""
    import dataclasses
    import subprocess

    from SSSTrainLib.logic import TrainLogic
    from SSSTrainLib.monitor import RunMonitor
    from SSSTrainLib.process import START_TIME_SLACK_S, pid_alive, process_start_time
    from SSSTrainLib.runstate import new_state, write_state

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    launched = time.time()
    try:
        started = process_start_time(other.pid)
        assert started is not None and abs(started - launched) < START_TIME_SLACK_S
        assert pid_alive(other.pid, launched) is True, "the process launched then is the run"
        assert pid_alive(other.pid, launched - 3600) is False, "a process newer than the launch is another one"
        ckpt = tmp_path / "checkpoints"
        ckpt.mkdir()
        (ckpt / "last.pt").write_bytes(b"x")
        old = dataclasses.replace(new_state(str(tmp_path), other.pid, ["python"], False), started=launched - 3600)
        write_state(old)
        status = TrainLogic.run_status(str(tmp_path))
        assert status.running is False and status.can_resume
        assert RunMonitor(str(tmp_path)).alive() is False
        write_state(dataclasses.replace(old, started=launched))
        assert TrainLogic.run_status(str(tmp_path)).running is True
    finally:
        other.kill()
        other.wait()


def test_run_state_from_another_computer_is_not_trusted(tmp_path):
    import dataclasses

    from SSSTrainLib.logic import TrainLogic
    from SSSTrainLib.monitor import RunMonitor
    from SSSTrainLib.runstate import new_state, read_state, write_state

    state = dataclasses.replace(new_state(str(tmp_path), os.getpid(), ["python"], False), host="gpu-server-7")
    write_state(state)
    assert read_state(str(tmp_path)) == state
    assert RunMonitor(str(tmp_path)).alive() is None
    assert TrainLogic.run_status(str(tmp_path)).running is None
    (tmp_path / "slicer" / "run_state.json").write_text("{half")
    assert read_state(str(tmp_path)) is None


# -- monitor -----------------------------------------------------------------------------------------------


def test_monitor_of_a_process_that_ends_without_a_report(tmp_path):
    from SSSTrainLib import monitor as M
    from SSSTrainLib import process

    run = str(tmp_path / "run")
    script = "import sys; print('not json', flush=True); print('Traceback: boom', file=sys.stderr); sys.exit(3)"
    proc, state = process.launch([sys.executable, "-c", script], run)
    mon = M.RunMonitor(run, process=proc, state=state, backlog=0)
    messages = []
    _wait(lambda: messages.extend(mon.poll()) or mon.finished)
    assert [m.text for m in messages if m.kind == M.LOG] == ["not json", "Traceback: boom"]
    end = messages[-1]
    assert end.kind == M.FINISHED and end.outcome == M.FAILED and end.returncode == 3 and "exit code 3" in end.text
    assert mon.poll() == []


def test_monitor_follows_a_command_line_run_through_its_history(tmp_path):
    """A run started in a terminal has no panel files: its history.jsonl is followed."""
    from SSSTrainLib import monitor as M
    from sss_lib.runs import ProgressReporter

    reporter = ProgressReporter(10, stream=open(os.devnull, "w"), console_view=False, history=tmp_path / "history.jsonl")
    reporter.start()
    reporter.step(1, {"total": 0.9})
    mon = M.RunMonitor(str(tmp_path))
    assert mon.source.endswith("history.jsonl") and mon.alive() is None
    messages = mon.poll()
    assert [m.record.step for m in messages] == [1] and not mon.finished
    reporter.step(2, {"total": 0.8})
    reporter.val(2, {"liver": 0.7})
    messages = mon.poll()
    assert [(m.record.event, m.record.step) for m in messages] == [("step", 2), ("val", 2)]
    assert mon.last_val.val_dice == {"liver": 0.7} and not mon.finished


def test_a_command_line_run_is_followed_while_its_history_is_fresh(tmp_path):
    from SSSTrainLib.logic import TrainLogic
    from sss_lib.runs import ProgressReporter

    logic = TrainLogic(python=sys.executable)
    assert logic.attach(str(tmp_path)) is None
    reporter = ProgressReporter(10, stream=open(os.devnull, "w"), console_view=False, history=tmp_path / "history.jsonl")
    reporter.start()
    reporter.step(1, {"total": 0.9})
    monitor = logic.attach(str(tmp_path))
    assert monitor is not None and monitor.source.endswith("history.jsonl") and not monitor.owned
    assert [m.record.step for m in monitor.poll()] == [1]
    old = time.time() - 3600
    os.utime(tmp_path / "history.jsonl", (old, old))
    assert logic.attach(str(tmp_path)) is None, "an hour-old history is a finished or dead run"


def test_status_texts():
    from SSSTrainLib import monitor as M
    from sss_lib.runs.progress import ProgressRecord

    assert M.format_duration(None) == "?" and M.format_duration(35.4) == "35 s"
    assert M.format_duration(250) == "4 min 10 s" and M.format_duration(3900) == "1 h 05 min"
    step = ProgressRecord("step", 250, 1000, losses={"total": 0.41234, "sup": 0.3}, mask_ratio=0.73, eta_s=3900)
    assert M.describe(step) == "Step 250/1000  |  loss 0.4123  |  trusted pixels 73%  |  ETA 1 h 05 min"
    assert M.fraction(step) == 0.25 and M.fraction(ProgressRecord("start")) is None
    val = ProgressRecord("val", 500, 1000, val_dice={"liver": 0.9, "tumour": None})
    assert M.describe(val) == "Validation at step 500: Dice liver 0.9000, tumour n/a"
    error = ProgressRecord("error", 3, 10, message="CUDA out of memory: lower --labeled-batch")
    assert M.finished_text(M.FAILED, error, 1, None) == (
        "Training failed at step 3 (exit code 1): CUDA out of memory: lower --labeled-batch")


# -- settings -------------------------------------------------------------------------------------------


def test_train_arguments_spell_out_every_setting(tmp_path):
    from SSSTrainLib import constants as C
    from SSSTrainLib.settings import TrainSettings, train_arguments, train_command

    s = TrainSettings(run_dir="/runs/liver", labeled_source=C.SOURCE_FOLDER, labeled_folder="/data/Dataset003_Liver",
                      unlabeled_source=C.SOURCE_FOLDER, unlabeled_folder="/data/unlabeled", backbone="sam2.1_hiera_small",
                      device="cuda", iterations=500, dfe=False, consistency=False)
    assert train_arguments(s) == [
        "train", "--labeled", "/data/Dataset003_Liver", "--run-dir", "/runs/liver", "--unlabeled", "/data/unlabeled",
        "--backbone", "sam2.1_hiera_small", "--device", "cuda", "--iterations", "500", "--seed", "0",
        "--warmup-iterations", "2000", "--lambda-u", "1.0", "--confidence", "0.95", "--ema-decay", "0.99",
        "--warmup-until-plateau", "--no-dfe", "--no-consistency", "--class-guard", "--weak-views", "0", "--encoder-blocks", "0",
    ]
    assert train_command(s, ["PythonSlicer", "-m", "sss_lib"], resume=True)[-1] == "--resume"
    scene = TrainSettings(run_dir="/runs/x", unlabeled_source=C.SOURCE_SCENE)
    assert train_arguments(scene)[:7] == ["train", "--labeled", os.path.join("/runs/x", "dataset"), "--run-dir", "/runs/x",
                                          "--unlabeled", os.path.join("/runs/x", "unlabeled")]


@pytest.mark.parametrize("change, message", [
    ({"run_dir": ""}, "run folder"),
    ({"labeled_source": "folder"}, "labeled data folder"),
    ({"unlabeled_source": "folder"}, "unlabeled volumes"),
    ({"confidence": 1.5}, "confidence"),
    ({"ema_decay": 1.0}, "EMA"),
    ({"warmup_iterations": 10000}, "fewer than the iterations"),
    ({"labeled_source": "somewhere"}, "Unknown source"),
    ({"encoder_blocks": 2, "unlabeled_source": "scene"}, "supervised runs only"),
    ({"encoder_lora_rank": 4}, "needs encoder blocks"),
    ({"memory_path": True, "backbone": "litemedsam"}, "needs a SAM-2 backbone"),
    ({"memory_path": True, "pcsw": False}, "turn PCSW on"),
    ({"weak_views": -1}, "0 \\(off\\) or more"),
])
def test_settings_errors_say_what_to_fix(change, message):
    import dataclasses

    from SSSTrainLib.errors import SettingsError
    from SSSTrainLib.settings import TrainSettings, check_settings

    check_settings(TrainSettings(run_dir="/runs/x"))
    with pytest.raises(SettingsError, match=message):
        check_settings(dataclasses.replace(TrainSettings(run_dir="/runs/x"), **change))


def test_panel_command_parses_with_the_trainer_options(tmp_path):
    """sss_lib's own ``train`` options (sss_lib.trainer.run) read every setting the panel writes."""
    import argparse

    from SSSTrainLib import constants as C
    from SSSTrainLib.settings import TrainSettings, train_arguments
    from sss_lib.trainer.run import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser.add_subparsers(dest="command").add_parser("train"))
    s = TrainSettings(run_dir=str(tmp_path / "run"), unlabeled_source=C.SOURCE_SCENE, backbone="sam2.1_hiera_small",
                      device="cuda", iterations=1234, warmup_iterations=200, lambda_u=0.5, confidence=0.9,
                      ema_decay=0.995, dfe=False, pcsw=False, consistency=True, seed=11)
    args = parser.parse_args(train_arguments(s, resume=True))
    assert (args.labeled, args.run_dir, args.unlabeled) == (s.labeled_path(), s.run_dir, s.unlabeled_path())
    assert (args.backbone, args.device, args.iterations, args.seed) == ("sam2.1_hiera_small", "cuda", 1234, 11)
    assert (args.warmup_iterations, args.lambda_u, args.confidence, args.ema_decay) == (200, 0.5, 0.9, 0.995)
    assert args.no_dfe and args.no_pcsw and not args.no_consistency and args.resume
    assert args.class_guard and not args.adaptive_thresholds and not args.dfe_to_decoder and not args.memory_path
    assert (args.weak_views, args.encoder_blocks) == (0, 0) and args.warmup_until_plateau
    switches = TrainSettings(run_dir=str(tmp_path / "run"), class_guard=False, adaptive_thresholds=True, warmup_plateau=False,
                             dfe_to_decoder=True, memory_path=True, weak_views=3, encoder_blocks=2, encoder_lora_rank=4)
    args = parser.parse_args(train_arguments(switches))
    assert not args.class_guard and args.adaptive_thresholds and args.dfe_to_decoder and args.memory_path
    assert (args.weak_views, args.encoder_blocks, args.encoder_lora_rank) == (3, 2, 4) and not args.warmup_until_plateau


def test_a_server_job_takes_every_panel_setting(tmp_path):
    """The job settings the panel sends are accepted by the server's check (the trainer's own parser
    and configuration), and turn into the same switches as the local command line."""
    from SSSTrainLib.remote import job_settings
    from SSSTrainLib.settings import TrainSettings, train_arguments
    from sss_lib.service.job_settings import check_argv, settings_to_argv
    from sss_lib.trainer.run import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser.add_subparsers(dest="command").add_parser("train"))
    for s in (TrainSettings(run_dir="/runs/a"),
              TrainSettings(run_dir="/runs/b", class_guard=False, adaptive_thresholds=True, dfe_to_decoder=True,
                            warmup_plateau=False,
                            memory_path=True, weak_views=2, encoder_blocks=1, encoder_lora_rank=8, consistency=False)):
        argv = settings_to_argv(job_settings(s))
        check_argv(argv)
        on_server = parser.parse_args(["train", "--labeled", "DATA", "--run-dir", "RUN", *argv])
        here = parser.parse_args(train_arguments(s))
        for dest in ("class_guard", "warmup_until_plateau", "adaptive_thresholds", "dfe_to_decoder", "memory_path", "weak_views",
                     "encoder_blocks", "encoder_lora_rank", "no_consistency", "confidence", "iterations"):
            assert getattr(on_server, dest) == getattr(here, dest), dest


def test_panel_command_is_accepted_by_the_stand_in_trainer_parser(tmp_path):
    """The stand-in's argument parser is the run contract's flag list: every flag the panel
    writes must parse (a misspelt flag would fail the real trainer too)."""
    import dataclasses
    import importlib.util

    from SSSTrainLib import constants as C
    from SSSTrainLib.settings import TrainSettings, train_arguments

    spec = importlib.util.spec_from_file_location("fake_trainer", REPO / "SSSTrain" / "SSSTrainLib" / "fake_trainer.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    s = TrainSettings(run_dir=str(tmp_path), unlabeled_source=C.SOURCE_SCENE, dfe=False, pcsw=False, consistency=False)
    args = fake.parse(train_arguments(s, resume=True))
    assert args.resume and args.no_dfe and args.no_pcsw and args.no_consistency and args.lambda_u == 1.0
    assert args.warmup_until_plateau
    args = fake.parse(train_arguments(dataclasses.replace(s, class_guard=False, adaptive_thresholds=True, warmup_plateau=False,
                                                          dfe_to_decoder=True, weak_views=1, encoder_blocks=1)))
    assert not args.warmup_until_plateau and not args.class_guard and args.adaptive_thresholds and args.dfe_to_decoder and args.encoder_blocks == 1
    assert json.loads(json.dumps(vars(args)))["run_dir"] == str(tmp_path)
