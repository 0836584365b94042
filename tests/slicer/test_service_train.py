"""SSS Train with "Compute on: server": the panel (Qt stand-ins, real MRML) exports the scene cases,
uploads them to a real SSS service (``python -m sss_lib serve`` with its own jobs folder) and
follows the training job there by polling; Stop and Resume go to the job; curves.png and
model.ssstask come back into the local run folder, so "Use this model" works as for a local run, and
a reopened panel shows the job again. The trainer is the real one; to take seconds, not hours, on a
CPU the job also asks for SAM-2.1 tiny at random init, 64 px, one thread and tiny batches (train
options the panel does not show, added to what it sends).
"""

import os
import sys
import types
from pathlib import Path

import pytest

from panel_stubs import REPO, FakeTimer, TrainPanel, flush, install_application, recorder as make_recorder

pytestmark = pytest.mark.usefixtures("no_training_left_behind")

FAST = {"random_init": True, "image_size": 64, "threads": 1, "labeled_batch": 2, "decoder_batch": 2,
        "unlabeled_batch": 2, "checkpoint_every": 2, "val_every": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory, kill_trainers):
    """A service with its own jobs folder, reached as a server (URL + token)."""
    from sss_lib.service.local import LocalService

    jobs = tmp_path_factory.mktemp("jobs")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    service = LocalService(["--device", "cpu", "--jobs-dir", str(jobs)], python=sys.executable, env=env)
    service.start().wait_ready(300)
    yield service
    service.stop()
    kill_trainers(jobs)  # trainers run in their own sessions: leave none behind


@pytest.fixture
def panel_factory(slicer_core, scene, monkeypatch, server):
    import slicer.util

    from SSSSegmentLib import service_link
    from SSSTrainLib import remote

    real_settings = remote.job_settings
    monkeypatch.setattr(remote, "job_settings", lambda settings: dict(real_settings(settings), **FAST))

    recorder = make_recorder(segment_parameters=types.SimpleNamespace(model="auto", taskModelPath=None))
    service_link.write_settings(types.SimpleNamespace(setValue=recorder.settings.__setitem__),
                                service_link.ComputeSettings(service_link.SERVER, server.url, server.token))
    module = install_application(monkeypatch, slicer_core, "SSSTrain", recorder)
    monkeypatch.setattr(slicer.util, "getModuleLogic",
                        lambda name: types.SimpleNamespace(getParameterNode=lambda: recorder.segment_parameters))

    def make():
        # The real trainer behind a real service: slower than the stand-in trainer, so poll less often.
        return TrainPanel(module, recorder, poll_timeout=600.0, poll_interval=0.2)

    yield make
    FakeTimer.pending.clear()


def test_a_server_job_is_submitted_followed_stopped_resumed_and_its_model_used(panel_factory, scene, tmp_path, server):
    from SSSTrainLib import remote, testing

    testing.build_scene(scene)
    panel = panel_factory()
    ui = panel.ui
    assert ui.computeOnComboBox.currentText == "server" and ui.serverUrlLineEdit.text == server.url
    run_dir = tmp_path / "run"
    panel.pn().runFolder = Path(run_dir)
    panel.pn().backbone = "sam2.1_hiera_tiny"
    panel.pn().iterations = 12
    panel.pn().warmupIterations = 2
    flush()

    ui.startButton.click()
    assert not panel.recorder.errors, panel.recorder.errors
    job = remote.read_job(str(run_dir))
    assert job is not None and job.url == server.url and "token" not in open(remote.job_path(str(run_dir))).read()
    assert ui.statusLabel.text == f"Training job {job.job_id} submitted to {server.url}."
    assert not ui.startButton.enabled and ui.stopButton.enabled and not panel.widget._busy.active
    assert (run_dir / "dataset" / "dataset.json").is_file(), "the scene cases are exported into the run folder"

    panel.poll_until(lambda: ui.statusLabel.text.startswith("Step "))
    assert "ETA" in ui.statusLabel.text and ui.progressBar.value >= 0
    ui.stopButton.click()
    assert ui.stopButton.text == "Kill"
    panel.poll_until(lambda: panel.widget._monitor is None)
    assert ui.statusLabel.text.startswith("Training stopped at step"), ui.statusLabel.text
    assert ui.resumeButton.enabled and ui.startButton.enabled and not ui.stopButton.enabled
    stopped_at = int(ui.statusLabel.text.split("step ")[1].split()[0])
    assert 0 < stopped_at < 12

    # Slicer restarted: the reopened panel asks the server and offers Resume.
    reopened = panel_factory()
    rui = reopened.ui
    assert f"It is job {job.job_id} on the SSS server {server.url}." in rui.statusLabel.text
    assert rui.resumeButton.enabled and reopened.widget._monitor is None
    rui.resumeButton.click()
    assert not reopened.recorder.errors, reopened.recorder.errors
    assert reopened.widget._monitor is not None and rui.stopButton.enabled
    reopened.poll_until(lambda: reopened.widget._monitor is None, timeout=1200)
    assert rui.statusLabel.text.startswith("Training finished at step 12"), rui.statusLabel.text
    assert rui.progressBar.value == 1000
    assert (run_dir / "model.ssstask").is_file() and (run_dir / "curves.png").is_file()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rui.useModelButton.click()
    assert reopened.recorder.selected == ["SSSSegment"]
    assert str(reopened.recorder.segment_parameters.taskModelPath) == str(run_dir / "model.ssstask")
    from sss_lib.task_model import load_task_model

    model = load_task_model(str(run_dir / "model.ssstask"))
    assert [c.name for c in model.classes] == ["liver", "tumour"]
