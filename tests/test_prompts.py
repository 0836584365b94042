"""Prompts: validation, change fingerprints, JSON in voxel and physical (LPS) coordinates."""

import json

import numpy as np
import pytest

from sss_lib.errors import InputError, PromptError
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis, Volume


def oblique_volume(shape_kji=(10, 40, 50)) -> Volume:
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return Volume(np.zeros(shape_kji, np.int16), (0.7, 0.8, 3.0), (-12.5, 40.0, 7.25), rz @ rx, "oblique")


def two_class_set(axis=SliceAxis(2)) -> PromptSet:
    return PromptSet(axis, [
        ClassPrompts(1, "liver", [SlicePrompt(4, box=(10, 5, 30, 20), positive_points=[(20, 12)],
                                              negative_points=[(11, 6)], source="auto", confidence=0.9)]),
        ClassPrompts(3, "kidney", [SlicePrompt(2, positive_points=[(40, 30)])], color=(0, 0, 255)),
    ])


def test_box_corners_are_normalised_and_prompt_needs_box_or_point():
    assert SlicePrompt(0, box=(30, 20, 10, 5)).box == (10.0, 5.0, 30.0, 20.0)
    with pytest.raises(PromptError, match="needs a box or a positive point"):
        SlicePrompt(0, negative_points=[(1, 1)])
    with pytest.raises(PromptError, match="source"):
        SlicePrompt(0, box=(0, 0, 1, 1), source="robot")


def test_labels_must_be_unique_and_positive():
    p = [SlicePrompt(0, box=(0, 0, 1, 1))]
    with pytest.raises(PromptError, match="unique"):
        PromptSet(SliceAxis(2), [ClassPrompts(1, "a", p), ClassPrompts(1, "b", p)])
    with pytest.raises(PromptError, match="positive"):
        PromptSet(SliceAxis(2), [ClassPrompts(0, "bg", p)])


def test_outside_prompts_are_refused():
    s = two_class_set()
    s.check_inside((10, 40, 50))
    with pytest.raises(PromptError, match="kidney"):
        s.check_inside((10, 25, 50))  # point y=30 outside a 25-row slice
    with pytest.raises(PromptError, match="key slice 4"):
        s.check_inside((3, 40, 50))


def test_fingerprint_changes_only_with_what_changes_the_result():
    a, b = two_class_set(), two_class_set()
    assert a.classes[0].fingerprint() == b.classes[0].fingerprint()
    b.classes[0].name, b.classes[0].color = "renamed", (1, 2, 3)
    assert a.classes[0].fingerprint() == b.classes[0].fingerprint()
    b.classes[0].prompts[0].negative_points.append((12, 7))
    assert b.changed_labels({c.label: c.fingerprint() for c in a.classes}) == [1]


@pytest.mark.parametrize("coordinates", ["voxel", "physical"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_json_round_trip_on_an_oblique_volume(tmp_path, coordinates, axis):
    vol = oblique_volume((50, 50, 50))
    original = two_class_set(SliceAxis(axis))
    path = tmp_path / "p.json"
    original.save(path, vol, coordinates=coordinates)
    data = json.loads(path.read_text())
    assert data["coordinates"] == coordinates
    if coordinates == "physical":
        assert "key_slice" not in data["classes"][0]["prompts"][0]
        assert len(data["classes"][0]["prompts"][0]["box"][0]) == 3
    back = PromptSet.load(path, vol)
    assert back.slice_axis == original.slice_axis
    for c0, c1 in zip(original.classes, back.classes):
        assert (c0.label, c0.name, c0.color) == (c1.label, c1.name, c1.color)
        for p0, p1 in zip(c0.prompts, c1.prompts):
            assert p1.key_slice == p0.key_slice and p1.source == p0.source
            np.testing.assert_allclose(p1.box or (), p0.box or (), atol=1e-6)
            np.testing.assert_allclose(p1.positive_points, p0.positive_points, atol=1e-6)
            assert c0.fingerprint() == c1.fingerprint()


def test_physical_prompt_points_map_to_the_right_voxel():
    vol = oblique_volume()
    ijk = np.array([22.0, 17.0, 6.0])
    lps = vol.voxel_to_physical(ijk)
    data = {"coordinates": "physical", "slice_axis": "k",
            "classes": [{"label": 2, "name": "x", "prompts": [{"positive_points": [lps.tolist()]}]}]}
    ps = PromptSet.from_json(data, vol)
    p = ps.classes[0].prompts[0]
    assert p.key_slice == 6
    np.testing.assert_allclose(p.positive_points[0], (22.0, 17.0), atol=1e-9)


def test_physical_points_on_different_slices_are_refused():
    vol = oblique_volume()
    a = vol.voxel_to_physical([10, 10, 2]).tolist()
    b = vol.voxel_to_physical([12, 10, 5]).tolist()
    data = {"coordinates": "physical", "slice_axis": "k",
            "classes": [{"label": 1, "name": "x", "prompts": [{"box": [a, b]}]}]}
    with pytest.raises(InputError, match="different slices"):
        PromptSet.from_json(data, vol, source="p.json")


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"classes": [{"label": 1}]}', "malformed prompts"),
    ('{"format": "other", "classes": []}', "not an SSS prompts file"),
    ('{"coordinates": "pixels", "classes": []}', "'coordinates' must be"),
    ('{"classes": [{"label": 1, "prompts": [{"key_slice": 99, "box": [1, 1, 5, 5]}]}]}', "outside the volume"),
])
def test_bad_prompt_files_name_the_file_and_problem(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        PromptSet.load(path, oblique_volume())
    assert "bad.json" in str(err.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        PromptSet.load(tmp_path / "nope.json", oblique_volume())
