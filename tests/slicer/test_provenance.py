"""Every user edit of a class's markups, from any widget, marks the class "user"; SSS's own writes,
display changes and moving the volume do not (real MRML markups nodes, slicer-core)."""

import numpy as np
import pytest


@pytest.fixture
def volume(scene):
    import slicer.util

    voxels = np.zeros((12, 40, 48), dtype=np.int16)
    ijk_to_ras = np.diag([0.8, 0.8, 2.5, 1.0])
    ijk_to_ras[:3, 3] = [-20.0, -16.0, -15.0]
    return slicer.util.addVolumeFromArray(voxels, ijkToRAS=ijk_to_ras, name="small")


@pytest.fixture
def logic(scene):
    from SSSSegmentLib.logic import SegmentLogic

    return SegmentLogic()


@pytest.fixture
def auto_class(logic, volume):
    """Class 1 written by SSS (source "auto"): two points on slice 5 and a box on slice 6."""
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis

    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "tumour", [
        SlicePrompt(5, positive_points=[(20.0, 18.0), (22.0, 19.0)], source="auto", confidence=0.7),
        SlicePrompt(6, box=(10.0, 12.0, 30.0, 28.0), source="auto", confidence=0.6),
    ])])
    assert logic.write_prompts(volume, prompts) == [1]
    nodes = logic.class_nodes(volume, 1)
    assert nodes.source == "auto" and len(nodes.boxes) == 1 and nodes.points.GetNumberOfControlPoints() == 2
    return nodes


@pytest.fixture
def edits(logic):
    seen = []
    logic.edit_listeners.append(seen.append)
    return seen


def sources(nodes):
    from SSSSegmentLib import constants as C

    return {n.GetAttribute(C.ATTR_SOURCE) for n in nodes.all_nodes()}


def test_moving_a_point_outside_the_views_marks_user(logic, volume, auto_class, edits):
    """The Markups module's table sets a point's coordinates: PointModifiedEvent only, no interaction."""
    from SSSSegmentLib import constants as C

    x, y, z = auto_class.points.GetNthControlPointPosition(0)
    auto_class.points.SetNthControlPointPosition(0, x + 3.0, y, z)
    assert sources(auto_class) == {C.SOURCE_USER}
    assert auto_class.points.GetAttribute(C.ATTR_CONFIDENCE) is None
    assert edits == [1]


@pytest.mark.parametrize("resize", ["SetSize", "SetRadiusXYZ", "SetCenter"])
def test_resizing_or_moving_a_box_with_spin_boxes_marks_user(logic, volume, auto_class, edits, resize):
    """The ROI's size and centre spin boxes call SetSize/SetRadiusXYZ/SetCenter (ModifiedEvent)."""
    from SSSSegmentLib import constants as C

    box = auto_class.boxes[0]
    size = np.array(box.GetSize())
    if resize == "SetSize":
        box.SetSize(*(size + [4.0, 0.0, 0.0]))
    elif resize == "SetRadiusXYZ":
        box.SetRadiusXYZ(*(size / 2 + [0.0, 2.0, 0.0]))
    else:
        centre = np.array(box.GetCenter())
        box.SetCenter(*(centre + [0.0, 0.0, 2.5]))
    assert sources(auto_class) == {C.SOURCE_USER}
    assert edits == [1]


def test_changing_a_points_polarity_in_the_table_marks_user(logic, volume, auto_class):
    from SSSSegmentLib import constants as C

    auto_class.points.SetNthControlPointDescription(1, C.NEGATIVE)
    assert auto_class.source == C.SOURCE_USER


def test_sss_writes_and_display_changes_are_not_user_edits(logic, volume, auto_class, edits):
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis

    from SSSSegmentLib import constants as C

    # A re-run of PCSW rewrites the class's markups (moves points, resizes the box): still "auto".
    again = PromptSet(SliceAxis(2), [ClassPrompts(1, "tumour", [
        SlicePrompt(5, positive_points=[(25.0, 20.0)], source="auto", confidence=0.8),
        SlicePrompt(7, box=(8.0, 10.0, 34.0, 30.0), source="auto", confidence=0.5),
    ])])
    assert logic.write_prompts(volume, again) == [1]
    logic.rename_class(volume, 1, "lesion", (10, 20, 30))
    # Display-only changes from the GUI: visibility (class, node, point), selection, lock, names.
    logic.set_class_visibility(volume, 1, False)
    points, box = auto_class.points, auto_class.boxes[0]
    points.GetDisplayNode().SetVisibility(True)
    points.SetNthControlPointVisibility(0, False)
    points.SetNthControlPointSelected(0, False)  # a described point keeps its polarity
    points.SetNthControlPointLocked(0, True)
    points.SetNthControlPointLabel(0, "renamed")
    box.GetDisplayNode().SetFillOpacity(0.5)
    box.SetName("another name")
    assert sources(auto_class) == {C.SOURCE_AUTO}
    assert edits == []
    # ... and the class still answers to a real edit afterwards.
    x, y, z = points.GetNthControlPointPosition(0)
    points.SetNthControlPointPosition(0, x, y + 1.0, z)
    assert sources(auto_class) == {C.SOURCE_USER}


def test_moving_the_volume_is_not_a_user_edit(scene, logic, volume, auto_class):
    import vtk

    from SSSSegmentLib import constants as C

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    for node in [volume] + auto_class.all_nodes():
        node.SetAndObserveTransformNodeID(transform.GetID())
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 12.0)
    transform.SetMatrixTransformToParent(m)
    assert auto_class.source == C.SOURCE_AUTO


def test_user_class_reports_finished_edits_only(logic, volume, auto_class, edits):
    """A drag sends many PointModifiedEvents: the panel hears of the first (auto -> user) and of the end."""
    import slicer

    points = auto_class.points
    x, y, z = points.GetNthControlPointPosition(0)
    for step in range(1, 6):  # a drag
        points.SetNthControlPointPosition(0, x + step, y, z)
    assert edits == [1]
    points.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert edits == [1, 1]


def test_fingerprint_ignores_display_and_sees_geometry(scene):
    from SSSSegmentLib.provenance import markup_fingerprint

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.CreateDefaultDisplayNodes()
    roi.SetCenter(1.0, 2.0, 3.0)
    roi.SetSize(4.0, 5.0, 6.0)
    before = markup_fingerprint(roi)
    roi.GetDisplayNode().SetVisibility(False)
    roi.SetLocked(True)
    assert markup_fingerprint(roi) == before
    roi.SetSize(4.0, 5.0, 6.5)
    assert markup_fingerprint(roi) != before
