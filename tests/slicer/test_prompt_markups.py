"""Classes and prompts as markups on real MRML nodes: naming, colours, polarity, provenance, errors."""

import numpy as np
import pytest


@pytest.fixture
def volume(scene, data_file):
    from SSSSegmentLib import testing

    node = testing.load_volume_file(scene, str(data_file("lung1_crop_image.nrrd")), "lung1_crop")
    testing.make_oblique_with_transform(scene, node)
    return node


@pytest.fixture
def logic(scene):
    from SSSSegmentLib import testing
    from SSSSegmentLib.logic import SegmentLogic

    return SegmentLogic(backbone_factory=lambda model, device: testing.make_box_backbone())


def world_of(volume, s, x, y):
    """World RAS of stack point (s, x, y) on the k axis."""
    from SSSSegmentLib import geometry

    return geometry.apply(geometry.ijk_to_world_ras(volume), np.array([x, y, s], dtype=float))


def test_class_nodes_follow_the_class(scene, logic, volume):
    import slicer

    from SSSSegmentLib import constants as C

    nodes = logic.add_class(volume, "liver", (10, 200, 30))
    box = logic.begin_box(volume, nodes.label)
    assert nodes.label == 1 and logic.add_class(volume, "spleen").label == 2
    assert nodes.points.GetName() == "SSS liver points" and box.GetName() == "SSS liver box"
    assert nodes.points.GetParentTransformNode() is volume.GetParentTransformNode()
    assert box.GetParentTransformNode() is volume.GetParentTransformNode()
    display = nodes.points.GetDisplayNode()
    assert np.allclose(display.GetSelectedColor(), (10 / 255, 200 / 255, 30 / 255))
    assert np.allclose(display.GetColor(), np.array((10, 200, 30)) / 255 * C.NEGATIVE_COLOR_SCALE)
    logic.rename_class(volume, 1, "left liver lobe", (200, 10, 30))
    assert box.GetName() == "SSS left liver lobe box"
    assert np.allclose(box.GetDisplayNode().GetSelectedColor(), (200 / 255, 10 / 255, 30 / 255))
    logic.set_class_visibility(volume, 1, False)
    assert not nodes.points.GetDisplayNode().GetVisibility() and not box.GetDisplayNode().GetVisibility()
    logic.remove_class(volume, 1)
    assert [c.label for c in logic.classes(volume)] == [2]
    assert scene.GetNodeByID(box.GetID()) is None
    assert isinstance(box, slicer.vtkMRMLMarkupsROINode)


def test_placed_point_gets_pending_polarity_and_marks_user(scene, logic, volume):
    from SSSSegmentLib import constants as C
    from SSSSegmentLib import markups

    nodes = logic.add_class(volume, "tumour")
    nodes.set_source(C.SOURCE_AUTO)
    points = logic.begin_point(volume, nodes.label, positive=False)
    # A click in a slice view adds a point and sends PointPositionDefinedEvent, as AddControlPoint does.
    index = points.AddControlPointWorld(*world_of(volume, 20, 100.0, 90.0))
    assert points.GetNthControlPointDescription(index) == C.NEGATIVE
    assert points.GetNthControlPointLabel(index) == "-" and not points.GetNthControlPointSelected(index)
    assert not markups.point_is_positive(points, index)
    assert nodes.source == C.SOURCE_USER
    logic.begin_point(volume, nodes.label, positive=True)
    index2 = points.AddControlPointWorld(*world_of(volume, 20, 101.0, 91.0))
    assert markups.point_is_positive(points, index2) and points.GetNthControlPointLabel(index2) == "+"
    assert not markups.point_is_positive(points, index), "an earlier point's polarity changed"


def test_deleting_a_point_marks_the_class_user(scene, logic, volume):
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis

    from SSSSegmentLib import constants as C

    prompts = PromptSet(SliceAxis(2), [ClassPrompts(3, "node", [SlicePrompt(10, positive_points=[(50, 60), (52, 61)], source="auto")])])
    assert logic.write_prompts(volume, prompts) == [3]
    nodes = logic.class_nodes(volume, 3)
    assert nodes.source == C.SOURCE_AUTO, "code writing markups must not look like a user edit"
    nodes.points.RemoveNthControlPoint(0)
    assert nodes.source == C.SOURCE_USER
    (prompt,) = logic.prompts_from_markups(volume, SliceAxis(2)).classes[0].prompts
    assert prompt.source == "user" and prompt.confidence == 1.0 and len(prompt.positive_points) == 1


