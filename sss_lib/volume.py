"""A volume with its real geometry, and the slice-stack view the engine works on.

Physical convention: **LPS** (x to the patient's Left, y Posterior, z Superior), the convention of
DICOM, ITK and the NRRD files we read. Files in RAS (NIfTI's qform/sform) are converted at the file
boundary by :mod:`sss_lib.volume_io`; nothing inside the library ever sees RAS. Slicer works in RAS:
its modules convert with :func:`lps_to_ras` at the MRML boundary.

Voxel order: ``Volume.voxels`` is a C-ordered numpy array indexed ``[k, j, i]`` (the order of
SimpleITK's ``GetArrayFromImage`` and Slicer's ``arrayFromVolume``). Geometry vectors are given per
index axis in ``(i, j, k)`` order: ``spacing[0]`` is the step along ``i``, and column ``a`` of
``direction`` is the unit LPS vector of index axis ``a``. Hence
``lps = origin + direction @ (spacing * ijk)``.

Slice stacks: the engine sees a volume as ``S`` 2D slices of ``H x W`` pixels along one index axis
(:class:`SliceAxis`). On a slice, ``x`` is the column (width) and ``y`` the row (height), as SAM-2's
XY points and XYXY boxes expect.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Convert LPS points ``(..., 3)`` to RAS (flip x and y); the map is its own inverse."""
    return np.asarray(points, dtype=float) @ LPS_TO_RAS


ras_to_lps = lps_to_ras


