"""SSSTrain's panel (SSSTrainWidget) driven through its buttons, without the Slicer application.

MRML is real (slicer-core) and so are the training processes (the stand-in trainer of
SSSTrainLib.fake_trainer, started and stopped for real). Qt is not available outside Slicer, so
the widgets are stand-ins built from the names in SSSTrain.ui (tests/slicer/panel_stubs.py). What is
checked is the panel's behaviour: which buttons are enabled when, what the status line says, that
the log, progress and curves follow the run, that a reopened panel finds its run again, and that a
second click while a step runs starts nothing.
"""

import os
import sys
import types
import unittest
from pathlib import Path

import pytest

from panel_stubs import REPO, FakeItem, FakeTimer, TrainPanel, flush, install_application, recorder as make_recorder

# A failing test must not leave a stand-in trainer running: tests/slicer/conftest.py.
pytestmark = pytest.mark.usefixtures("no_training_left_behind")


@pytest.fixture
def panel_factory(slicer_core, scene, monkeypatch, tmp_path):
    import slicer.util

    from SSSTrainLib import testing

    recorder = make_recorder(segment_parameters=types.SimpleNamespace(model="auto", taskModelPath=None))
    module = install_application(monkeypatch, slicer_core, "SSSTrain", recorder)
    monkeypatch.setattr(slicer.util, "getModuleLogic",
                        lambda name: types.SimpleNamespace(getParameterNode=lambda: recorder.segment_parameters))
    monkeypatch.setattr(module.SSSTrainLogic, "train_logic",
                        classmethod(lambda cls, entry=None: testing.fake_logic(sss_lib_root=str(REPO))))

    def make():
        panel = TrainPanel(module, recorder)
        panel.widget._dependenciesChecked = True  # torch & co. are this venv's
        return panel

    make.module = module
    yield make
    FakeTimer.pending.clear()


def test_train_stop_reopen_resume_and_use_the_model(panel_factory, scene, tmp_path):
    from SSSTrainLib import testing

    panel = panel_factory()
    ui = panel.ui
    assert not ui.labeledFolderPathLineEdit.visible and ui.casesListWidget.visible  # labeled cases from the scene
    assert [i.text if isinstance(i, FakeItem) else i for i in ui.casesListWidget.items][0].startswith("(no cases")

    nodes = testing.build_scene(scene)
    flush()
    items = ui.casesListWidget.items
    assert [i.text.split("  <-")[0] for i in items] == ["Case A (CT)", "Case B", "Case C"]
    assert [i.checkState() for i in items] == [2, 2, 0], "Case C was left out in the scene"
    items[1].setCheckState(0)
    ui.casesListWidget.emit("itemChanged(QListWidgetItem*)", items[1])
    assert nodes["seg_b"].GetAttribute("SSSTrain.Excluded") == "1"
    items[1].setCheckState(2)
    ui.casesListWidget.emit("itemChanged(QListWidgetItem*)", items[1])

    panel.pn().unlabeledSource = "scene"
    flush()
    assert len(ui.casesListWidget.items) == 4 and ui.casesListWidget.items[-1].text.endswith("(unlabeled)")

    ui.checkDataButton.emit("clicked(bool)")
    assert "2 labeled case(s); classes 1 liver, 2 tumour" in ui.dataSummaryLabel.text

    run_dir = str(tmp_path / "run")
    panel.pn().runFolder = Path(run_dir)
    panel.pn().iterations = 40
    panel.pn().warmupIterations = 5
    flush()
    assert ui.startButton.enabled and not ui.stopButton.enabled and not ui.resumeButton.enabled
    assert not ui.useModelButton.enabled

    ui.startButton.emit("clicked(bool)")
    assert not panel.recorder.errors, panel.recorder.errors
    assert not ui.startButton.enabled and ui.stopButton.enabled
    panel.poll_until(lambda: ui.statusLabel.text.startswith("Step ") and ui.progressBar.value > 0)
    assert "ETA" in ui.statusLabel.text
    panel.poll_until(lambda: ui.validationLabel.text.startswith("Validation at step"))
    assert ui.curvesLabel.pixmap is not None and ui.curvesLabel.pixmap.path == os.path.join(run_dir, "curves.png")
    assert any(line.startswith("starting: 40 steps") for line in ui.logTextEdit.lines)

    ui.stopButton.emit("clicked(bool)")
    assert ui.stopButton.text == "Kill"
    panel.poll_until(lambda: panel.widget._monitor is None)
    assert ui.statusLabel.text.startswith("Training stopped at step") and "Resume" in ui.statusLabel.text
    assert ui.startButton.enabled and ui.resumeButton.enabled and not ui.stopButton.enabled
    assert ui.stopButton.text == "Stop"

    # Slicer restarted: a new panel on the same scene shows the run folder's state.
    reopened = panel_factory()
    rui = reopened.ui
    assert rui.statusLabel.text.startswith("This folder holds a run, last at step") and "'Resume' continues it." in rui.statusLabel.text
    assert rui.resumeButton.enabled and rui.curvesLabel.pixmap is not None

    rui.resumeButton.emit("clicked(bool)")
    reopened.poll_until(lambda: reopened.widget._monitor is None)
    assert rui.statusLabel.text.startswith("Training finished at step 40"), rui.statusLabel.text
    assert rui.progressBar.value == 1000 and rui.useModelButton.enabled

    rui.useModelButton.emit("clicked(bool)")
    assert reopened.recorder.selected == ["SSSSegment"]
    params = reopened.recorder.segment_parameters
    assert str(params.taskModelPath) == os.path.join(run_dir, "model.ssstask") and params.model == "task model (file)"

    rui.copyCommandButton.emit("clicked(bool)")
    text = reopened.recorder.clipboard[-1]
    assert "python -m sss_lib train --labeled" in text and "torchrun --nproc_per_node 2 -m sss_lib train" in text

    # Start in a used folder asks first; Cancel leaves everything as it was.
    reopened.recorder.confirm_answer = False
    rui.startButton.emit("clicked(bool)")
    assert "earlier run" in reopened.recorder.confirms[-1] and reopened.widget._monitor is None
    assert os.path.isfile(os.path.join(run_dir, "model.ssstask"))


