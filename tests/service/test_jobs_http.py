"""Training jobs through a real service (``python -m sss_lib serve`` on 127.0.0.1, no mocked HTTP)
and the real trainer (SAM-2.1 tiny at random init, 64 px, tiny phantoms, a few steps):

* ``train --server``: upload, progress lines on stdout as a local run, the model downloaded and
  loadable; a second job (a data-root path) waits in the queue while the first runs (CPU server);
* the progress cursor and long-poll; curves.png; the NDJSON stream;
* Ctrl+C on ``train --server`` stops the job at a checkpoint; ``--job ID --resume`` finishes it;
* the server SIGKILLed mid-job and restarted on the same jobs folder: the live trainer is adopted,
  a dead one leaves the job interrupted, and resume runs it to completion;
* bad requests get a status and a message, and the server keeps answering.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from sss_lib.phantoms import make_phantom_dataset
from sss_lib.runs.progress import parse_progress_line
from sss_lib.service.client import ServiceError
from sss_lib.service.local import LocalService
from sss_lib.task_model import load_task_model

SETTINGS = {"backbone": "sam2.1_hiera_tiny", "random_init": True, "image_size": 64, "threads": 1,
            "labeled_batch": 2, "decoder_batch": 2, "checkpoint_every": 2, "val_every": 4,
            "val_cases": ["case_002"]}
CLI_OPTIONS = ["--backbone", "sam2.1_hiera_tiny", "--random-init", "--image-size", "64", "--threads", "1",
               "--labeled-batch", "2", "--decoder-batch", "2", "--checkpoint-every", "2", "--val-every", "4",
               "--val-cases", "case_002"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
END = ("stopped", "interrupted", "done", "failed")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """``(local dataset folder, data root holding Dataset001_Lab)``."""
    base = tmp_path_factory.mktemp("jobs_data")
    local = make_phantom_dataset(base / "Dataset001_Lab", 3, seed=7, n_slices=4, size=(48, 48),
                                 spacing=(4.0, 4.0, 8.0))
    root = base / "root"
    root.mkdir()
    make_phantom_dataset(root / "Dataset001_Lab", 3, seed=7, n_slices=4, size=(48, 48), spacing=(4.0, 4.0, 8.0))
    return local, root


def start_service(jobs: Path, root: Path, home: Path) -> LocalService:
    env = {**ENV, "SSS_HOME": str(home)}
    args = ["--device", "cpu", "--jobs-dir", str(jobs), "--data-root", str(root), "--max-upload", "64"]
    return LocalService(args, env=env, log_path=str(jobs.parent / f"service-{time.monotonic_ns()}.log")).start() \
        .wait_ready(timeout=240)


@pytest.fixture(scope="module")
def service(data, tmp_path_factory, kill_trainers):
    jobs = tmp_path_factory.mktemp("service") / "jobs"
    svc = start_service(jobs, data[1], jobs.parent / "home")
    yield svc, jobs
    kill_trainers(jobs)
    svc.stop()


def wait_for(predicate, timeout: float = 240.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def train_cli(svc: LocalService, *args: str, cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sss_lib", "train", "--server", svc.url, "--token-file", str(svc.token_file), *args]
    # SIGINT back to its default in the CLI: a test suite started in the background by a shell
    # (`cmd &`) ignores SIGINT and its children would inherit that, so Ctrl-C could not reach them.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def records(stdout: str) -> list:
    """Every stdout line must be a progress record, as from a local run."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    parsed = [parse_progress_line(line) for line in lines]
    assert all(r is not None for r in parsed), [line for line, r in zip(lines, parsed) if r is None][:3]
    return parsed


