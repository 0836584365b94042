"""Volume geometry: voxel <-> physical, slice stacks along each axis, content hash."""

import numpy as np
import pytest

from sss_lib.errors import InputError
from sss_lib.volume import SliceAxis, Volume, axis_from_name, lps_to_ras


def make(spacing=(0.5, 0.6, 4.0)) -> Volume:
    rng = np.random.default_rng(0)
    d = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    return Volume(rng.integers(0, 100, (5, 6, 7)).astype(np.int16), spacing, (10, -20, 30), d, "v")


def test_voxel_physical_round_trip_and_matrix():
    v = make()
    ijk = np.array([[0, 0, 0], [6, 5, 4], [1.5, 2.25, 3.0]])
    lps = v.voxel_to_physical(ijk)
    np.testing.assert_allclose(lps[0], v.origin)
    expected = v.origin + v.direction @ (v.spacing * ijk[1])
    np.testing.assert_allclose(lps[1], expected)
    np.testing.assert_allclose(v.physical_to_voxel(lps), ijk, atol=1e-9)


def test_lps_ras_flip():
    np.testing.assert_allclose(lps_to_ras([[1, 2, 3]]), [[-1, -2, 3]])


def test_default_axis_is_largest_spacing_and_can_be_chosen():
    assert make((0.5, 0.6, 4.0)).default_slice_axis() == SliceAxis(2)
    assert make((3.0, 0.6, 0.5)).default_slice_axis() == SliceAxis(0)
    assert make((1.0, 1.0, 1.0)).default_slice_axis() == SliceAxis(2)
    v = make()
    assert axis_from_name("j", v) == SliceAxis(1) and axis_from_name(None, v) == SliceAxis(2)
    with pytest.raises(InputError, match="unknown slice axis"):
        axis_from_name("z", v)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stack_views_map_coordinates_consistently(axis):
    v = make()
    a = SliceAxis(axis)
    stack = a.to_stack(v.voxels)
    np.testing.assert_array_equal(a.from_stack(stack), v.voxels)
    s, y, x = 2, 3, 4  # stack index [s, y, x]
    i, j, k = a.stack_to_ijk(np.array([s, x, y])).astype(int)
    assert stack[s, y, x] == v.voxels[k, j, i]
    np.testing.assert_allclose(a.ijk_to_stack([i, j, k]), [s, x, y])


def test_content_hash_tracks_voxels_and_geometry():
    a, b = make(), make()
    assert a.content_hash() == b.content_hash()
    b.voxels[0, 0, 0] += 1
    assert a.content_hash() != b.content_hash()
    c = make()
    c.origin = c.origin + 1
    assert a.content_hash() != c.content_hash()


def test_bad_geometry_is_refused():
    with pytest.raises(InputError, match="3D"):
        Volume(np.zeros((4, 4)), (1, 1, 1), (0, 0, 0), np.eye(3), "flat.nrrd")
    with pytest.raises(InputError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), (1, 0, 1), (0, 0, 0), np.eye(3), "x")