def test_a_reopened_panel_follows_and_stops_a_running_run(panel_factory, scene, tmp_path):
    from SSSTrainLib import testing

    testing.build_scene(scene)
    panel = panel_factory()
    panel.pn().runFolder = Path(tmp_path / "run")
    panel.pn().iterations = 5000
    panel.pn().warmupIterations = 5
    flush()
    panel.ui.startButton.emit("clicked(bool)")
    panel.poll_until(lambda: panel.ui.statusLabel.text.startswith("Step "))
    panel.widget.cleanup()  # the module panel is closed; the run goes on

    reopened = panel_factory()
    ui = reopened.ui
    assert reopened.widget._monitor is not None and not reopened.widget._monitor.owned
    assert ui.statusLabel.text == "Following the run in this folder (started earlier)." or ui.statusLabel.text.startswith("Step ")
    assert ui.stopButton.enabled and not ui.startButton.enabled and not ui.resumeButton.enabled
    reopened.poll_until(lambda: ui.statusLabel.text.startswith("Step "))
    ui.stopButton.emit("clicked(bool)")
    reopened.poll_until(lambda: reopened.widget._monitor is None)
    assert ui.statusLabel.text.startswith("Training stopped at step") and ui.resumeButton.enabled


def test_errors_are_shown_with_what_to_do(panel_factory, scene):
    panel = panel_factory()
    panel.ui.startButton.emit("clicked(bool)")
    assert panel.recorder.errors and "Choose a run folder" in panel.recorder.errors[-1]
    assert panel.ui.statusLabel.text == panel.recorder.errors[-1] and panel.widget._monitor is None


