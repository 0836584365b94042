"""Volume-node geometry: MRML (RAS, parent transforms) to sss_lib (LPS, one IJK-to-physical matrix).

Slicer keeps a volume's voxel-to-RAS matrix (``IJKToRAS``) in the node's own frame and a chain of
parent transforms above it. sss_lib works in LPS world coordinates. This module composes the two:
``world_ras = ParentToWorld @ IJKToRAS @ (i, j, k, 1)`` and ``lps = diag(-1, -1, 1) @ world_ras``.
Only linear parent transforms are supported (a warped volume has no single voxel grid); the error
says to harden the transform.

All 4x4 matrices are numpy float arrays acting on column vectors ``(x, y, z, 1)``.
"""

from typing import Any, Optional

import numpy as np

from .errors import UserFacingError

RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def matrix_from_vtk(vtk_matrix: Any) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtk_from_matrix(matrix: np.ndarray) -> Any:
    """A 4x4 numpy array as a new ``vtkMatrix4x4``."""
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def parent_to_world(node: Any) -> np.ndarray:
    """4x4 from ``node``'s own coordinates to world RAS (identity when it has no parent transform).

    Raises:
        UserFacingError: the parent transform chain is not linear.
    """
    import vtk

    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise UserFacingError(
            f"'{node.GetName()}' is under the non-linear transform '{transform_node.GetName()}'. "
            "SSS needs a voxel grid: harden the transform (Data module, right-click > Harden transform) "
            "or use a linear transform."
        )
    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(m)
    return matrix_from_vtk(m)


def ijk_to_world_ras(volume_node: Any) -> np.ndarray:
    """4x4 from voxel ``(i, j, k, 1)`` to world RAS, parent transforms included."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return parent_to_world(volume_node) @ matrix_from_vtk(m)


def ijk_to_world_lps(volume_node: Any) -> np.ndarray:
    """4x4 from voxel ``(i, j, k, 1)`` to world LPS (sss_lib's convention)."""
    return RAS_TO_LPS_4 @ ijk_to_world_ras(volume_node)


def check_scalar_volume(volume_node: Any) -> None:
    """Raise :class:`UserFacingError` unless ``volume_node`` holds a 3D single-component image."""
    if volume_node is None:
        raise UserFacingError("Select an input volume first.")
    image = volume_node.GetImageData()
    if image is None:
        raise UserFacingError(f"Volume '{volume_node.GetName()}' has no image data; load or select another volume.")
    if image.GetNumberOfScalarComponents() != 1:
        raise UserFacingError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "SSS needs a single-component (greyscale) volume. Convert it with the Vector to Scalar Volume module."
        )


def sss_volume_from_node(volume_node: Any, voxels: Optional[np.ndarray] = None) -> Any:
    """The volume node as an ``sss_lib.volume.Volume`` in world LPS, voxels copied.

    Args:
        volume_node: a ``vtkMRMLScalarVolumeNode`` (parent transform, if any, must be linear).
        voxels: use this ``[k, j, i]`` array instead of copying the node's (tests, cached copies).

    Returns:
        ``Volume`` whose ``voxels`` are ``[k, j, i]`` (a copy the caller may hand to another thread),
        ``spacing``/``direction``/``origin`` derived from the composed IJK-to-LPS matrix: spacing is
        the length of each matrix column (a scaling transform scales it), direction the unit columns.
    """
    import slicer.util
    from sss_lib.volume import Volume

    check_scalar_volume(volume_node)
    if voxels is None:
        voxels = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    m = ijk_to_world_lps(volume_node)
    linear = m[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise UserFacingError(f"Volume '{volume_node.GetName()}' has a degenerate voxel-to-world matrix.")
    return Volume(
        voxels=voxels,
        spacing=spacing,
        origin=m[:3, 3].copy(),
        direction=linear / spacing[None, :],
        source=volume_node.GetName(),
    )


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 ``matrix`` to ``(..., 3)`` points."""
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]
