"""JobManager without HTTP: queue, stop, resume, restart safety, GPU slots and refused requests.

The trainer is tests/service/jobs_fake_trainer.py (the run contract without a network, a job in a
fraction of a second); the real trainer runs in test_jobs_http.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sss_lib.phantoms import make_phantom_dataset
from sss_lib.service.http_errors import ApiError
from sss_lib.service.jobs import JobManager

FAKE = [sys.executable, str(Path(__file__).with_name("jobs_fake_trainer.py"))]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_root")
    make_phantom_dataset(root / "Dataset001_Lab", 2, seed=1, n_slices=3, size=(16, 16), spacing=(4.0, 4.0, 8.0))
    make_phantom_dataset(root / "unl", 1, seed=2, layout="plain", labeled=False, n_slices=3, size=(16, 16))
    (root / "empty").mkdir()
    return root


def manager(jobs_dir: Path, data_root: Path, **kw) -> JobManager:
    env = {"FAKE_STEP_S": str(kw.pop("step_s", 0.05)), **kw.pop("env", {})}
    return JobManager(jobs_dir, data_root=data_root, trainer=FAKE, poll_s=0.05, env=env, **kw).start()


def wait_state(m: JobManager, jid: str, states: tuple[str, ...], timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = m.get(jid)
        if view["state"] in states:
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {jid} stayed {m.get(jid)['state']}, expected {states}")


def wait_step(m: JobManager, jid: str, step: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.get(jid)["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {jid} did not reach step {step}")


def events(m: JobManager, jid: str) -> list[str]:
    return [r["event"] for r in m.progress(jid)["lines"]]


def test_job_runs_to_done_with_progress_cursor_and_files(tmp_path, data_root):
    m = manager(tmp_path / "jobs", data_root)
    try:
        answer = m.submit({"path": "Dataset001_Lab"}, {"path": "unl"}, {"iterations": 6, "seed": 4}, name="heart")
        assert answer["state"] == "queued" and answer["position"] == 1
        jid = answer["job_id"]
        view = wait_state(m, jid, ("done",))
        assert view["name"] == "heart" and view["step"] == 6 and view["total"] == 6 and view["last"]["event"] == "done"
        assert view["files"] == {"curves": True, "model": True} and "error" not in view
        whole = m.progress(jid)
        assert whole["state"] == "done" and whole["next"] == len(whole["lines"])
        assert [r["step"] for r in whole["lines"] if r["event"] == "step"] == list(range(1, 7))
        # The cursor: after=N gives the records from N on, and nothing past the end.
        tail = m.progress(jid, after=whole["next"] - 2)
        assert tail["lines"] == whole["lines"][-2:] and tail["next"] == whole["next"]
        assert m.progress(jid, after=whole["next"] + 5)["lines"] == []
        # The trainer got the data, the run folder, the CPU and the settings as options.
        started = json.loads(whole["lines"][0]["message"])
        assert started["argv"][:6] == ["--labeled", str((data_root / "Dataset001_Lab").resolve()), "--run-dir",
                                       str(m.run_dir(jid)), "--device", "cpu"]
        assert "--unlabeled" in started["argv"] and "--iterations=6" in started["argv"]
        assert "--seed=4" in started["argv"] and "--resume" not in started["argv"]
        assert m.file(jid, "model").read_bytes() == b"model at 6"
        record = json.loads((m.job_dir(jid) / "job.json").read_text())
        assert record["state"] == "done" and record["attempts"] == 1
    finally:
        m.close()


def test_cpu_server_runs_one_job_at_a_time_in_order(tmp_path, data_root):
    m = manager(tmp_path / "jobs", data_root, step_s=0.1)
    try:
        first = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 6})["job_id"]
        second = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 2})
        assert second["position"] == 2
        wait_state(m, first, ("running",))
        view = m.get(second["job_id"])
        assert view["state"] == "queued" and view["position"] == 1 and view["step"] == 0
        wait_step(m, first, 3)
        assert m.get(second["job_id"])["state"] == "queued"  # still waiting while the first runs
        wait_state(m, first, ("done",))
        wait_state(m, second["job_id"], ("done",))
        first_end = m.get(first)["ended"]
        assert m.get(second["job_id"])["started"] >= first_end
    finally:
        m.close()


def test_stop_then_resume_continues_from_the_checkpoint(tmp_path, data_root):
    m = manager(tmp_path / "jobs", data_root, step_s=0.1)
    try:
        jid = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 40})["job_id"]
        wait_step(m, jid, 2)
        assert m.stop(jid)["state"] == "stopping"
        view = wait_state(m, jid, ("stopped",))
        stopped_at = view["step"]
        assert 2 <= stopped_at < 40 and view["resumable"] and view["files"]["model"]
        assert events(m, jid)[-2:] == ["checkpoint", "stop"]
        with pytest.raises(ApiError) as err:
            m.stop(jid)
        assert err.value.status == 409
        lines_before = m.progress(jid)["next"]
        assert m.resume(jid)["state"] == "queued"
        view = wait_state(m, jid, ("done",))
        assert view["attempts"] == 2 and view["step"] == 40
        resumed = m.progress(jid, after=lines_before)["lines"]
        start = json.loads(resumed[0]["message"])
        assert "--resume" in start["argv"] and start["resumed_from"] == stopped_at
        assert [r["step"] for r in resumed if r["event"] == "step"] == list(range(stopped_at + 1, 41))
        with pytest.raises(ApiError) as err:
            m.resume(jid)
        assert err.value.status == 409 and "finished" in str(err.value)
    finally:
        m.close()


def test_stop_a_queued_job_ends_it_without_running(tmp_path, data_root):
    m = manager(tmp_path / "jobs", data_root, step_s=0.1)
    try:
        first = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 20})["job_id"]
        second = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 2})["job_id"]
        assert m.stop(second)["state"] == "stopped"
        m.stop(first)
        wait_state(m, first, ("stopped",))
        time.sleep(0.3)
        assert m.get(second)["state"] == "stopped" and m.get(second)["attempts"] == 0
        assert m.progress(second)["lines"] == []
    finally:
        m.close()


def test_failed_trainer_gives_its_message(tmp_path, data_root):
    m = manager(tmp_path / "jobs", data_root, env={"FAKE_FAIL_AT": "2"})
    try:
        jid = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 5})["job_id"]
        view = wait_state(m, jid, ("failed",))
        assert view["error"]["code"] == "training_failed" and "could not be read" in view["error"]["message"]
        assert view["resumable"]
        with pytest.raises(ApiError) as err:
            m.file(jid, "model")
        assert err.value.status == 404 and "done" in str(err.value)
    finally:
        m.close()


def abandoned_server(jobs: Path, data_root: Path) -> tuple[str, str, int]:
    """A manager with a running job and a queued one goes away without stopping anything (a killed
    server); ``(running job, queued job, trainer pid)``."""
    m1 = manager(jobs, data_root, step_s=0.1)
    jid = m1.submit({"path": "Dataset001_Lab"}, settings={"iterations": 30})["job_id"]
    queued = m1.submit({"path": "Dataset001_Lab"}, settings={"iterations": 2})["job_id"]
    wait_step(m1, jid, 2)
    m1.close(stop_jobs=False)  # the server dies; its trainer does not
    return jid, queued, json.loads((jobs / "jobs" / jid / "job.json").read_text())["pid"]


def test_restart_adopts_a_live_trainer_and_interrupts_a_dead_one(tmp_path, data_root):
    jobs = tmp_path / "jobs"
    jid, queued, pid = abandoned_server(jobs, data_root)
    m2 = manager(jobs, data_root, step_s=0.1)
    try:
        view = m2.get(jid)
        assert view["state"] == "running" and m2.get(queued)["state"] == "queued"
        step = view["step"]
        wait_step(m2, jid, step + 2)  # the adopted trainer goes on, followed through its files
        os.killpg(pid, signal.SIGKILL)  # now the trainer dies too
        view = wait_state(m2, jid, ("interrupted",))
        assert view["error"]["code"] == "trainer_gone" and view["resumable"]
        wait_state(m2, queued, ("done",))  # the queued job started once the slot was free
        m2.resume(jid)
        view = wait_state(m2, jid, ("done",))
        assert view["step"] == 30 and view["attempts"] == 2
    finally:
        m2.close()


def test_restart_finds_a_dead_trainer_interrupted_and_queued_jobs_start(tmp_path, data_root):
    jobs = tmp_path / "jobs"
    jid, queued, pid = abandoned_server(jobs, data_root)
    os.killpg(pid, signal.SIGKILL)  # server and trainer gone (a power cut)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)

    m2 = manager(jobs, data_root)
    try:
        assert m2.get(jid)["state"] == "interrupted"
        wait_state(m2, queued, ("done",))
        m2.resume(jid)
        assert wait_state(m2, jid, ("done",))["step"] == 30
    finally:
        m2.close()


def test_shutdown_stops_running_jobs_at_a_checkpoint_as_interrupted(tmp_path, data_root):
    jobs = tmp_path / "jobs"
    m1 = manager(jobs, data_root, step_s=0.1)
    jid = m1.submit({"path": "Dataset001_Lab"}, settings={"iterations": 50})["job_id"]
    wait_step(m1, jid, 1)
    m1.close(stop_jobs=True, grace_s=20)
    view = m1.get(jid)
    assert view["state"] == "interrupted" and view["error"]["code"] == "server_shutdown"
    assert view["last"]["event"] == "stop"
    m2 = manager(jobs, data_root)
    try:
        assert m2.get(jid)["state"] == "interrupted"
        m2.resume(jid)
        assert wait_state(m2, jid, ("done",))["step"] == 50
    finally:
        m2.close()


def test_gpu_server_runs_a_job_per_free_gpu(tmp_path, data_root):
    m = manager(tmp_path / "jobs", data_root, step_s=0.1, gpus=2)
    try:
        a = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 10})["job_id"]
        b = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 10})["job_id"]
        c = m.submit({"path": "Dataset001_Lab"}, settings={"iterations": 2})["job_id"]
        wait_state(m, a, ("running",))
        wait_state(m, b, ("running",))
        wait_step(m, a, 1)
        wait_step(m, b, 1)
        assert m.get(c)["state"] == "queued"
        cuda = {json.loads(m.progress(j)["lines"][0]["message"])["cuda"] for j in (a, b)}
        assert cuda == {"0", "1"}
        assert "--device" in (argv := json.loads(m.progress(a)["lines"][0]["message"])["argv"])
        assert argv[argv.index("--device") + 1] == "cuda"
        wait_state(m, c, ("done",))
        # Several GPUs for one job: torchrun with one process per GPU.
        job = m._jobs[c]
        job.gpu_ids = [0, 1]
        cmd = m._command(job)
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        with pytest.raises(ApiError) as err:
            m.submit({"path": "Dataset001_Lab"}, settings={"gpus": 3})
        assert err.value.status == 422 and "2 GPU" in str(err.value)
    finally:
        m.close()


@pytest.mark.parametrize("labeled, settings, status, words", [
    ({"path": "../outside"}, {}, 403, "outside"),
    ({"path": "/etc"}, {}, 400, "absolute"),
    ({"path": "nowhere"}, {}, 404, "does not exist"),
    ({"path": "empty"}, {}, 422, "cannot be used"),
    ({"path": "unl"}, {}, 422, "no labeled case"),
    ({"upload_id": "0123456789abcdef0123"}, {}, 404, "unknown upload"),
    ({"file": "x"}, {}, 422, "upload_id"),
    ({"path": "Dataset001_Lab"}, {"iterations": 0}, 422, "at least 1"),
    ({"path": "Dataset001_Lab"}, {"run_dir": "/tmp/x"}, 422, "chosen by the server"),
    ({"path": "Dataset001_Lab"}, {"backbone": "huge"}, 422, "invalid choice"),
    ({"path": "Dataset001_Lab"}, {"gpus": 2}, 422, "CPU"),
])
def test_refused_submissions(tmp_path, data_root, labeled, settings, status, words):
    m = JobManager(tmp_path / "jobs", data_root=data_root, trainer=FAKE)
    with pytest.raises(ApiError) as err:
        m.submit(labeled, settings=settings)
    assert err.value.status == status and words in str(err.value), str(err.value)
    assert not any((tmp_path / "jobs" / "jobs").iterdir())  # nothing was queued


def test_unknown_job_and_data_root_off(tmp_path, data_root):
    m = JobManager(tmp_path / "jobs", trainer=FAKE)
    for call in (lambda: m.get("0123456789ab"), lambda: m.stop("../../etc"), lambda: m.progress("zz")):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status == 404 and err.value.code == "unknown_job"
    with pytest.raises(ApiError) as err:
        m.submit({"path": "Dataset001_Lab"})
    assert err.value.status == 403 and "--data-root" in str(err.value)


def test_one_service_per_jobs_folder(tmp_path, data_root):
    from sss_lib.errors import InputError

    first = JobManager(tmp_path / "jobs", data_root=data_root, trainer=FAKE)
    with pytest.raises(InputError, match=f"another SSS service \\(pid {os.getpid()}\\)"):
        JobManager(tmp_path / "jobs", data_root=data_root, trainer=FAKE)
    first.close()
    JobManager(tmp_path / "jobs", data_root=data_root, trainer=FAKE).close()  # free again once closed


def test_unfinished_uploads_are_cleared_at_start(tmp_path):
    jobs = tmp_path / "jobs"
    JobManager(jobs, trainer=FAKE).close()
    half = jobs / "uploads" / "0123456789abcdef01234567"
    (half / "data").mkdir(parents=True)  # extracted, but killed before upload.json
    (jobs / "uploads" / ".incoming" / "body-1").write_bytes(b"partial body")
    JobManager(jobs, trainer=FAKE).close()
    assert not half.exists() and not any((jobs / "uploads" / ".incoming").iterdir())


def test_job_from_an_upload_with_the_dataset_at_the_archive_root(tmp_path, data_root):
    import tarfile

    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:  # as the Slicer panel packs: the folder's content at the root
        for item in sorted((data_root / "Dataset001_Lab").iterdir()):
            tf.add(item, arcname=item.name)
    m = manager(tmp_path / "jobs", data_root)
    try:
        upload = m.uploads.add_archive(archive)
        assert upload["labeled"] == 2
        jid = m.submit({"upload_id": upload["upload_id"]}, settings={"iterations": 2})["job_id"]
        view = wait_state(m, jid, ("done",))
        assert view["name"] == f"upload-{upload['upload_id'][:8]}" and view["labeled"] == {"upload_id": upload["upload_id"]}
        argv = json.loads(m.progress(jid)["lines"][0]["message"])["argv"]
        assert argv[1] == m.uploads.get(upload["upload_id"])["path"]
    finally:
        m.close()
