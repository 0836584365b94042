"""Run infrastructure: config JSON, atomic checkpoints under kill -9, bit-exact RNG resume, clean
stop by signal or stop file (in subprocesses), progress lines, history and curves."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sss_lib.errors import InputError, WeightsError
from sss_lib.runs import (
    ProgressRecord,
    ProgressReporter,
    RunConfig,
    RunPaths,
    StopRequest,
    append_history,
    capture_rng_state,
    checkpoint_payload,
    load_checkpoint,
    parse_progress_line,
    plot_curves,
    read_history,
    restore_rng_state,
    save_checkpoint,
    truncate_history,
)
from sss_lib.runs.progress import FIELDS
from sss_lib.semisup import EmaTeacher

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="signals and kill -9 are POSIX")


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    env.pop("SSS_STOP_FILE", None)
    env.update(extra)
    return env


# -- config ----------------------------------------------------------------------------------------

def test_run_config_json_round_trip(tmp_path: Path) -> None:
    cfg = RunConfig(str(tmp_path / "run"), total_steps=50, lr=3e-4, dfe_width=64, extra={"backbone": "litemedsam"})
    path = cfg.save()
    assert path == tmp_path / "run" / "config.json"
    data = json.loads(path.read_text())
    assert data["schema"] == "sss.run-config/1" and data["total_steps"] == 50 and data["extra"]["backbone"] == "litemedsam"
    assert RunConfig.load(tmp_path / "run") == cfg
    # JSON writes 1.0 as 1 in hand-edited files: an int stands for a float.
    data["lambda_u"] = 1
    assert RunConfig.from_dict(data).lambda_u == 1.0 and isinstance(RunConfig.from_dict(data).lambda_u, float)


def test_run_config_refuses_typos_and_bad_values(tmp_path: Path) -> None:
    data = RunConfig(str(tmp_path)).to_dict()
    with pytest.raises(InputError, match="unknown settings.*lambda_uu"):
        RunConfig.from_dict({**data, "lambda_uu": 2.0})
    with pytest.raises(InputError, match="total_steps"):
        RunConfig.from_dict({**data, "total_steps": "many"})
    with pytest.raises(InputError, match="confidence_threshold"):
        RunConfig(str(tmp_path), confidence_threshold=1.5)
    with pytest.raises(InputError, match="not plain JSON"):
        RunConfig(str(tmp_path), extra={"path": Path("x")})
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        RunConfig.load(tmp_path)


# -- checkpoints -----------------------------------------------------------------------------------

_SAVER = r"""
import os, sys, time, io, torch
from sss_lib.runs.checkpoint import save_checkpoint
path, mode = sys.argv[1], sys.argv[2]
real_save, real_fsync = torch.save, os.fsync
state = {"armed": False}

def half_then_hang(obj, f):
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    print("half", flush=True); time.sleep(60)

def hang_in_fsync(fd):
    if state["armed"]:
        print("fsync", flush=True); time.sleep(60)
    real_fsync(fd)

if mode == "fsync":
    os.fsync = hang_in_fsync
i = 0
while True:
    i += 1
    if i == 3 and mode == "half":
        torch.save = half_then_hang
    state["armed"] = i == 3
    save_checkpoint(path, {"i": i, "data": torch.full((2_000_000,), float(i))})
    print(f"saved {i}", flush=True)