@dataclasses.dataclass(frozen=True)
class SliceAxis:
    """Which index axis (0 = i, 1 = j, 2 = k) the slices are taken along.

    For ``axis == 2`` (the usual axial stack) slice ``s`` is ``voxels[s]``, ``x = i`` and ``y = j``;
    for ``axis == 1`` slice ``s`` is ``voxels[:, s, :]``, ``x = i``, ``y = k``; for ``axis == 0`` it
    is ``voxels[:, :, s]``, ``x = j``, ``y = k``.
    """

    axis: int

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0 (i), 1 (j) or 2 (k), got {self.axis}")

    @property
    def in_plane_axes(self) -> tuple[int, int]:
        """Index axes (as i=0, j=1, k=2) that become the slice's ``x`` and ``y``."""
        return {2: (0, 1), 1: (0, 2), 0: (1, 2)}[self.axis]

    def to_stack(self, kji: np.ndarray) -> np.ndarray:
        """View a ``[k, j, i]`` array as a ``(S, H, W)`` stack (a view, not a copy)."""
        if self.axis == 2:
            return kji
        if self.axis == 1:
            return np.moveaxis(kji, 1, 0)  # (J, K, I): H = k, W = i
        return np.moveaxis(kji, 2, 0)  # (I, K, J): H = k, W = j

    def from_stack(self, stack: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_stack`; returns a C-contiguous ``[k, j, i]`` array."""
        if self.axis == 2:
            out = stack
        elif self.axis == 1:
            out = np.moveaxis(stack, 0, 1)
        else:
            out = np.moveaxis(stack, 0, 2)
        return np.ascontiguousarray(out)

    def stack_to_ijk(self, sxy: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` stack coordinates ``(s, x, y)`` to voxel ``(i, j, k)``."""
        sxy = np.asarray(sxy, dtype=float)
        out = np.empty_like(sxy)
        ax, ay = self.in_plane_axes
        out[..., self.axis] = sxy[..., 0]
        out[..., ax] = sxy[..., 1]
        out[..., ay] = sxy[..., 2]
        return out

    def ijk_to_stack(self, ijk: np.ndarray) -> np.ndarray:
        """Map ``(..., 3)`` voxel ``(i, j, k)`` to stack coordinates ``(s, x, y)``."""
        ijk = np.asarray(ijk, dtype=float)
        ax, ay = self.in_plane_axes
        return np.stack([ijk[..., self.axis], ijk[..., ax], ijk[..., ay]], axis=-1)


@dataclasses.dataclass
class Volume:
    """A 3D scalar volume with its geometry (LPS, see the module docstring).

    Attributes:
        voxels: ``[k, j, i]`` array.
        spacing: voxel size in mm along ``(i, j, k)``.
        origin: LPS position in mm of voxel ``(0, 0, 0)``'s centre.
        direction: 3x3; column ``a`` is the LPS unit vector of index axis ``a``.
        source: where it came from (a path), used in error messages.
    """

    voxels: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        self.spacing = np.asarray(self.spacing, dtype=float).reshape(3)
        self.origin = np.asarray(self.origin, dtype=float).reshape(3)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if self.voxels.ndim != 3:
            raise InputError(self.source, f"expected a 3D volume, got {self.voxels.ndim} dimensions")
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise InputError(self.source, f"voxel spacing must be positive and finite, got {self.spacing.tolist()}")

    # -- geometry -------------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.voxels.shape
        return (i, j, k)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 homogeneous matrix from voxel ``(i, j, k, 1)`` to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing[None, :]
        m[:3, 3] = self.origin
        return m

    @property
    def lps_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_lps)

    def voxel_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """``(..., 3)`` continuous voxel indices ``(i, j, k)`` -> LPS mm."""
        ijk = np.asarray(ijk, dtype=float)
        m = self.ijk_to_lps
        return ijk @ m[:3, :3].T + m[:3, 3]

    def physical_to_voxel(self, lps: np.ndarray) -> np.ndarray:
        """``(..., 3)`` LPS mm -> continuous voxel indices ``(i, j, k)``."""
        lps = np.asarray(lps, dtype=float)
        m = self.lps_to_ijk
        return lps @ m[:3, :3].T + m[:3, 3]

    def same_grid(self, other: "Volume", tol: float = 1e-5) -> bool:
        """True when ``other`` has this volume's shape, spacing, origin and direction."""
        return (
            self.voxels.shape == other.voxels.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_voxels(self, voxels: np.ndarray, source: str = "") -> "Volume":
        """A volume on this grid holding ``voxels`` (e.g. a label map)."""
        if voxels.shape != self.voxels.shape:
            raise ValueError(f"voxels of shape {voxels.shape} do not fit grid {self.voxels.shape}")
        return Volume(voxels, self.spacing.copy(), self.origin.copy(), self.direction.copy(), source)

    # -- slicing --------------------------------------------------------------------------------
    def default_slice_axis(self) -> SliceAxis:
        """The axis of largest spacing (the acquisition axis); ties go to ``k``."""
        largest = float(np.max(self.spacing))
        for axis in (2, 1, 0):
            if np.isclose(self.spacing[axis], largest, rtol=1e-3):
                return SliceAxis(axis)
        raise AssertionError("unreachable")

    def slice_stack(self, axis: SliceAxis | None = None) -> np.ndarray:
        """The ``(S, H, W)`` stack along ``axis`` (default: :meth:`default_slice_axis`)."""
        return (axis or self.default_slice_axis()).to_stack(self.voxels)

    def in_plane_spacing(self, axis: SliceAxis) -> tuple[float, float]:
        """Pixel size in mm along a slice's ``(x, y)``."""
        ax, ay = axis.in_plane_axes
        return float(self.spacing[ax]), float(self.spacing[ay])

    def content_hash(self) -> str:
        """SHA-256 of the voxel values, dtype, shape and geometry (the embedding cache's key)."""
        h = hashlib.sha256()
        arr = np.ascontiguousarray(self.voxels)
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(memoryview(arr).cast("B"))
        for part in (self.spacing, self.origin, self.direction):
            h.update(np.round(part, 6).tobytes())
        return h.hexdigest()


def axis_from_name(name: str | int | None, volume: Volume) -> SliceAxis:
    """Parse a user's slice axis: None/"auto", 0/1/2, or "i"/"j"/"k"."""
    if name is None or name == "auto":
        return volume.default_slice_axis()
    lookup = {"i": 0, "j": 1, "k": 2, "0": 0, "1": 1, "2": 2}
    key = str(name).lower()
    if key not in lookup:
        raise InputError(None, f"unknown slice axis {name!r}", "Use auto, i, j or k.")
    return SliceAxis(lookup[key])


def bounding_slices(mask_stack: np.ndarray) -> Iterable[int]:
    """Indices of the slices of a ``(S, H, W)`` mask stack that hold any foreground."""
    return np.flatnonzero(mask_stack.reshape(mask_stack.shape[0], -1).any(axis=1)).tolist()
