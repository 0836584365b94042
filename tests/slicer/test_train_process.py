"""SSSTrain's GUI-free parts: the training-process runner (progress, log, stop) and the dataset check."""

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "SSSTrain") not in sys.path:
    sys.path.insert(0, str(REPO / "SSSTrain"))

# A stand-in for `python -m sss_lib train`: reports progress, logs, honours the stop file.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    stop = os.environ["SSS_STOP_FILE"]
    steps = int(sys.argv[1])
    for i in range(steps):
        if os.path.exists(stop):
            print("stopping at step", i, flush=True)
            sys.exit(0)
        print("SSS_PROGRESS " + json.dumps({"fraction": (i + 1) / steps, "message": f"step {i + 1}/{steps}"}), flush=True)
        print(f"loss {1.0 / (i + 1):.3f}", flush=True)
        time.sleep(0.05)
    sys.exit(int(sys.argv[2]))
""")
STUBBORN = "import time\nprint('working', flush=True)\ntime.sleep(60)\n"


def test_progress_and_log_lines_reach_the_main_thread():
    from SSSTrainLib import process

    messages = process.ProcessRun([sys.executable, "-c", CHILD, "4", "0"]).start().wait(30)
    progress = [m for m in messages if m.kind == process.PROGRESS]
    assert [m.fraction for m in progress] == [0.25, 0.5, 0.75, 1.0]
    assert progress[-1].text == "step 4/4"
    assert [m.text for m in messages if m.kind == process.LOG] == ["loss 1.000", "loss 0.500", "loss 0.333", "loss 0.250"]
    assert messages[-1].kind == process.FINISHED and messages[-1].returncode == 0 and not messages[-1].stopped


def test_failure_exit_code_is_reported():
    from SSSTrainLib import process

    messages = process.ProcessRun([sys.executable, "-c", CHILD, "1", "3"]).start().wait(30)
    assert messages[-1].returncode == 3


def test_stop_file_stops_the_child_cleanly():
    from SSSTrainLib import process

    run = process.ProcessRun([sys.executable, "-c", CHILD, "1000", "0"]).start()
    first = []
    while not any(m.kind == process.PROGRESS for m in first):
        first += run.poll()
    run.stop()
    messages = first + run.wait(30)
    assert messages[-1].stopped and messages[-1].returncode == 0
    assert any(m.text.startswith("stopping at step") for m in messages)
    assert len([m for m in messages if m.kind == process.PROGRESS]) < 1000


def test_a_child_ignoring_the_stop_file_is_terminated_after_the_grace_period():
    from SSSTrainLib import process

    run = process.ProcessRun([sys.executable, "-c", STUBBORN]).start()
    while not run.poll(grace_seconds=0.2) and not run.finished:
        pass
    run.stop()
    messages = run.wait(20, grace_seconds=0.2)
    assert messages[-1].stopped and messages[-1].returncode != 0


def test_malformed_progress_lines_stay_log_text():
    from SSSTrainLib import process

    assert process.parse_line("SSS_PROGRESS {not json").kind == process.LOG
    msg = process.parse_line('SSS_PROGRESS {"fraction": 1.7, "message": "x"}\n')
    assert msg.kind == process.PROGRESS and msg.fraction == 1.0


@pytest.fixture
def nnunet_dataset(tmp_path):
    import json

    import SimpleITK as sitk

    root = tmp_path / "Dataset001_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for case in ("toy_001", "toy_002"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.uint8)), str(root / "labelsTr" / f"{case}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(root / "imagesTs" / "toy_101_0000.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 2, "file_ending": ".nii.gz",
    }))
    return root


def test_dataset_check_summarises_cases_and_classes(nnunet_dataset):
    from SSSTrainLib.logic import DatasetError, TrainLogic

    logic = TrainLogic(python=sys.executable)
    summary = logic.check_dataset(str(nnunet_dataset))
    assert "3 cases, 2 labeled, 1 unlabeled" in summary and "1 liver" in summary
    with pytest.raises(DatasetError, match="not found"):
        logic.check_dataset(str(nnunet_dataset / "missing"))
    with pytest.raises(DatasetError, match="Select the dataset"):
        logic.check_dataset("")


def test_training_command_waits_for_sss_lib_train(nnunet_dataset, tmp_path):
    from SSSTrainLib.logic import TrainingUnavailableError, TrainLogic, TrainSettings

    logic = TrainLogic(python=sys.executable)
    settings = TrainSettings(dataset=str(nnunet_dataset), output=str(tmp_path / "toy.ssstask"), iterations=10)
    if "train" in logic.sss_lib_commands():
        args = logic.train_command(settings)
        assert args[:4] == [sys.executable, "-m", "sss_lib", "train"] and "--output" in args
    else:
        with pytest.raises(TrainingUnavailableError, match="no 'train' command"):
            logic.train_command(settings)