"""


@POSIX_ONLY
@pytest.mark.parametrize("mode", ["half", "fsync", "loop"])
def test_save_is_atomic_under_kill_9(tmp_path: Path, mode: str) -> None:
    """Kill -9 mid-write (deterministically: half the bytes written, or waiting in fsync; or at a
    random moment of a save loop): the checkpoint on disk always loads and is a complete one."""
    path = tmp_path / "last.pt"
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_child_env())
    assert child.stdout is not None
    saved = 0
    try:
        while True:
            line = child.stdout.readline()
            assert line, f"saver died: {child.stderr.read() if child.stderr else ''}"
            if line.startswith("saved"):
                saved = int(line.split()[1])
            if mode in ("half", "fsync") and line.strip() in ("half", "fsync"):
                break
            if mode == "loop" and saved >= 3:
                time.sleep(random.Random(saved).uniform(0.0, 0.05))
                break
    finally:
        child.kill()  # SIGKILL
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    payload = load_checkpoint(path)
    assert payload["i"] >= saved >= 2
    assert torch.equal(payload["data"], torch.full((2_000_000,), float(payload["i"])))
    strays = list(tmp_path.glob(".last.pt.tmp-*"))
    if mode in ("half", "fsync"):
        assert payload["i"] == 2 and len(strays) == 1  # killed inside save 3: save 2 is intact
    save_checkpoint(path, {"i": 99})  # the next save clears what the dead process left
    assert list(tmp_path.glob(".last.pt.tmp-*")) == [] and load_checkpoint(path)["i"] == 99


def test_payload_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ema = EmaTeacher(model, 0.9)
    ema.update(model)
    gen = torch.Generator().manual_seed(5)
    cfg = RunConfig(str(tmp_path))
    payload = checkpoint_payload(model=model.state_dict(), optimizer=opt.state_dict(), ema=ema.state_dict(),
                                 step=12, epoch=1, config=cfg.to_dict(),
                                 rng=capture_rng_state({"data": gen, "np": np.random.default_rng(3)}),
                                 data={"order": torch.randperm(10), "position": 4}, extra={"best_dice": 0.5})
    path = save_checkpoint(RunPaths.of(tmp_path).create().last_checkpoint, payload)
    back = load_checkpoint(path)  # weights_only=True inside
    assert (back["format"], back["version"], back["step"], back["epoch"]) == ("sss-run-checkpoint", 1, 12, 1)
    assert RunConfig.from_dict(back["config"]) == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    opt2 = torch.optim.AdamW(nn.Linear(4, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert back["ema"]["num_updates"] == 1 and back["data"]["position"] == 4
    assert back["rng"]["generators"]["np"]["type"] == "numpy"


def test_unloadable_payloads_are_refused_at_save_time(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"payload\['config'\]\['out'\] is a (Posix|Windows)Path"):
        save_checkpoint(tmp_path / "c.pt", {"config": {"out": Path("x")}})
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(tmp_path / "c.pt", {"a": np.zeros(3)})
    assert not (tmp_path / "c.pt").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# -- RNG -------------------------------------------------------------------------------------------

def _draw(gen: torch.Generator, npgen: np.random.Generator) -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(2).tolist(),
            torch.rand(4).tolist(), torch.rand(2, generator=gen).tolist(), npgen.integers(0, 10**9, 3).tolist())


def test_rng_restore_gives_identical_next_numbers(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    gen, npgen = torch.Generator().manual_seed(4), np.random.default_rng(5)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.randn(1)  # and in NumPy's
    state = capture_rng_state({"gen": gen, "npgen": npgen})
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = _draw(gen, npgen)
    _draw(gen, npgen)  # move every stream on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], {"gen": gen, "npgen": npgen})
    assert _draw(gen, npgen) == expected
    with pytest.raises(KeyError, match="other"):
        restore_rng_state(state, {"other": gen})


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _train(model: _Tiny, opt: torch.optim.Optimizer, ema: EmaTeacher, data: torch.Tensor, order: np.random.Generator,
           aug: torch.Generator, steps: range) -> None:
    for _ in steps:
        idx = torch.from_numpy(order.permutation(len(data))[:4])
        x = data[idx] + 0.1 * torch.randn(4, 6, generator=aug) + random.random() * np.random.rand()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)


def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path) -> None:
    """3 steps + checkpoint + restore into fresh objects + 3 steps == 6 uninterrupted steps."""
    data = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))

    def fresh(seed: int) -> tuple:
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        model = _Tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, EmaTeacher(model, 0.9), np.random.default_rng(seed), torch.Generator().manual_seed(seed)

    model, opt, ema, order, aug = fresh(7)
    _train(model, opt, ema, data, order, aug, range(6))
    reference = [p.detach().clone() for p in model.parameters()]
    reference_ema = [p.detach().clone() for p in ema.module.parameters()]

    model, opt, ema, order, aug = fresh(7)
    _train(model, opt, ema, data, order, aug, range(3))
    gens = {"order": order, "aug": aug}
    save_checkpoint(tmp_path / "last.pt", checkpoint_payload(
        model=model.state_dict(), optimizer=opt.state_dict(), ema=ema.state_dict(), step=3, epoch=0,
        config={}, rng=capture_rng_state(gens)))

    model, opt, ema, order, aug = fresh(123)  # another process: other init, other RNG states
    ck = load_checkpoint(tmp_path / "last.pt")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    ema.load_state_dict(ck["ema"])
    restore_rng_state(ck["rng"], {"order": order, "aug": aug})
    _train(model, opt, ema, data, order, aug, range(ck["step"], 6))
    for a, b in zip(model.parameters(), reference):
        assert torch.equal(a, b)
    for a, b in zip(ema.module.parameters(), reference_ema):
        assert torch.equal(a, b)


# -- stop ------------------------------------------------------------------------------------------

_STOPPER = r"""
import json, sys, time
from sss_lib.runs.stop import StopRequest
run_dir, mode = sys.argv[1], sys.argv[2]
with StopRequest(run_dir) as stop:
    print("ready", flush=True)
    start = time.monotonic()
    while time.monotonic() - start < 20:
        if mode == "poll" and stop.requested:
            print(json.dumps({"reason": stop.reason}), flush=True)
            sys.exit(0)
        time.sleep(0.005)