def test_train_server_uploads_queues_and_downloads_the_model(service, data, tmp_path):
    svc, _ = service
    client = svc.client()
    model = tmp_path / "heart.ssstask"
    cli = train_cli(svc, "--labeled", str(data[0]), "--iterations", "4", "--out", str(model), *CLI_OPTIONS,
                    cwd=tmp_path)
    try:
        first = wait_for(lambda: [j for j in client.jobs() if j["state"] == "running"], what="the first job to run")[0]
        second = client.submit_job({"path": "Dataset001_Lab"}, settings={**SETTINGS, "iterations": 2}, name="second")
        assert second["state"] == "queued" and second["position"] == 1
        assert client.job(second["job_id"])["state"] == "queued"  # waits: one job at a time on a CPU server
        out, err = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err[-3000:]
    events = records(out)
    assert events[0].event == "start" and events[-1].event == "done"
    assert [r.step for r in events if r.event == "step"] == [1, 2, 3, 4]
    assert f"job {first['job_id']} submitted" in err and f"task model: {model}" in err
    task = load_task_model(model)
    assert [c.name for c in task.classes] == ["RV", "Myo", "LV"]
    done = client.job(first["job_id"])
    assert done["state"] == "done" and done["labeled"].keys() == {"upload_id"} and done["name"] == "Dataset001_Lab"
    png = client.download_curves(first["job_id"], tmp_path / "curves.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The queued job starts once the first has ended, and is followed with the cursor.
    jid = second["job_id"]
    answer = wait_for(lambda: (a := client.job_progress(jid, after=0, wait=10))["lines"] and a,
                      what="the second job's first line")  # long-polls: the trainer takes a while to start
    assert answer["lines"][0]["event"] == "start"
    assert client.job(jid)["started"] >= done["ended"]
    seen = answer["lines"] + list(client.follow(jid, after=answer["next"]))
    final = client.job_progress(jid)
    assert final["state"] == "done" and final["lines"] == seen and final["next"] == len(seen)
    assert client.job_progress(jid, after=final["next"] - 1)["lines"] == seen[-1:]
    t0 = time.monotonic()
    assert client.job_progress(jid, after=final["next"], wait=20)["lines"] == []  # ended: no waiting
    assert time.monotonic() - t0 < 10
    streamed = list(client.stream_job(jid))
    assert streamed[:-1] == seen and streamed[-1] == {"state": "done"}
    assert load_task_model(client.download_model(jid, tmp_path / "second.ssstask")).classes


def test_ctrl_c_stops_the_job_and_resume_finishes_it(service, data, tmp_path):
    svc, _ = service
    client = svc.client()
    steps = 40
    cli = train_cli(svc, "--labeled", "server:Dataset001_Lab", "--iterations", str(steps), *CLI_OPTIONS, cwd=tmp_path)
    lines = []
    try:
        assert cli.stdout is not None
        for line in cli.stdout:
            lines.append(line)
            r = parse_progress_line(line)
            if r is not None and r.event == "step" and r.step >= 2:
                cli.send_signal(signal.SIGINT)
                break
        out, err = cli.communicate(timeout=240)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err[-3000:]
    events = records("".join(lines) + out)
    assert [r.event for r in events[-2:]] == ["checkpoint", "stop"], err[-3000:]
    stopped = events[-1].step
    assert 2 <= stopped < steps
    assert "asked job" in err and "--resume" in err
    job_id = err.split("job ", 1)[1].split()[0]
    assert client.job(job_id)["state"] == "stopped"

    model = tmp_path / "resumed.ssstask"
    resumed = train_cli(svc, "--job", job_id, "--resume", "--out", str(model), cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    events = records(out)
    assert events[0].event == "start" and events[0].step == stopped and events[-1].event == "done"
    assert [r.step for r in events if r.event == "step"] == list(range(stopped + 1, steps + 1))
    assert load_task_model(model).classes
    job = client.job(job_id)
    assert job["state"] == "done" and job["attempts"] == 2 and job["step"] == steps


def test_server_killed_mid_job_then_restarted(data, tmp_path, kill_trainers):
    jobs, home = tmp_path / "jobs", tmp_path / "home"
    svc = start_service(jobs, data[1], home)
    try:
        client = svc.client()
        jid = client.submit_job({"path": "Dataset001_Lab"}, settings={**SETTINGS, "iterations": 12})["job_id"]
        wait_for(lambda: any(r["event"] == "checkpoint" for r in client.job_progress(jid, wait=5)["lines"]),
                 what="a checkpoint")
        pid = json.loads((jobs / "jobs" / jid / "job.json").read_text())["pid"]
        os.killpg(pid, signal.SIGSTOP)  # hold the trainer, so it cannot finish while the server restarts
        os.kill(svc.pid, signal.SIGKILL)  # the server dies at once; its trainer lives on
        svc.stop()

        svc = start_service(jobs, data[1], home)
        client = svc.client()
        job = client.job(jid)
        assert job["state"] == "running"  # adopted: the live trainer is followed again
        step = job["step"]
        os.killpg(pid, signal.SIGCONT)
        wait_for(lambda: client.job(jid)["step"] > step, what="the adopted trainer to go on")
        os.killpg(pid, signal.SIGKILL)  # now the trainer dies too, mid-run
        job = wait_for(lambda: (j := client.job(jid))["state"] in END and j, what="the job to end")
        assert job["state"] == "interrupted" and job["resumable"] and job["error"]["code"] == "trainer_gone"
        with pytest.raises(ServiceError) as err:
            client.download_model(jid, tmp_path / "early.ssstask")
        assert err.value.status == 404 and "done" in str(err.value)

        assert client.resume_job(jid)["state"] == "queued"
        list(client.follow(jid))
        job = client.job(jid)
        assert job["state"] == "done" and job["step"] == 12 and job["attempts"] == 2
        history = [json.loads(x) for x in (jobs / "jobs" / jid / "run" / "history.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history if h["event"] == "step"] == list(range(1, 13))
        assert load_task_model(client.download_model(jid, tmp_path / "m.ssstask")).classes
    finally:
        kill_trainers(jobs)
        svc.stop()


def test_bad_requests_get_a_message_and_the_server_keeps_answering(service, tmp_path):
    svc, _ = service
    client = svc.client()

    def refused(call) -> ServiceError:
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.message and err.value.code
        return err.value

    e = refused(lambda: client.job("0123456789ab"))
    assert (e.status, e.code) == (404, "unknown_job")
    for call in (lambda: client.stop_job("0123456789ab"), lambda: client.job_progress("../../etc")):
        assert refused(call).status == 404
    e = refused(lambda: client.submit_job({"path": "../outside"}))
    assert e.status == 403 and "outside" in e.message
    e = refused(lambda: client.submit_job({"path": "/etc"}))
    assert e.status == 400 and "absolute" in e.message
    e = refused(lambda: client.submit_job({"upload_id": "0123456789abcdef0123"}))
    assert e.status == 404 and "upload" in e.message
    e = refused(lambda: client.submit_job({"path": "Dataset001_Lab"}, settings={"iterations": 0}))
    assert (e.status, e.code) == (422, "bad_settings") and "at least 1" in e.message
    e = refused(lambda: client.submit_job({"path": "Dataset001_Lab"}, settings={"resume": True}))
    assert e.status == 422 and "chosen by the server" in e.message
    e = refused(lambda: client.submit_job({"path": "Dataset001_Lab"}, settings={"warp_speed": 9}))
    assert e.status == 422 and "unknown setting" in e.message
    e = refused(lambda: client._request("POST", "/jobs", body=b"{not json", headers={"Content-Type": "application/json"}))
    assert e.status == 400
    e = refused(lambda: client._request("POST", "/jobs", json={"settings": {}}))
    assert e.status == 422 and "labeled is required" in e.message

    # Malformed archives: garbage, a zip escaping its folder, a zip with no dataset.
    e = refused(lambda: client._request("POST", "/uploads", body=b"definitely not an archive"))
    assert (e.status, e.code) == (422, "bad_archive") and "zip" in e.message
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    e = refused(lambda: client._request("POST", "/uploads", body=buf.getvalue()))
    assert e.status == 422 and "outside the archive" in e.message
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes/readme.txt", "no images")
    e = refused(lambda: client._request("POST", "/uploads", body=buf.getvalue()))
    assert e.status == 422 and "nnU-Net" in e.message

    (tmp_path / "not_a_dataset").mkdir()
    (tmp_path / "not_a_dataset" / "readme.txt").write_text("nothing to train on")
    e = refused(lambda: client.submit_job(tmp_path / "not_a_dataset"))
    assert e.status == 422
    # train --server: a refused job is an error line on stdout and exit code 2, as a local run.
    bad = train_cli(svc, "--labeled", "server:Dataset001_Lab", "--iterations", "0", cwd=tmp_path)
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    (event,) = records(out)
    assert event.event == "error" and "at least 1" in event.message and "error:" in err
    assert client.info()["api_version"] == 1  # still serving
    assert all(j["state"] in END for j in client.jobs())
