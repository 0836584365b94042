"""SSSTrain's logic on real MRML (slicer-core): scene cases -> nnU-Net dataset, and whole runs of a
stand-in trainer that follows the run contract (start, progress, stop, resume, re-attach, failure,
"Copy command", "Use this model"). The same scenarios run inside Slicer as SSSTrainTest."""

import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# A failing test must not leave a stand-in trainer running: tests/slicer/conftest.py.
pytestmark = pytest.mark.usefixtures("no_training_left_behind")


@pytest.fixture
def logic():
    from SSSTrainLib import testing

    return testing.fake_logic(sss_lib_root=str(REPO))


def test_scene_cases_export_to_an_exact_nnunet_dataset(scene, logic, tmp_path):
    from SSSTrainLib import testing

    testing.scenario_export_scene_cases(scene, logic, str(tmp_path / "run"))


def test_class_values_follow_sss_segment_labels(scene):
    from SSSTrainLib import testing

    testing.scenario_class_values_follow_sss_tags(scene)


def test_start_stop_resume_and_use_the_model(scene, logic, tmp_path):
    from SSSSegmentLib import constants as segment_constants
    from SSSTrainLib import testing

    segment_parameters = types.SimpleNamespace(model="auto", taskModelPath=None)
    testing.scenario_train_stop_resume(scene, logic, str(tmp_path / "run"), segment_parameters,
                                       segment_constants.TASK_MODEL_CHOICE)


def test_a_reopened_panel_reattaches_to_a_running_run(scene, tmp_path):
    from SSSTrainLib import testing

    testing.scenario_reattach(scene, lambda: testing.fake_logic(sss_lib_root=str(REPO)), str(tmp_path / "run"))


def test_a_failing_run_reports_its_error(logic, tmp_path):
    from SSSTrainLib import testing

    testing.scenario_failure_is_reported(logic, str(tmp_path / "run"), str(tmp_path / "no such data"))


def test_copy_command_gives_plain_and_torchrun_lines(scene, logic, tmp_path):
    from SSSTrainLib import testing

    testing.scenario_copy_command(scene, logic, str(tmp_path / "run"))


def test_no_selected_scene_case_says_what_to_do(scene, logic, tmp_path):
    import numpy as np
    import slicer.util

    from SSSTrainLib import testing
    from SSSTrainLib.errors import SceneDataError

    slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.int16), name="lonely")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "floating")
    seg.GetSegmentation().AddEmptySegment("", "tumour")  # no reference volume: cannot pair
    with pytest.raises(SceneDataError, match="floating"):
        logic.prepare_data(testing.scene_settings(str(tmp_path / "run")), scene)
    with pytest.raises(SceneDataError, match="No labeled case"):
        logic.check_data(testing.scene_settings(str(tmp_path / "run")), scene)


def test_check_data_summarises_scene_and_folders(scene, logic, tmp_path):
    from SSSTrainLib import constants as C
    from SSSTrainLib import testing

    testing.build_scene(scene)
    summary = logic.check_data(testing.scene_settings(str(tmp_path / "run")), scene)
    assert "2 labeled case(s); classes 1 liver, 2 tumour" in summary and "1 unlabeled volume(s)" in summary
    logic.prepare_data(testing.scene_settings(str(tmp_path / "run")), scene)
    folder = testing.scene_settings(str(tmp_path / "run2"))
    folder.labeled_source, folder.labeled_folder = C.SOURCE_FOLDER, str(tmp_path / "run" / "dataset")
    folder.unlabeled_source, folder.unlabeled_folder = C.SOURCE_FOLDER, str(tmp_path / "run" / "unlabeled")
    summary = logic.check_data(folder, scene)
    assert "2 labeled" in summary and "1 unlabeled" in summary, summary


def test_export_refuses_to_replace_a_folder_it_did_not_write(scene, logic, tmp_path):
    from SSSTrainLib import testing
    from SSSTrainLib.errors import SceneDataError

    testing.build_scene(scene)
    (tmp_path / "run" / "dataset").mkdir(parents=True)
    (tmp_path / "run" / "dataset" / "mine.txt").write_text("user data")
    with pytest.raises(SceneDataError, match="not written by SSS Train"):
        logic.prepare_data(testing.scene_settings(str(tmp_path / "run")), scene)
    assert (tmp_path / "run" / "dataset" / "mine.txt").read_text() == "user data"