sys.exit(3)
"""


def _start_stopper(run_dir: Path, mode: str = "poll", **env: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _STOPPER, str(run_dir), mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_child_env(**env))
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


@POSIX_ONLY
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_requests_a_clean_stop(tmp_path: Path, sig: signal.Signals) -> None:
    child = _start_stopper(tmp_path)
    child.send_signal(sig)
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert json.loads(out)["reason"] == f"signal {sig.name}"


@POSIX_ONLY
def test_second_ctrl_c_interrupts_a_stuck_run(tmp_path: Path) -> None:
    child = _start_stopper(tmp_path, mode="stuck")
    child.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert child.poll() is None  # the first only asked
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=10)
    assert child.returncode != 0 and "second Ctrl+C" in err


def test_stop_file_from_env_and_run_dir(tmp_path: Path) -> None:
    env_file = tmp_path / "gui" / "please-stop"
    env_file.parent.mkdir()
    child = _start_stopper(tmp_path / "run", SSS_STOP_FILE=str(env_file))
    time.sleep(0.1)
    assert child.poll() is None
    env_file.write_text("")
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert json.loads(out)["reason"] == f"stop file {env_file}"

    run_dir = tmp_path / "run2"
    run_dir.mkdir()
    (run_dir / "STOP").write_text("")  # left by an earlier stop: cleared at start
    child = _start_stopper(run_dir)
    assert not (run_dir / "STOP").exists()
    (run_dir / "STOP").write_text("")
    out, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    assert json.loads(out)["reason"] == f"stop file {run_dir / 'STOP'}"


def test_stop_request_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSS_STOP_FILE", raising=False)
    stop = StopRequest(tmp_path)
    assert stop.stop_file == tmp_path / "STOP" and not stop.requested and stop.reason is None
    stop.request("GUI button")
    stop.request("later")
    assert stop.poll() and stop.reason == "GUI button"
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest(tmp_path) as other:
        assert signal.getsignal(signal.SIGTERM) == other._on_signal
    assert signal.getsignal(signal.SIGTERM) == previous


# -- progress --------------------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_lines_round_trip_and_fixed_schema(tmp_path: Path) -> None:
    out, con, clock = io.StringIO(), io.StringIO(), _Clock()
    rep = ProgressReporter(10, stream=out, console=con, bar=False, clock=clock, history=tmp_path / "h.jsonl")
    rep.start()
    for step in range(1, 5):
        clock.t += 2.0
        rep.step(step, {"total": 1.0 / step, "sup": np.float32(0.5), "unsup": torch.tensor(float("nan"))},
                 lr=1e-4, mask_ratio=0.25 * step, epoch=1)
    rep.val(4, {"RV": 0.8, "LV": 0.9})
    rep.checkpoint(4, tmp_path / "last.pt")
    rep.stop(4)
    lines = out.getvalue().splitlines()
    records = [parse_progress_line(line) for line in lines]
    assert [r.event for r in records if r] == ["start", "step", "step", "step", "step", "val", "checkpoint", "stop"]
    for line in lines:
        assert list(json.loads(line)) == list(FIELDS)  # every line: the same keys, same order
    step4 = records[4]
    assert step4 is not None and step4.losses == {"total": 0.25, "sup": 0.5, "unsup": None}
    assert (step4.step, step4.total_steps, step4.epoch, step4.lr, step4.mask_ratio) == (4, 10, 1, 1e-4, 1.0)
    assert step4.eta_s == pytest.approx(2.0 * 6)  # 2 s per step, 6 steps left
    assert records[5] is not None and records[5].val_dice == {"RV": 0.8, "LV": 0.9}
    assert records[6] is not None and records[6].checkpoint == str(tmp_path / "last.pt")
    # Round trip through the dataclass.
    again = parse_progress_line(step4.to_json())
    assert again == step4
    assert "validation at step 4: Dice RV 0.8000, LV 0.9000" in con.getvalue()
    assert "stopped after step 4" in con.getvalue()


def test_parse_ignores_other_lines() -> None:
    for line in ["", "loading weights...", "{not json", '{"event": "step"}', "[1, 2]",
                 '{"schema": "sss.progress/1", "event": "bogus"}', "100%|####| 10/10"]:
        assert parse_progress_line(line) is None
    line = ProgressRecord("done", 10, 10, message="ok").to_json()
    assert parse_progress_line("  " + line + "\r\n") == ProgressRecord.from_dict(json.loads(line))


def test_progress_bar_goes_to_console_only() -> None:
    out, con = io.StringIO(), io.StringIO()
    with ProgressReporter(5, stream=out, console=con, bar=True) as rep:
        rep.start()
        for s in range(1, 6):
            rep.step(s, {"total": 0.5})
        rep.done(5)
    assert "5/5" in con.getvalue() and "done: 5 steps" in con.getvalue()
    assert all(parse_progress_line(line) for line in out.getvalue().splitlines())
    quiet = io.StringIO()
    rep = ProgressReporter(100, stream=quiet, console=io.StringIO(), bar=False, step_every=10)
    rep.start()
    written = [rep.step(s, {"total": 1.0}) for s in range(1, 101)]
    assert sum(w is not None for w in written) == 10


# -- history and curves ----------------------------------------------------------------------------

def test_history_resume_keeps_one_curve(tmp_path: Path) -> None:
    hist = tmp_path / "history.jsonl"
    rep = ProgressReporter(10, stream=io.StringIO(), console_view=False, history=hist)
    rep.start()
    for s in range(1, 8):
        rep.step(s, {"total": float(s)})
    rep.val(5, {"LV": 0.5})
    # Killed after step 7 with its last checkpoint at step 5; a half-written line is left behind.
    with open(hist, "a") as f:
        f.write('{"schema": "sss.progress/1", "event": "st')
    append_history(hist, ProgressRecord("step", 8, 10, losses={"total": 8.0}))  # not glued to the fragment
    assert [r.step for r in read_history(hist) if r.event == "step"] == [1, 2, 3, 4, 5, 6, 7, 8]
    rep = ProgressReporter(10, stream=io.StringIO(), console_view=False, history=hist)
    rep.start(step=5)
    for s in range(6, 11):
        rep.step(s, {"total": float(s) + 0.5})
    steps = [r for r in read_history(hist) if r.event == "step"]
    assert [r.step for r in steps] == list(range(1, 11))
    assert [r.losses["total"] for r in steps][4:6] == [5.0, 6.5]
    assert [r.step for r in read_history(hist) if r.event == "val"] == [5]
    assert truncate_history(hist, after_step=2) == 9


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    hist = tmp_path / "history.jsonl"
    for s in range(1, 21):
        append_history(hist, ProgressRecord("step", s, 20, losses={"sup": 1 / s, "unsup": 0.5 / s}, mask_ratio=s / 20))
        if s % 5 == 0:
            append_history(hist, ProgressRecord("val", s, 20, val_dice={"RV": s / 25, "LV": None}))
    png = plot_curves(hist, tmp_path / "curves.png", title="test")
    empty = plot_curves([], tmp_path / "empty.png")
    for p in (png, empty):
        head = p.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width == 640 and height > 400
    assert int.from_bytes(png.read_bytes()[20:24], "big") > int.from_bytes(empty.read_bytes()[20:24], "big")  # 3 panels
