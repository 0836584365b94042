"""Which volume the panel offers as its input before the user picks one."""

from typing import Any, Optional


def is_greyscale_volume(node: Any) -> bool:
    """A plain scalar volume with one component per voxel and image data.

    Label maps, vector (RGB), diffusion and streaming volumes all derive from
    ``vtkMRMLScalarVolumeNode`` in MRML, so the class is compared exactly rather than with ``IsA``.
    """
    if node is None or node.GetClassName() != "vtkMRMLScalarVolumeNode" or node.GetHideFromEditors():
        return False
    image = node.GetImageData()
    return image is not None and image.GetNumberOfScalarComponents() == 1


def default_input_volume(scene: Any) -> Optional[Any]:
    """The first greyscale volume of ``scene`` (in the order it was added), or None.

    ``scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")`` may return a label map or an RGB
    volume, which SSS cannot segment.
    """
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if is_greyscale_volume(node):
            return node
    return None