def test_old_slicer_gets_the_upgrade_message(panel_factory, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    panel = panel_factory()
    ui = panel.ui
    assert ui.versionWarningLabel.visible and "5.10" in ui.versionWarningLabel.text
    assert not ui.dataCollapsibleButton.enabled and not ui.trainingCollapsibleButton.enabled and not ui.runCollapsibleButton.enabled


def test_self_test_runs_as_ctest_runs_it(panel_factory):
    """ctest (slicer.testing.runUnitTest) loads SSSTrainTest with unittest: every test_* method on a
    fresh instance, with setUp and tearDown, not through runTest."""
    suite = unittest.TestLoader().loadTestsFromTestCase(panel_factory.module.SSSTrainTest)
    names = sorted(t._testMethodName for t in suite)
    assert names == ["test_class_values", "test_copy_command", "test_export_scene_cases", "test_failure",
                     "test_reattach", "test_start_stop_resume_use_model", "test_status_text",
                     "test_train_phantoms_then_auto_segment"]
    # The real training (minutes on a CPU) runs in tests/slicer/test_self_tests.py; the rest here.
    quick = unittest.TestSuite(t for t in suite if t._testMethodName != "test_train_phantoms_then_auto_segment")
    result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(quick)
    assert result.wasSuccessful(), result.failures + result.errors


def test_a_second_click_while_a_step_runs_starts_nothing(panel_factory, scene, tmp_path, monkeypatch):
    """Qt delivers clicks queued while the export pumps events (processEvents): none of them may start
    a second export, run or check, so no export deletes a folder another export is writing."""
    import slicer

    from SSSTrainLib import testing

    testing.build_scene(scene)
    panel = panel_factory()
    ui = panel.ui
    run_dir = tmp_path / "run"
    panel.pn().runFolder = Path(run_dir)
    panel.pn().iterations = 5000
    panel.pn().warmupIterations = 5
    flush()
    launched = []
    real_launch = panel.module.SSSTrainLogic.train_logic().__class__._launch

    def counting_launch(self, *args, **kwargs):
        launched.append(args)
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(panel.module.SSSTrainLogic.train_logic().__class__, "_launch", counting_launch)
    seen = []

    def process_events():  # what the user clicked while the export ran
        seen.append({name: getattr(ui, name).enabled for name in panel.module.BUSY_WIDGETS})
        for name in ("startButton", "copyCommandButton", "checkDataButton", "resumeButton", "useModelButton"):
            getattr(ui, name).emit("clicked(bool)", False)  # even a click Qt still delivers does nothing

    monkeypatch.setattr(slicer.app, "processEvents", process_events)
    summary_before = ui.dataSummaryLabel.text
    ui.startButton.click()
    assert seen, "the export reports progress through processEvents"
    assert all(not any(state.values()) for state in seen), "every busy widget is disabled while the export runs"
    assert len(launched) == 1, f"{len(launched)} training processes started"
    assert ui.dataSummaryLabel.text == summary_before, "Check data ran during the export"
    assert not panel.recorder.clipboard, "Copy command (a second export) ran during the export"
    dataset = run_dir / "dataset"
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["Case-A-CT_0000.nii.gz", "Case-B_0000.nii.gz"]
    # The run goes on; the busy state ended with the step: the panel is usable again.
    assert not panel.widget._busy.active and ui.stopButton.enabled and ui.refreshCasesButton.enabled
    assert ui.runFolderPathLineEdit.enabled and ui.checkDataButton.enabled
    ui.stopButton.emit("clicked(bool)")
    panel.poll_until(lambda: panel.widget._monitor is None)


def test_every_ending_of_a_step_ends_the_busy_state(panel_factory, scene, tmp_path, monkeypatch):
    """Failed (bad settings), declined (confirmation), exception inside the export: the buttons come back."""
    from SSSTrainLib import testing

    testing.build_scene(scene)
    panel = panel_factory()
    ui = panel.ui
    ui.startButton.click()  # no run folder: an error
    assert panel.recorder.errors and "Choose a run folder" in panel.recorder.errors[-1]
    assert not panel.widget._busy.active and ui.startButton.enabled and ui.checkDataButton.enabled

    panel.pn().runFolder = Path(tmp_path / "run")
    flush()

    def broken_export(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("SSSTrainLib.logic.export_scene_cases", broken_export)
    ui.copyCommandButton.click()
    assert "disk full" in panel.recorder.errors[-1]
    assert not panel.widget._busy.active and ui.copyCommandButton.enabled and ui.startButton.enabled

    ui.checkDataButton.click()
    assert "2 labeled case(s)" in ui.dataSummaryLabel.text and ui.checkDataButton.enabled
