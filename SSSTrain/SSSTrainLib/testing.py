"""Test scenarios shared by pytest (tests/slicer, on slicer-core's real MRML classes) and the
module's self-test (SSSTrainTest, inside Slicer). Each scenario raises AssertionError on failure.

MRML is real in both places. :func:`scenario_train_phantoms_then_auto_segment` is what a user does:
a short real training (``python -m sss_lib train`` on LiteMedSAM, whose weights ship with the
extension's packages) on tiny cardiac phantoms put in the scene, then "Use this model" and
Auto-segment in SSS Segment through the SSS service. The run-control scenarios use
:mod:`SSSTrainLib.fake_trainer`, a stand-in for ``python -m sss_lib train`` that follows the run
contract (JSON lines, run folder, stop file, --resume), started exactly as the real one would be.
Nothing here needs ``slicer.app`` or Qt.
"""

import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import constants as C
from . import monitor as M
from .errors import RunFolderError, SceneDataError
from .logic import TrainLogic
from .settings import TrainSettings, train_arguments

FAKE_TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_trainer.py")


STEP_ENV = "SSS_FAKE_STEP_S"  # seconds per step of the stand-in trainer


def fake_logic(python: str = sys.executable, sss_lib_root: Optional[str] = None,
               base_env: Optional[Dict[str, str]] = None, step_s: float = 0.03) -> TrainLogic:
    """A TrainLogic whose training command runs the stand-in trainer (``step_s`` seconds a step)."""
    return TrainLogic(python=python, sss_lib_root=sss_lib_root, entry=[python, FAKE_TRAINER], base_env=base_env,
                      extra_env={STEP_ENV: str(step_s)})


# -- scene fixtures -----------------------------------------------------------------------------------


def _add_volume(name: str, shape: Tuple[int, int, int], spacing: Tuple[float, float, float], seed: int) -> Any:
    import slicer.util

    rng = np.random.default_rng(seed)
    voxels = rng.integers(-1000, 400, size=shape).astype(np.int16)
    node = slicer.util.addVolumeFromArray(voxels, name=name)
    node.SetSpacing(*spacing)
    node.SetOrigin(-12.5, 30.0, 7.25)
    return node


def _add_segmentation(scene: Any, volume: Any, name: str, masks: List[Tuple[str, np.ndarray]]) -> Any:
    """A segmentation as the Segment Editor makes it: reference geometry = the volume, same transform."""
    import slicer.util

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    transform = volume.GetParentTransformNode()
    seg.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segment_name, mask in masks:
        sid = seg.GetSegmentation().AddEmptySegment("", segment_name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, volume)
    return seg


def build_scene(scene: Any) -> Dict[str, Any]:
    """Three labeled cases (one oblique under a parent transform, one left out by the user), one
    unlabeled volume and a label map (not an image). Returns the nodes and the expected masks."""
    from SSSSegmentLib import testing as segment_testing

    shape = (6, 20, 24)
    k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    liver_a = (i > 3) & (i < 14) & (j > 2) & (j < 12) & (k >= 1) & (k <= 4)
    tumour_a = (i > 15) & (i < 21) & (j > 10) & (j < 17) & (k >= 2) & (k <= 3)
    tumour_b = ((i - 12) ** 2 + (j - 9) ** 2 <= 16) & (k >= 2)

    a = _add_volume("Case A (CT)", shape, (0.8, 0.8, 2.5), seed=1)
    seg_a = _add_segmentation(scene, a, "Case A segmentation", [("liver", liver_a), ("tumour", tumour_a)])
    b = _add_volume("Case B", shape, (0.7, 0.75, 3.0), seed=2)
    segment_testing.make_oblique_with_transform(scene, b)
    seg_b = _add_segmentation(scene, b, "Case B segmentation", [("tumour", tumour_b)])
    c = _add_volume("Case C", shape, (1.0, 1.0, 1.0), seed=3)
    seg_c = _add_segmentation(scene, c, "Case C segmentation", [("liver", liver_a)])
    from .scene_cases import set_included

    set_included(seg_c, False)
    u = _add_volume("Unlabeled 1", shape, (0.8, 0.8, 2.5), seed=4)
    import slicer.util

    label = slicer.util.addVolumeFromArray(np.zeros(shape, np.uint8), name="a label map", nodeClassName="vtkMRMLLabelMapVolumeNode")
    return {"a": a, "seg_a": seg_a, "b": b, "seg_b": seg_b, "c": c, "seg_c": seg_c, "unlabeled": u, "labelmap": label,
            "masks": {"Case-A-CT": {"liver": liver_a, "tumour": tumour_a}, "Case-B": {"tumour": tumour_b}}}


