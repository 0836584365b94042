"""The panel's default input is the first greyscale volume, never a label map or an RGB volume."""

import numpy as np


def test_default_input_skips_label_maps_and_colour_volumes(scene):
    import slicer.util

    from SSSSegmentLib.inputs import default_input_volume

    assert default_input_volume(scene) is None
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label, np.zeros((4, 5, 6), dtype=np.uint8))
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((4, 5, 6, 3), dtype=np.uint8))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image yet")
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is label  # what the panel used to pick
    assert default_input_volume(scene) is None
    ct = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), dtype=np.int16), name="CT")
    slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), dtype=np.int16), name="MR")
    assert default_input_volume(scene) is ct
    assert empty.GetImageData() is None
