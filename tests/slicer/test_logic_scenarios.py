"""SSSSegment's logic against real MRML classes (slicer-core): geometry, prompts, provenance, re-run.

The scenarios live in SSSSegmentLib/testing.py so the module's self-test runs the same code inside
Slicer. The volume is the real lung CT crop in Testing/Data, made oblique and put under a rotating,
shifting parent transform; the model is a deterministic stand-in whose output is known.
"""

import numpy as np
import pytest


@pytest.fixture
def lib(slicer_core):
    import SSSSegmentLib.testing as testing
    from SSSSegmentLib.logic import SegmentLogic

    return testing, SegmentLogic


@pytest.fixture
def oblique_lung(scene, lib, data_file):
    testing, _ = lib
    volume = testing.load_volume_file(scene, str(data_file("lung1_crop_image.nrrd")), "lung1_crop")
    testing.make_oblique_with_transform(scene, volume)
    return volume


@pytest.fixture
def logic(scene, lib):
    testing, SegmentLogic = lib
    return SegmentLogic(backbone_factory=lambda model, device: testing.make_box_backbone())


def test_volume_conversion_uses_world_geometry(oblique_lung, lib, slicer_core):
    """The sss_lib Volume maps every voxel to the same world point as Slicer (RAS -> LPS)."""
    from SSSSegmentLib import geometry

    vol = geometry.sss_volume_from_node(oblique_lung)
    assert vol.voxels.shape == (48, 192, 192)
    assert np.allclose(vol.spacing, [0.5703125, 0.5703125, 5.0])
    assert not np.allclose(vol.direction, np.diag(np.diag(vol.direction)))  # really oblique
    ijk = np.array([[0, 0, 0], [191, 0, 47], [17.5, 120.25, 3.0]])
    import vtk

    m = vtk.vtkMatrix4x4()
    oblique_lung.GetIJKToRASMatrix(m)
    parent = vtk.vtkMatrix4x4()
    oblique_lung.GetParentTransformNode().GetMatrixTransformToWorld(parent)
    for p in ijk:
        ras_local = m.MultiplyPoint([*p, 1.0])
        ras_world = parent.MultiplyPoint(ras_local)
        lps = vol.voxel_to_physical(p)
        assert np.allclose(lps, [-ras_world[0], -ras_world[1], ras_world[2]], atol=1e-9)


def test_prompt_markups_round_trip_is_exact(scene, logic, oblique_lung, lib):
    testing, _ = lib
    worst = testing.scenario_prompt_roundtrip(scene, logic, oblique_lung)
    assert worst < 1e-4


def test_segmentation_node_on_volume_geometry(scene, logic, oblique_lung, lib):
    testing, _ = lib
    seg = testing.scenario_segment_geometry(scene, logic, oblique_lung)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is oblique_lung


def test_user_edited_prompt_survives_rerun(scene, logic, oblique_lung, lib):
    testing, _ = lib
    testing.scenario_user_edit_survives_rerun(scene, logic, oblique_lung)


def test_segments_are_updated_in_place_including_emptied(scene, oblique_lung, lib):
    """Re-writing replaces a segment's voxels (also with nothing), keeps other segments, removes
    segments of deleted classes, and never moves the segmentation off the volume's grid."""
    testing, _ = lib
    from SSSSegmentLib import segmentation

    shape = (48, 192, 192)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[20:23, 50:60, 70:90] = 1
    classes = [(1, "a", (255, 0, 0)), (2, "b", (0, 255, 0))]
    seg = segmentation.prepare_segmentation(scene, oblique_lung)
    assert segmentation.write_class_segments(scene, seg, oblique_lung, labels, classes) == ["SSS_label_1", "SSS_label_2"]
    testing.check_segmentation_matches(seg, oblique_lung, labels, [1, 2])

    second = np.zeros(shape, dtype=np.uint8)
    second[5:7, 10:20, 10:20] = 2
    second[30, 100:110, 100:105] = 1  # ignored: only class 2 is updated
    assert segmentation.write_class_segments(scene, seg, oblique_lung, second, classes, update=[2]) == ["SSS_label_2"]
    kept = np.where(labels == 1, 1, 0) + np.where(second == 2, 2, 0)
    testing.check_segmentation_matches(seg, oblique_lung, kept.astype(np.uint8), [1, 2])

    segmentation.write_class_segments(scene, seg, oblique_lung, np.zeros(shape, np.uint8), classes[:1], update=[1])
    assert seg.GetSegmentation().GetSegment("SSS_label_2") is None, "a deleted class's segment must go"
    testing.check_segmentation_matches(seg, oblique_lung, np.zeros(shape, np.uint8), [1])
    assert segmentation.read_labels(scene, seg, oblique_lung).max() == 0


def test_scenarios_on_the_phantom_used_by_an_installed_self_test(scene, lib, tmp_path):
    """Installed extensions have no Testing/Data: the self-test then uses a synthetic phantom."""
    testing, SegmentLogic = lib
    volume = testing.sample_volume(scene, str(tmp_path / "qt-scripted-modules"))
    assert volume.GetName() == "SSS phantom"
    testing.make_oblique_with_transform(scene, volume)
    logic = SegmentLogic(backbone_factory=lambda model, device: testing.make_box_backbone())
    assert testing.scenario_prompt_roundtrip(scene, logic, volume) < 1e-4
    scene.Clear(0)
    volume = testing.sample_volume(scene, str(tmp_path / "qt-scripted-modules"))
    testing.make_oblique_with_transform(scene, volume)
    testing.scenario_segment_geometry(scene, logic, volume)