def scene_settings(run_dir: str, iterations: int = 40, unlabeled: str = C.SOURCE_SCENE) -> TrainSettings:
    return TrainSettings(run_dir=run_dir, labeled_source=C.SOURCE_SCENE, unlabeled_source=unlabeled,
                         iterations=iterations, warmup_iterations=3, lambda_u=0.5, confidence=0.9, ema_decay=0.995,
                         pcsw=False, seed=7)


# -- scenarios ---------------------------------------------------------------------------------------


def scenario_export_scene_cases(scene: Any, logic: TrainLogic, run_dir: str) -> None:
    """The scene's cases become an nnU-Net v2 raw dataset that sss_lib reads, voxel- and geometry-exact."""
    from SSSSegmentLib.geometry import sss_volume_from_node
    from sss_lib.datasets import open_dataset
    from sss_lib.volume_io import read_volume

    nodes = build_scene(scene)
    labeled, unlabeled = logic.scene_cases(scene)
    assert [c.case_id for c in labeled] == ["Case-A-CT", "Case-B", "Case-C"], [c.case_id for c in labeled]
    assert [c.included for c in labeled] == [True, True, False]
    assert [c.volume.GetName() for c in unlabeled] == ["Unlabeled 1"], "label maps and paired volumes are not unlabeled cases"

    report = logic.prepare_data(scene_settings(run_dir), scene)
    assert report is not None and report.labeled == ["Case-A-CT", "Case-B"] and report.unlabeled == ["Unlabeled-1"]
    dataset = os.path.join(run_dir, C.SCENE_DATASET_DIR)
    with open(os.path.join(dataset, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["labels"] == {"background": 0, "liver": 1, "tumour": 2}, meta["labels"]
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz" and meta["channel_names"] == {"0": "CT"}
    assert sorted(os.listdir(os.path.join(dataset, "imagesTr"))) == ["Case-A-CT_0000.nii.gz", "Case-B_0000.nii.gz"]
    assert sorted(os.listdir(os.path.join(dataset, "labelsTr"))) == ["Case-A-CT.nii.gz", "Case-B.nii.gz"]

    cases = open_dataset(dataset)
    assert cases.layout == "nnunet" and [c.case_id for c in cases.labeled] == ["Case-A-CT", "Case-B"]
    assert cases.class_names == {1: "liver", 2: "tumour"} and cases.modality == "CT"
    for case, volume_node in zip(cases.labeled, (nodes["a"], nodes["b"])):
        image = read_volume(case.image_path)
        label = read_volume(case.label_path)
        expected = sss_volume_from_node(volume_node)
        assert np.array_equal(image.voxels, expected.voxels), case.case_id
        for written in (image, label):
            assert np.allclose(written.spacing, expected.spacing, atol=1e-5), (case.case_id, written.spacing)
            assert np.allclose(written.origin, expected.origin, atol=1e-4), (case.case_id, written.origin)
            assert np.allclose(written.direction, expected.direction, atol=1e-6), case.case_id
        values = {"liver": 1, "tumour": 2}
        masks = nodes["masks"][case.case_id]
        want = np.zeros(expected.voxels.shape, np.uint8)
        for name, mask in masks.items():
            want[mask] = values[name]
        assert np.array_equal(label.voxels, want), f"{case.case_id}: label map differs from the segments"
    assert "Case-B: no voxels of liver" in report.summary()
    unlabeled_files = os.listdir(os.path.join(run_dir, C.SCENE_UNLABELED_DIR))
    assert sorted(f for f in unlabeled_files if not f.startswith(".")) == ["Unlabeled-1.nii.gz"]

    # A segmentation under another transform than its volume cannot share its voxel grid: refused.
    nodes["seg_b"].SetAndObserveTransformNodeID(None)
    try:
        logic.prepare_data(scene_settings(run_dir), scene)
    except SceneDataError as e:
        assert "different transforms" in str(e), str(e)
    else:
        raise AssertionError("a segmentation under another transform than its volume was exported")


def scenario_class_values_follow_sss_tags(scene: Any) -> None:
    """Segments SSS Segment made keep their class labels as dataset values; a segment named
    background is refused."""
    from .scene_cases import SEGMENT_LABEL_TAG, class_table, find_scene_cases

    nodes = build_scene(scene)
    segments = [nodes["seg_a"].GetSegmentation().GetNthSegment(n) for n in range(2)]
    segments[0].SetTag(SEGMENT_LABEL_TAG, "4")  # liver
    segments[1].SetTag(SEGMENT_LABEL_TAG, "7")  # tumour
    nodes["seg_b"].GetSegmentation().GetNthSegment(0).SetTag(SEGMENT_LABEL_TAG, "7")
    labeled, _ = find_scene_cases(scene)
    included = [c for c in labeled if c.included]
    assert class_table(included) == {4: "liver", 7: "tumour"}, class_table(included)
    nodes["seg_b"].GetSegmentation().GetNthSegment(0).SetTag(SEGMENT_LABEL_TAG, "5")  # disagrees: renumbered
    assert class_table(included) == {1: "liver", 2: "tumour"}
    nodes["seg_a"].GetSegmentation().GetNthSegment(0).SetName("Background")
    try:
        class_table(included)
    except SceneDataError as e:
        assert "background" in str(e).lower()
    else:
        raise AssertionError("a segment named background was accepted")


def wait_for(monitor: M.RunMonitor, until: Callable[[List[M.RunMessage]], bool], timeout: float = 60.0
             ) -> List[M.RunMessage]:
    """Poll ``monitor`` until ``until(all messages so far)`` or the run finishes."""
    messages: List[M.RunMessage] = []
    deadline = time.monotonic() + timeout
    while True:
        messages += monitor.poll()
        if until(messages) or monitor.finished:
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last messages: {[(m.kind, m.text or m.record) for m in messages[-5:]]}")
        time.sleep(0.02)


def _events(messages: List[M.RunMessage], event: str) -> List[Any]:
    return [m.record for m in messages if m.kind == M.EVENT and m.record.event == event]


def _steps_at_least(n: int) -> Callable[[List[M.RunMessage]], bool]:
    return lambda messages: any(r.step >= n for r in _events(messages, "step"))


def scenario_train_stop_resume(scene: Any, logic: TrainLogic, run_dir: str, segment_parameters: Any,
                               task_model_choice: str) -> None:
    """Start -> progress -> Stop (clean checkpoint) -> Resume (same step onwards) -> done ->
    curves and model -> "Use this model" points SSS Segment at the model."""
    build_scene(scene)
    logic.extra_env[STEP_ENV] = "0.03"
    monitor = logic.start(scene_settings(run_dir, iterations=60), scene)
    assert monitor.owned and monitor.alive()
    messages = wait_for(monitor, _steps_at_least(6))
    assert not monitor.finished, "the run ended before it was stopped"
    assert _events(messages, "start"), "no start record"
    step = _events(messages, "step")[-1]
    assert step.total_steps == 60 and M.fraction(step) == step.step / 60
    assert "ETA" in M.describe(step)
    with open(os.path.join(run_dir, C.CONFIG_FILE)) as f:
        config = json.load(f)
    assert config["labeled"] == ["Case-A-CT", "Case-B"] and config["unlabeled"] == ["Unlabeled-1"]
    assert config["args"]["lambda_u"] == 0.5 and config["args"]["no_pcsw"] and not config["args"]["no_dfe"]
    assert config["args"]["seed"] == 7 and config["args"]["ema_decay"] == 0.995

    monitor.stop()
    messages += wait_for(monitor, lambda m: False)
    end = messages[-1]
    assert end.kind == M.FINISHED and end.outcome == M.STOPPED and end.returncode == 0, (end.outcome, end.text)
    stopped_at = _events(messages, "stop")[-1].step
    assert stopped_at < 60 and "Resume" in end.text
    status = logic.run_status(run_dir)
    assert status.can_resume and not status.running and status.has_run
    try:
        logic.start(scene_settings(run_dir, iterations=60), scene)
    except RunFolderError:
        pass
    else:
        raise AssertionError("Start in a folder with a run must ask first")

    logic.extra_env[STEP_ENV] = "0.005"
    monitor = logic.resume(run_dir)
    assert "--resume" in monitor.state.command and monitor.state.resumed
    messages = wait_for(monitor, lambda m: False)
    end = messages[-1]
    assert end.outcome == M.DONE and end.returncode == 0, (end.outcome, end.text, [m.text for m in messages if m.kind == M.LOG])
    first = _events(messages, "step")[0]
    assert first.step == stopped_at + 1, (first.step, stopped_at)
    assert _events(messages, "start")[0].step == stopped_at
    assert monitor.curves_update() == os.path.join(run_dir, C.CURVES_FILE)
    assert monitor.curves_update() is None, "unchanged curves must not be reloaded"

    path = logic.hand_over_model(run_dir, segment_parameters, task_model_choice)
    assert path == os.path.join(run_dir, C.MODEL_FILE) and os.path.isfile(path)
    assert str(segment_parameters.taskModelPath) == path and segment_parameters.model == task_model_choice

    archived = logic.archive_previous_run(run_dir)
    assert os.path.isfile(os.path.join(archived, C.MODEL_FILE)) and not logic.run_status(run_dir).has_run


def scenario_reattach(scene: Any, make_logic: Callable[[], TrainLogic], run_dir: str) -> None:
    """A reopened panel (a new logic, no process handle) finds the run still going, follows its
    progress and log, and stops it; the run state survives in the run folder."""
    build_scene(scene)
    first = make_logic().start(scene_settings(run_dir, iterations=2000, unlabeled=C.SOURCE_NONE), scene)
    wait_for(first, _steps_at_least(2))
    pid = first.pid
    del first  # the panel that started the run is gone

    logic = make_logic()
    assert logic.run_status(run_dir).running is True
    monitor = logic.attach(run_dir)
    assert monitor is not None and not monitor.owned and monitor.pid == pid and monitor.alive()
    messages = wait_for(monitor, lambda m: len(_events(m, "step")) >= 3)
    steps = [r.step for r in _events(messages, "step")]
    assert steps == sorted(steps) and steps[-1] >= 2 and monitor.last_step is not None
    monitor.stop()
    messages = wait_for(monitor, lambda m: False)
    end = messages[-1]
    assert end.kind == M.FINISHED and end.outcome == M.STOPPED and end.returncode is None, (end.outcome, end.text)
    assert logic.attach(run_dir) is None, "a stopped run is not re-attached"
    assert logic.run_status(run_dir).can_resume


def scenario_failure_is_reported(logic: TrainLogic, run_dir: str, bad_folder: str) -> None:
    """A data folder the trainer cannot read ends the run with its error message and exit code 2."""
    settings = TrainSettings(run_dir=run_dir, labeled_source=C.SOURCE_FOLDER, labeled_folder=bad_folder, iterations=5,
                             warmup_iterations=1)
    monitor = logic.start(settings, scene=None)
    messages = wait_for(monitor, lambda m: False)
    end = messages[-1]
    assert end.outcome == M.FAILED and end.returncode == 2, (end.outcome, end.returncode)
    assert "not found" in end.text and bad_folder in end.text, end.text


def scenario_copy_command(scene: Any, logic: TrainLogic, run_dir: str) -> None:
    """"Copy command" writes the scene data and gives plain and torchrun lines with every setting."""
    build_scene(scene)
    settings = scene_settings(run_dir)
    text = logic.copy_command(settings, scene, gpus=4)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2, text
    plain, torchrun = (shlex.split(line) for line in lines)
    assert plain[:3] == ["python", "-m", "sss_lib"] and plain[3:] == train_arguments(settings)
    assert torchrun[:5] == ["torchrun", "--nproc_per_node", "4", "-m", "sss_lib"] and torchrun[5:] == train_arguments(settings)
    assert os.path.isfile(os.path.join(run_dir, C.SCENE_DATASET_DIR, "dataset.json"))
    for flag, value in (("--lambda-u", "0.5"), ("--confidence", "0.9"), ("--ema-decay", "0.995"), ("--seed", "7"),
                        ("--warmup-iterations", "3")):
        assert plain[plain.index(flag) + 1] == value, flag
    assert "--no-pcsw" in plain and "--no-dfe" not in plain and "--resume" not in plain


# -- a real training, handed to SSS Segment ------------------------------------------------------------

# Tiny cardiac phantoms (sss_lib.phantoms: RV, Myo, LV): 64 x 64 pixels, 4 slices. Two labeled
# cases (the second is held out for validation), two optimiser steps: the trainer's whole path
# (embedding, steps, validation, checkpoint, task model) in about a minute on a free 2-core CPU.
PHANTOM_SIZE = (64, 64)
PHANTOM_SLICES = 4
PHANTOM_CLASSES = ("RV", "Myo", "LV")
PHANTOM_LABELED_CASES = 2
SHORT_TRAINING_ITERATIONS = 2


def add_phantom_case(scene: Any, seed: int, name: str, labeled: bool = True) -> Tuple[Any, Optional[Any]]:
    """One :func:`sss_lib.phantoms.make_cardiac_phantom` case as a volume node (its LPS geometry as
    RAS) and, when ``labeled``, a segmentation with one segment per class, as a user would have them."""
    import slicer.util
    from sss_lib.phantoms import CLASS_NAMES, make_cardiac_phantom

    image, labels = make_cardiac_phantom(seed, n_slices=PHANTOM_SLICES, size=PHANTOM_SIZE)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    node = slicer.util.addVolumeFromArray(image.voxels, ijkToRAS=lps_to_ras @ image.ijk_to_lps, name=name)
    if not labeled:
        return node, None
    masks = [(CLASS_NAMES[value], labels.voxels == value) for value in sorted(CLASS_NAMES)]
    return node, _add_segmentation(scene, node, f"{name} segmentation", masks)


def phantom_settings(run_dir: str, backbone: str = "litemedsam", device: str = "auto",
                     iterations: int = SHORT_TRAINING_ITERATIONS) -> TrainSettings:
    """A short supervised run on the scene's labeled cases (what the panel's Start sends)."""
    return TrainSettings(run_dir=run_dir, labeled_source=C.SOURCE_SCENE, unlabeled_source=C.SOURCE_NONE,
                         backbone=backbone, device=device, iterations=iterations,
                         warmup_iterations=max(0, iterations - 1), seed=3)


def scenario_train_phantoms_then_auto_segment(
    scene: Any, logic: TrainLogic, run_dir: str, segment_logic: Any, segment_parameters: Any,
    task_model_choice: str, link: Any, device: str = "auto", timeout: float = 1800.0,
) -> Dict[str, Any]:
    """Train a task model on tiny phantoms in the scene through the panel's logic (the real trainer),
    hand it to SSS Segment ("Use this model") and Auto-segment an unseen phantom with it through SSS
    Segment's logic and the SSS service ``link``.

    Checks: the run ends done with a task model naming the scene's classes; SSS Segment's parameters
    point at it; the Auto-segment's segmentation has one segment per class (named and tagged as in
    the training data) on the phantom's voxel grid, each holding exactly the run's labels; every
    class was either segmented or found absent by PCSW. Returns what was measured.
    """
    from SSSSegmentLib import segmentation
    from SSSSegmentLib import testing as segment_testing
    from sss_lib.task_model import load_task_model

    names = [f"Phantom {n + 1}" for n in range(PHANTOM_LABELED_CASES)]
    for n, name in enumerate(names):
        add_phantom_case(scene, seed=50 + n, name=name)
    labeled, _ = logic.scene_cases(scene)
    assert [c.volume.GetName() for c in labeled if c.included] == names, [c.volume.GetName() for c in labeled]

    settings = phantom_settings(run_dir, device=device)
    started = time.monotonic()
    monitor = logic.start(settings, scene)
    assert monitor.owned and "--backbone" in monitor.state.command
    messages = wait_for(monitor, lambda m: False, timeout=timeout)
    end = messages[-1]
    logs = [m.text for m in messages if m.kind == M.LOG]
    assert end.kind == M.FINISHED and end.outcome == M.DONE and end.returncode == 0, (end.outcome, end.text, logs[-10:])
    steps = [r.step for r in _events(messages, "step")]
    assert steps and steps[-1] == settings.iterations, steps
    train_seconds = time.monotonic() - started

    path = logic.hand_over_model(run_dir, segment_parameters, task_model_choice)
    assert path == os.path.join(run_dir, C.MODEL_FILE) and os.path.isfile(path)
    assert str(segment_parameters.taskModelPath) == path and segment_parameters.model == task_model_choice
    task = load_task_model(path)
    assert task.backbone.name == settings.backbone, task.backbone.name
    classes = {c.label: c.name for c in task.classes}
    assert sorted(classes.values()) == sorted(PHANTOM_CLASSES), classes

    unseen, _ = add_phantom_case(scene, seed=90, name="Unseen phantom", labeled=False)
    started = time.monotonic()
    seg_node, outcome = segment_logic.auto_segment_through(link, unseen, str(segment_parameters.taskModelPath))
    segment_seconds = time.monotonic() - started
    result = outcome.result
    assert sorted(set(result.recomputed) | set(result.absent)) == sorted(classes), (result.recomputed, result.absent)
    segments = seg_node.GetSegmentation()
    for label, name in classes.items():
        segment = segments.GetSegment(segmentation.segment_id(label))
        assert segment is not None, f"no segment for class {label} ({name})"
        assert segment.GetName() == name, (segment.GetName(), name)
    assert segments.GetNumberOfSegments() == len(classes), segments.GetNumberOfSegments()
    segment_testing.check_segmentation_matches(seg_node, unseen, np.asarray(outcome.labels), sorted(classes))
    made_by = seg_node.GetAttribute("SSS.Model")
    assert made_by == f"task model {C.MODEL_FILE} on {settings.backbone}", made_by
    return {"train_seconds": train_seconds, "segment_seconds": segment_seconds,
            "segmented": list(result.recomputed), "absent": list(result.absent)}
