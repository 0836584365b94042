"""'Not on this slice' markers: in the prompts (JSON v2, old files still read), and in propagation:
the class is empty on a marked slice, nothing propagates across it, and a class with only markers
is empty everywhere. SAM-2.1 tiny at random init (structure: which slices hold the class)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sss_lib.backbones.base import ABSENT_LOGIT
from sss_lib.engine import SegmentationSession
from sss_lib.errors import InputError, PromptError
from sss_lib.prompts import FORMAT_VERSION, ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis, Volume

torch = pytest.importorskip("torch")


def oblique_volume(shape_kji=(10, 40, 50)) -> Volume:
    """A volume rotated about z and shifted, so voxel and physical coordinates differ."""
    c, s = np.cos(0.4), np.sin(0.4)
    return Volume(np.zeros(shape_kji, np.int16), (0.7, 0.9, 2.5), (4.0, -8.0, 30.0),
                  np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]), "oblique")


def marked_set(axis=SliceAxis(2)) -> PromptSet:
    return PromptSet(axis, [ClassPrompts(2, "lesion", [
        SlicePrompt(4, box=(10, 5, 30, 20)), SlicePrompt.not_on_slice(7), SlicePrompt.not_on_slice(1, source="auto"),
    ])])


@pytest.mark.parametrize("coordinates", ["voxel", "physical"])
@pytest.mark.parametrize("axis", [0, 2])
def test_markers_round_trip_through_json(tmp_path, coordinates, axis):
    vol = oblique_volume((40, 40, 40))
    original = marked_set(SliceAxis(axis))
    path = tmp_path / "p.json"
    original.save(path, vol, coordinates=coordinates)
    data = json.loads(path.read_text())
    assert data["version"] == FORMAT_VERSION == 2
    marker = data["classes"][0]["prompts"][1]
    assert marker["kind"] == "absent" and "box" not in marker
    if coordinates == "physical":
        assert "key_slice" not in marker and len(marker["point"]) == 3
    back = PromptSet.load(path, vol)
    (c,) = back.classes
    assert [(p.key_slice, p.absent, p.source) for p in c.prompts] == [(4, False, "user"), (7, True, "user"), (1, True, "auto")]
    assert c.fingerprint() == original.classes[0].fingerprint()
    assert c.absent_slices() == [1, 7] and list(c.key_slices()) == [4]


def test_version_1_files_are_still_read_and_newer_ones_refused():
    vol = oblique_volume()
    v1 = {"format": "sss-prompts", "version": 1, "coordinates": "voxel", "slice_axis": "k",
          "classes": [{"label": 1, "name": "t", "prompts": [{"key_slice": 3, "box": [1, 1, 9, 9]}]}]}
    (c,) = PromptSet.from_json(v1, vol).classes
    assert c.prompts[0].box == (1, 1, 9, 9) and not c.prompts[0].absent
    with pytest.raises(InputError, match="newer"):
        PromptSet.from_json({**v1, "version": FORMAT_VERSION + 1}, vol)
    bad = {**v1, "classes": [{"label": 1, "prompts": [{"key_slice": 3, "kind": "maybe"}]}]}
    with pytest.raises(InputError, match="kind"):
        PromptSet.from_json(bad, vol)


def test_marker_rules_and_fingerprint():
    with pytest.raises(PromptError, match="cannot have a box"):
        SlicePrompt(3, box=(0, 0, 4, 4), absent=True)
    with pytest.raises(PromptError, match="both a prompt and a 'not on this slice'"):
        ClassPrompts(1, "t", [SlicePrompt(3, box=(0, 0, 4, 4)), SlicePrompt.not_on_slice(3)])
    # A user's marker overrides an automatic prompt on the same slice (and vice versa).
    c = ClassPrompts(1, "t", [SlicePrompt(3, box=(0, 0, 4, 4), source="auto"), SlicePrompt.not_on_slice(3)])
    assert c.absent_slices() == [3] and c.key_slices() == {}
    plain = ClassPrompts(1, "t", [SlicePrompt(3, box=(0, 0, 4, 4))])
    marked = ClassPrompts(1, "t", plain.prompts + [SlicePrompt.not_on_slice(5)])
    assert plain.fingerprint() != marked.fingerprint()


# -- propagation --------------------------------------------------------------------------------
N, SIZE = 8, 48
BOX = (14, 12, 33, 29)


@pytest.fixture(scope="module")
def phantom(bright_box_volume) -> Volume:
    return bright_box_volume(N, SIZE, seed=5)


def reached(logits: np.ndarray) -> list[int]:
    """Slices with real logits (not the 'never reached' fill)."""
    return [s for s in range(len(logits)) if not np.all(logits[s] == np.float16(ABSENT_LOGIT))]


def test_propagation_never_crosses_a_marker(sam2_to_span_edge, phantom):
    session = SegmentationSession(phantom, sam2_to_span_edge)
    session.segment(PromptSet(SliceAxis(2), [ClassPrompts(1, "a", [SlicePrompt(2, box=BOX)])]))
    assert reached(session.class_logits(1)) == list(range(N))
    unmarked = session.class_logits(1).copy()

    prompts = [SlicePrompt(2, box=BOX), SlicePrompt.not_on_slice(4), SlicePrompt(7, box=BOX)]
    result = session.segment(PromptSet(SliceAxis(2), [ClassPrompts(1, "a", prompts)]))
    logits = session.class_logits(1)
    # 0-3 from key 2, 4 empty, 5-6 from key 7 (backward only: nothing from key 2 crosses slice 4).
    assert reached(logits) == [0, 1, 2, 3, 5, 6, 7]
    assert 4 not in result.slices_per_class[1]
    # Below the marker nothing changed: the span [0, 1] and key 2 were kept; [3] was recomputed
    # (its span now ends at the marker) and equals the unmarked run there (same run from key 2).
    np.testing.assert_array_equal(logits[:4], unmarked[:4])
    assert result.recomputed_slices == {1: [3, 5, 6, 7]}

    # The backbone itself honours markers too (no engine).
    steps = list(sam2_to_span_edge.propagate(session.slices, session.embedding, {1: prompts}))
    assert sorted(st.slice_index for st in steps) == [0, 1, 2, 3, 5, 6, 7]


def test_a_class_with_only_markers_is_empty_everywhere(sam2_to_span_edge, phantom):
    session = SegmentationSession(phantom, sam2_to_span_edge)
    prompts = PromptSet(SliceAxis(2), [
        ClassPrompts(1, "a", [SlicePrompt(3, box=BOX)]),
        ClassPrompts(2, "gone", [SlicePrompt.not_on_slice(3), SlicePrompt.not_on_slice(6)]),
    ])
    result = session.segment(prompts)
    assert reached(session.class_logits(2)) == [] and result.slices_per_class[2] == []
    assert result.recomputed == [1, 2] and result.slices_per_class[1]
    assert list(sam2_to_span_edge.propagate(session.slices, session.embedding, {2: prompts.classes[1].prompts})) == []


def test_litemedsam_marker_only_class_embeds_nothing():
    from sss_lib.backbones.litemedsam import build_litemedsam_backbone

    vol = Volume(np.zeros((5, 16, 16), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3), "zeros")
    session = SegmentationSession(vol, build_litemedsam_backbone(device="cpu"))
    result = session.segment(PromptSet(SliceAxis(2), [ClassPrompts(1, "a", [SlicePrompt.not_on_slice(2)])]))
    assert result.embeddings_computed == 0 and not result.labels.voxels.any()