def test_points_on_other_slices_become_their_own_prompts(scene, logic, volume):
    from sss_lib.volume import SliceAxis

    nodes = logic.add_class(volume, "vessel")
    logic.begin_point(volume, nodes.label, positive=True)
    nodes.points.AddControlPointWorld(*world_of(volume, 12.2, 40.0, 41.0))  # rounds to slice 12
    nodes.points.AddControlPointWorld(*world_of(volume, 30.0, 42.0, 43.0))
    logic.begin_point(volume, nodes.label, positive=False)
    nodes.points.AddControlPointWorld(*world_of(volume, 30.0, 60.0, 61.0))
    (cls,) = logic.prompts_from_markups(volume, SliceAxis(2)).classes
    assert [p.key_slice for p in cls.prompts] == [12, 30]
    assert np.allclose(cls.prompts[0].positive_points, [(40.0, 41.0)], atol=1e-6)
    assert np.allclose(cls.prompts[1].negative_points, [(60.0, 61.0)], atol=1e-6)


def test_bad_prompts_give_clear_errors(scene, logic, volume):
    from sss_lib.volume import SliceAxis

    from SSSSegmentLib import geometry, markups
    from SSSSegmentLib.errors import UserFacingError

    with pytest.raises(UserFacingError, match="No prompts yet"):
        logic.prompts_from_markups(volume, SliceAxis(2))
    nodes = logic.add_class(volume, "tumour")
    logic.begin_point(volume, nodes.label, positive=False)
    nodes.points.AddControlPointWorld(*world_of(volume, 8, 30.0, 30.0))
    with pytest.raises(UserFacingError, match="only negative points"):
        logic.prompts_from_markups(volume, SliceAxis(2))
    nodes.points.RemoveAllControlPoints()
    to_world = geometry.ijk_to_world_ras(volume)
    markups.write_box(logic.begin_box(volume, 1), to_world, SliceAxis(2), 8, (10, 10, 20, 20))
    markups.write_box(markups.add_box_node(scene, logic.class_nodes(volume, 1), volume), to_world, SliceAxis(2), 8, (30, 30, 40, 40))
    with pytest.raises(UserFacingError, match="two boxes on slice 8"):
        logic.prompts_from_markups(volume, SliceAxis(2))
    logic.clear_class_prompts(volume, 1)
    markups.write_box(logic.begin_box(volume, 1), to_world, SliceAxis(2), 8, (150, 150, 260, 170))
    with pytest.raises(UserFacingError, match="outside"):
        logic.prompts_from_markups(volume, SliceAxis(2))


def test_nonlinear_parent_transform_is_refused(scene, logic, volume):
    from SSSSegmentLib import geometry
    from SSSSegmentLib.errors import UserFacingError

    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(UserFacingError, match="harden the transform"):
        geometry.sss_volume_from_node(volume)


def test_task_model_paths_raise_a_clear_error(scene, logic, volume, tmp_path):
    from SSSSegmentLib import constants as C
    from SSSSegmentLib.errors import TaskModelRequiredError

    with pytest.raises(TaskModelRequiredError, match="choose 'task model"):
        logic.prepare_auto_run(volume, None)
    with pytest.raises(TaskModelRequiredError, match="does not exist"):
        logic.prepare_auto_run(volume, str(tmp_path / "liver.ssstask"))
    with pytest.raises(TaskModelRequiredError):
        logic.prepare_run(volume, model=C.TASK_MODEL_CHOICE)


