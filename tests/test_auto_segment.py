"""Auto-segment: edits keep the user's prompts and recompute only the changed classes; a deleted
class stays unsegmented; the CLI round trip with an edited prompts file; backbone checks; evaluate.

A task model's coarse head is trained for a few seconds on tiny phantoms with SAM-2.1 tiny at random
init (64 px input), which is enough for it to find the classes of a case it was trained on.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest

from sss_lib.cli import main
from sss_lib.prompts import ClassPrompts, PromptSet


# One torch thread, and a fresh random-init SAM-2.1 tiny ``backbone`` for this module: tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image(heart_phantoms):
    from sss_lib.volume_io import read_volume

    return read_volume(heart_phantoms / "imagesTr" / "case_000_0000.nii.gz")


@pytest.fixture(scope="module")
def session(heart_task_model, backbone, image):
    from sss_lib.auto_segment import AutoSegmentSession, TaskRuntime
    from sss_lib.task_model import load_task_model

    runtime = TaskRuntime.from_task_model(load_task_model(heart_task_model), backbone=backbone)
    return AutoSegmentSession(image, runtime)


def moved(c: ClassPrompts, dx: float) -> ClassPrompts:
    """The class with its box shifted right by ``dx`` pixels; ``source`` is left as it was."""
    prompts = []
    for p in c.prompts:
        x0, y0, x1, y1 = p.box
        prompts.append(dataclasses.replace(p, box=(x0 + dx, y0, x1 + dx, y1)))
    return ClassPrompts(c.label, c.name, prompts, c.color)


def test_edit_one_class_recomputes_only_that_class(session):
    first = session.run()
    auto = first.prompts.by_label()
    assert len(auto) >= 2, f"the coarse head found too few classes: {first.pcsw}"
    assert sorted(first.recomputed) == sorted(auto) and first.reused == [] and first.user_classes == []
    computed = session.engine.store.computed

    edited_label = sorted(auto)[0]
    edited = PromptSet(first.prompts.slice_axis,
                       [moved(c, 1.0) if c.label == edited_label else c for c in first.prompts.classes])
    second = session.run(edited)
    assert second.recomputed == [edited_label]
    assert second.reused == sorted(set(auto) - {edited_label})
    assert second.user_classes == [edited_label]
    assert session.engine.store.computed == computed  # no slice was embedded again
    after = second.prompts.by_label()
    assert all(p.source == "user" and p.confidence == 1.0 for p in after[edited_label].prompts)
    assert after[edited_label].prompts[0].box == edited.by_label()[edited_label].prompts[0].box
    for label in set(auto) - {edited_label}:
        assert after[label].fingerprint() == auto[label].fingerprint()

    # Running the same edit again changes nothing.
    third = session.run(second.prompts)
    assert third.recomputed == [] and sorted(third.reused) == sorted(auto)
    np.testing.assert_array_equal(third.labels.voxels, second.labels.voxels)


def test_a_deleted_class_is_left_out(session):
    auto = session.run().prompts
    gone = auto.classes[-1].label
    result = session.run(PromptSet(auto.slice_axis, auto.classes[:-1]))
    assert gone in result.absent and gone not in result.prompts.by_label()
    assert not (result.labels.voxels == gone).any()
    assert result.recomputed == []  # the remaining classes kept their prompts


def test_cli_round_trip_with_an_edited_prompts_file(heart_task_model, heart_phantoms, tmp_path, capsys):
    from sss_lib.volume_io import read_label, read_volume

    image_path = heart_phantoms / "imagesTr" / "case_000_0000.nii.gz"
    seg1, p1 = tmp_path / "seg1.nrrd", tmp_path / "p1.json"
    assert main(["auto-segment", str(image_path), "--model", str(heart_task_model), "-o", str(seg1),
                 "--prompts-out", str(p1), "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_label(seg1, read_volume(image_path)).voxels.dtype == np.uint8

    data = json.loads(p1.read_text())
    edited = copy.deepcopy(data)
    target = edited["classes"][0]
    box = target["prompts"][0]["box"]
    target["prompts"][0]["box"] = [box[0] + 1, box[1], box[2] + 1, box[3]]  # moved by hand, source untouched
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    seg2, p2 = tmp_path / "seg2.nii.gz", tmp_path / "p2.json"
    assert main(["auto-segment", str(image_path), "--model", str(heart_task_model), "-o", str(seg2),
                 "--prompts-out", str(p2), "--prompts", str(tmp_path / "edited.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"class {target['label']} " in out and "user" in out
    again = {c["label"]: c for c in json.loads(p2.read_text())["classes"]}
    assert again[target["label"]]["prompts"][0]["box"] == target["prompts"][0]["box"]
    assert again[target["label"]]["prompts"][0]["source"] == "user"
    for c in data["classes"][1:]:
        assert again[c["label"]]["prompts"] == c["prompts"]


def test_a_model_refuses_another_backbone(heart_task_model, backbone):
    from sss_lib.auto_segment import TaskRuntime
    from sss_lib.task_model import BackboneRef, TaskModelError, load_task_model

    model = load_task_model(heart_task_model)
    other = dataclasses.replace(model, backbone=BackboneRef("sam2.1_hiera_tiny", "cd" * 32))
    with pytest.raises(TaskModelError, match="retrain the task model on this backbone"):
        TaskRuntime.from_task_model(other, backbone=backbone)


def test_cli_evaluate(tmp_path, capsys):
    from sss_lib.volume import Volume
    from sss_lib.volume_io import write_volume

    gt = np.zeros((4, 10, 10), np.uint8)
    gt[1:3, 2:6, 2:6] = 1
    pred = gt.copy()
    pred[1:3, 2:6, 2:4] = 0  # half of the structure found
    for folder, voxels in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        write_volume(Volume(voxels, (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3)), tmp_path / folder / "case1.nii.gz")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "metrics")]) == 0
    out = capsys.readouterr().out
    assert "mean Dice 0.6667 over 1 case(s)" in out
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text())["mean_dice"] == pytest.approx(2 / 3)
    assert main(["evaluate", "--pred", str(tmp_path / "nowhere"), "--gt", str(tmp_path / "gt")]) == 2


def test_presence_gate_removes_the_slices_the_coarse_head_does_not_see():
    from sss_lib.auto_segment import presence_gate

    labels = np.zeros((4, 10, 10), np.uint8)
    labels[:, 2:6, 2:6] = 1  # 16 px per slice
    labels[:, 7:9, 7:9] = 2
    prob = {1: np.zeros((4, 10, 10), np.float32), 2: np.ones((4, 10, 10), np.float32)}
    prob[1][0, 2:6, 2:6] = 0.9  # fully seen
    prob[1][1, 2:4, 2:3] = 0.9  # 2 px = 12% of 16: kept
    prob[1][2, 2, 2] = 0.9  # 1 px = 6%: removed; slice 3: nothing seen: removed
    removed = presence_gate(labels, prob, [1, 2], threshold=0.5, fraction=0.1)
    assert removed == {1: [2, 3]}
    assert (labels[:2] == 1).sum() == 32 and not (labels[2:] == 1).any()
    assert (labels == 2).sum() == 16  # other classes untouched


def test_anchors_cover_the_component_pcsw_prompted():
    from sss_lib.auto_segment import with_anchors
    from sss_lib.pcsw import PcswConfig
    from sss_lib.prompts import SlicePrompt
    from sss_lib.volume import SliceAxis

    prob = {1: np.zeros((8, 20, 20), np.float32), 2: np.zeros((8, 20, 20), np.float32)}
    prob[1][1:5, 4:12, 4:12] = 0.9  # the structure PCSW prompted, slices 1-4
    prob[1][6, 15:18, 15:18] = 0.9  # another component: no anchor there
    prob[2][1:5, 7:9, 7:9] = 0.8  # a hole of another class inside it
    prob[1][1:5, 7:9, 7:9] = 0.1
    key = SlicePrompt(2, (1, 1, 14, 14), [(5, 5)], [(8, 8)], source="auto", confidence=0.9)
    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "a", [key]), ClassPrompts(2, "b", [])])
    out = with_anchors(prompts, prob, PcswConfig(), (1.0, 1.0))
    anchored = out.by_label()[1].prompts
    assert anchored[0] is key  # PCSW's prompt first
    assert [p.key_slice for p in anchored[1:]] == [1, 3, 4]
    for p in anchored[1:]:
        assert p.box == (1, 1, 14, 14)  # tight box of slices' 4..11 plus PCSW's 3 px margin
        (x, y), = p.positive_points
        assert prob[1][p.key_slice, int(y), int(x)] > 0.5
        (nx, ny), = p.negative_points
        assert 7 <= nx <= 8 and 7 <= ny <= 8
        assert p.source == "auto" and p.confidence == pytest.approx(0.9)
    assert out.by_label()[2].prompts == []


def test_boxes_only_runtime_drops_the_points_of_automatic_prompts_only(session, image):
    from sss_lib.auto_segment import AutoSegmentSession, boxes_only

    assert session.runtime.uses_points  # SAM-2's decoder knows points: they are on by default
    auto = session.run().prompts
    assert any(p.positive_points for c in auto.classes for p in c.prompts), "PCSW gave no point to drop"
    runtime = dataclasses.replace(session.runtime, prompt_points=False)
    plain = AutoSegmentSession(image, runtime, store=session.engine.store).run()
    for c, p_c in zip(auto.classes, plain.prompts.classes):
        assert [p.box for p in p_c.prompts] == [p.box for p in c.prompts]
        assert all(not p.positive_points and not p.negative_points for p in p_c.prompts)
    # A user's prompt keeps its points.
    first = auto.classes[0]
    user = ClassPrompts(first.label, first.name, [dataclasses.replace(first.prompts[0], source="user")], first.color)
    kept = boxes_only(PromptSet(auto.slice_axis, [user, *auto.classes[1:]]))
    assert kept.classes[0].prompts[0].positive_points == first.prompts[0].positive_points
    assert all(not p.positive_points for c in kept.classes[1:] for p in c.prompts)


def test_a_boxes_only_run_carries_boxes_alone_and_restores_the_backbone():
    from types import SimpleNamespace

    from sss_lib.auto_segment import _carried_points

    net = SimpleNamespace(carry_points=True)
    with _carried_points(SimpleNamespace(backbone=net, uses_points=False)):
        assert net.carry_points is False
    assert net.carry_points is True
    with _carried_points(SimpleNamespace(backbone=net, uses_points=True)):
        assert net.carry_points is True


def test_cli_prompt_points_off_writes_prompts_without_points(heart_task_model, heart_phantoms, tmp_path):
    image_path = heart_phantoms / "imagesTr" / "case_000_0000.nii.gz"
    prompts = tmp_path / "p.json"
    assert main(["auto-segment", str(image_path), "--model", str(heart_task_model), "-o", str(tmp_path / "seg.nrrd"),
                 "--prompts-out", str(prompts), "--device", "cpu", "--prompt-points", "off"]) == 0
    written = [p for c in json.loads(prompts.read_text())["classes"] for p in c["prompts"]]
    assert written and all(p["box"] and not p["positive_points"] and not p["negative_points"] for p in written)


def test_the_task_model_carries_the_nesting_and_the_ring_rule_changes_only_the_slices_it_reports(session, image):
    from sss_lib.auto_segment import AutoSegmentSession

    runtime = session.runtime
    assert runtime.nesting == {2: (3,)}, "measured on the training labels: the Myo ring encloses the LV"
    on = AutoSegmentSession(image, runtime).run()
    off = AutoSegmentSession(image, dataclasses.replace(runtime, ring_rule=False)).run()
    assert off.rings == {} and set(on.rings) <= {2}
    axis = session.slice_axis
    a, b = axis.to_stack(on.labels.voxels), axis.to_stack(off.labels.voxels)
    differ = sorted(int(s) for s in np.flatnonzero((a != b).any(axis=(1, 2))))
    assert set(differ) <= set(on.rings.get(2, []))
    # Only the nest's own classes move, and the disc (Myo or LV) keeps the boxes' outline.
    moved_px = a != b
    assert set(np.unique(a[moved_px])) <= {2, 3} and set(np.unique(b[moved_px])) <= {2, 3}


def test_coarse_classes_come_from_the_coarse_head_until_the_user_edits_them(session, image):
    from sss_lib.auto_segment import AutoSegmentSession

    decoder = AutoSegmentSession(image, session.runtime, store=session.engine.store)
    plain = decoder.run()
    coarse = decoder.coarse_labels().voxels
    label = sorted(plain.prompts.by_label())[0]
    assert plain.from_coarse == [] and np.count_nonzero(coarse == label) > 0
    runtime = dataclasses.replace(session.runtime, coarse_classes=(label,))
    taken = AutoSegmentSession(image, runtime, store=session.engine.store).run()
    assert taken.from_coarse == [label]
    assert np.array_equal(taken.labels.voxels == label, coarse == label)
    kept = (plain.labels.voxels != label) & (coarse != label)
    assert np.array_equal(taken.labels.voxels[kept], plain.labels.voxels[kept]), "other classes stay the decoder's"
    # Once the user edits the class, it is the decoder's again.
    def as_user(c: ClassPrompts) -> ClassPrompts:
        return ClassPrompts(c.label, c.name, [dataclasses.replace(p, source="user") for p in c.prompts], c.color)

    edited = PromptSet(taken.prompts.slice_axis,
                       [as_user(c) if c.label == label else c for c in taken.prompts.classes])
    runs = {}
    for name, rt in (("user", runtime), ("reference", session.runtime)):
        s = AutoSegmentSession(image, rt, store=session.engine.store)
        s.run()
        runs[name] = s.run(edited)
    assert runs["user"].from_coarse == [] and label in runs["user"].user_classes
    assert np.array_equal(runs["user"].labels.voxels, runs["reference"].labels.voxels)