def test_a_box_only_class_round_trips_without_points(scene, logic, volume):
    """A LiteMedSAM task model prompts with boxes alone: the class gets its box markups, no points,
    and reads back the same."""
    import slicer.util
    from SSSSegmentLib import constants as C
    from SSSSegmentLib import geometry
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt

    vol = geometry.sss_volume_from_node(volume, voxels=slicer.util.arrayFromVolume(volume))
    axis = logic.slice_axis(vol, "auto")
    n, h, w = axis.to_stack(vol.voxels).shape
    boxes = [SlicePrompt(s, box=(0.3 * w, 0.3 * h, 0.5 * w, 0.55 * h), source="auto", confidence=0.9)
             for s in (n // 2 - 2, n // 2)]
    logic.write_prompts(volume, PromptSet(axis, [ClassPrompts(1, "LV", boxes, (200, 60, 60))]), source=C.SOURCE_AUTO)
    (lv,) = logic.classes(volume)
    assert len(lv.boxes) == 2 and (lv.points is None or lv.points.GetNumberOfControlPoints() == 0)
    (back,) = logic.prompts_from_markups(volume, axis).classes
    assert sorted(p.key_slice for p in back.prompts) == [n // 2 - 2, n // 2]
    for p in back.prompts:
        assert not p.positive_points and not p.negative_points
        np.testing.assert_allclose(p.box, boxes[0].box, atol=1e-3)


def test_not_on_this_slice_markers_are_their_own_markup_and_round_trip(scene, volume):
    """The widget's "Not on this slice" button: a marker per slice in the class's own markup node,
    read into prompts, written back from them, refused where the class is prompted."""
    from sss_lib.prompts import ClassPrompts, SlicePrompt
    from sss_lib.volume import SliceAxis

    from SSSSegmentLib import constants as C
    from SSSSegmentLib import geometry, markups

    axis = SliceAxis(2)
    to_world = geometry.ijk_to_world_ras(volume)
    to_ijk = np.linalg.inv(to_world)
    nodes = markups.create_class(scene, volume, 1, "tumour", (230, 80, 60), source=C.SOURCE_AUTO)
    written = ClassPrompts(1, "tumour", [SlicePrompt(20, box=(10, 10, 30, 30), source="auto", confidence=0.8),
                                         SlicePrompt.not_on_slice(25, source="auto"),
                                         SlicePrompt.not_on_slice(12, source="auto")])
    markups.write_class_prompts(scene, nodes, volume, written, to_world, axis, C.SOURCE_AUTO)
    assert nodes.absent is not None and nodes.absent.GetNumberOfControlPoints() == 2
    assert nodes.absent.GetName() == "SSS tumour not on slice"
    assert nodes.absent.GetParentTransformNode() is volume.GetParentTransformNode()
    back = markups.read_class_prompts(nodes, to_ijk, axis)
    assert back.absent_slices() == [12, 25] and list(back.key_slices()) == [20]
    assert back.fingerprint() == written.fingerprint()

    # Found again from the scene through the node reference.
    (found,) = markups.find_classes(scene, volume)
    assert found.absent is nodes.absent

    # The widget: the current slice from the slice view's centre, then mark it.
    view_centre = geometry.apply(to_world, np.array([70.0, 90.0, 30.0]))
    current = markups.slice_index_at(volume, axis, view_centre)
    assert current == 30
    markups.mark_not_on_slice(scene, found, volume, axis, current)
    markups.mark_not_on_slice(scene, found, volume, axis, current)  # twice: one marker
    assert found.source == C.SOURCE_USER
    assert markups.not_on_slice_slices(found, to_ijk, axis) == [12, 25, 30]
    assert markups.read_class_prompts(found, to_ijk, axis).absent_slices() == [12, 25, 30]
    with pytest.raises(ValueError, match="box or points on slice 20"):
        markups.mark_not_on_slice(scene, found, volume, axis, 20)
    with pytest.raises(ValueError, match="outside"):
        markups.mark_not_on_slice(scene, found, volume, axis, 999)
    assert markups.unmark_not_on_slice(found, volume, axis, 25)
    assert not markups.unmark_not_on_slice(found, volume, axis, 25)
    assert markups.not_on_slice_slices(found, to_ijk, axis) == [12, 30]

    # A class with only markers reads as such (empty everywhere), not as "no prompts".
    other = markups.create_class(scene, volume, 2, "gone")
    markups.mark_not_on_slice(scene, other, volume, axis, 5)
    only = markups.read_class_prompts(other, to_ijk, axis)
    assert only is not None and only.absent_slices() == [5] and only.key_slices() == {}

    absent_node = found.absent
    markups.clear_class_prompts(scene, found)
    assert markups.read_class_prompts(found, to_ijk, axis) is None
    markups.remove_class(scene, found)
    assert scene.GetNodeByID(absent_node.GetID()) is None


def test_auto_segment_keeps_a_class_with_only_not_on_slice_markers(scene, logic, volume, tmp_path):
    """Auto-segment reads the markups as snapshots: a class with only "not on this slice" markers is
    the user's class (empty where marked), not a deleted one; the service path sends it too."""
    import sys

    from sss_lib.volume import SliceAxis

    from SSSSegmentLib import geometry, markups
    from SSSSegmentLib.service_link import ServiceLink

    task_file = tmp_path / "liver.ssstask"
    task_file.write_bytes(b"prepare_auto_run only checks that the file exists")
    to_world = geometry.ijk_to_world_ras(volume)
    prompted = logic.add_class(volume, "liver")
    markups.write_box(logic.begin_box(volume, prompted.label), to_world, SliceAxis(2), 8, (10, 10, 20, 20))
    markers = logic.add_class(volume, "lesion")
    markups.mark_not_on_slice(scene, markers, volume, SliceAxis(2), 5)
    logic.add_class(volume, "deleted")  # no prompt at all: left out, as the user deleted its prompts

    request = logic.prepare_auto_run(volume, str(task_file))
    assert [snap.label for snap in request.snapshots] == [1, 2]
    (snap,) = [snap for snap in request.snapshots if snap.label == 2]
    assert not snap.boxes and not snap.points and len(snap.absent) == 1

    run = logic.service_auto_run(ServiceLink(sys.executable), request)  # builds the plan; connects to nothing
    edited = run.plan.edited_prompts("k")
    assert [c.label for c in edited.classes] == [1, 2]
    lesion = edited.by_label()[2]
    assert lesion.absent_slices() == [5] and not lesion.key_slices()
