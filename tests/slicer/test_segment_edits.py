"""Segment Editor edits and re-runs: what SSS wrote is recorded, later edits are found slice by
slice, and a re-run either overwrites them or keeps the edited slices (real segmentation nodes)."""

import numpy as np
import pytest

CLASSES = [(1, "tumour", (230, 80, 60)), (2, "node", (60, 160, 230))]


@pytest.fixture
def volume(scene):
    """A small volume, oblique and under a rotating parent transform (the hard case for grids)."""
    import slicer.util

    from SSSSegmentLib import testing

    node = slicer.util.addVolumeFromArray(np.zeros((10, 24, 28), dtype=np.int16), name="small")
    node.SetSpacing(0.9, 0.9, 2.0)
    testing.make_oblique_with_transform(scene, node)
    return node


def first_labels():
    labels = np.zeros((10, 24, 28), dtype=np.uint16)
    labels[2:8, 5:15, 6:16] = 1
    labels[3:6, 16:22, 18:26] = 2
    return labels


def second_labels():
    """The re-run's result: class 1 moved two voxels along i, class 2 as before."""
    labels = np.zeros((10, 24, 28), dtype=np.uint16)
    labels[2:8, 5:15, 8:18] = 1
    labels[3:6, 16:22, 18:26] = 2
    return labels


@pytest.fixture
def written(scene, volume):
    from SSSSegmentLib import segmentation

    node = segmentation.prepare_segmentation(scene, volume)
    segmentation.write_class_segments(scene, node, volume, first_labels(), CLASSES)
    return node


def paint(scene, seg_node, volume, label, change):
    """Edit a segment's voxels as the Segment Editor does (write its binary labelmap)."""
    import slicer.util

    from SSSSegmentLib import segmentation

    sid = segmentation.segment_id(label)
    mask = segmentation.read_segment_mask(scene, seg_node, volume, sid)
    change(mask)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg_node, sid, volume)
    return mask


def test_what_sss_wrote_is_not_an_edit(scene, volume, written):
    from SSSSegmentLib import edit_guard

    assert edit_guard.find_edits(scene, written, volume) == []
    never = lambda text, details: pytest.fail("asked although nothing was edited")  # noqa: E731
    assert edit_guard.ask_how_to_write(scene, written, volume, [1, 2], ask=never) == edit_guard.OVERWRITE


def test_painted_slice_is_found(scene, volume, written):
    from SSSSegmentLib import edit_guard

    def fill_hole(mask):
        mask[5, 15:18, 6:16] = 1  # a brush stroke on axial slice k = 5

    paint(scene, written, volume, 1, fill_hole)
    (report,) = edit_guard.find_edits(scene, written, volume)
    assert (report.label, report.name, report.axis, report.slices) == (1, "tumour", 0, [5])
    asked = []
    answer = edit_guard.ask_how_to_write(scene, written, volume, [1, 2], ask=lambda t, d: asked.append((t, d)) or edit_guard.CANCEL)
    assert answer == edit_guard.CANCEL
    assert "'tumour'" in asked[0][0] and "Keep edited slices" in asked[0][0] and "along k (5)" in asked[0][1]
    assert edit_guard.find_edits(scene, written, volume, labels=[2]) == [], "only the classes asked about"


def test_edit_in_a_sagittal_view_is_measured_along_i(scene, volume, written):
    from SSSSegmentLib import edit_guard

    def erase_column(mask):
        mask[:, :, 10] = 0  # erased on sagittal slice i = 10 (touches every k slice of the class)

    paint(scene, written, volume, 1, erase_column)
    (report,) = edit_guard.find_edits(scene, written, volume)
    assert (report.axis, report.slices) == (2, [10])


def test_keep_edited_slices_merges(scene, volume, written):
    from SSSSegmentLib import edit_guard, segmentation

    def fill_hole(mask):
        mask[5, 15:18, 6:16] = 1

    painted = paint(scene, written, volume, 1, fill_hole)
    new = second_labels()
    segmentation.write_class_segments(scene, written, volume, new, CLASSES, update=[1], keep_edited=True)
    now = segmentation.read_segment_mask(scene, written, volume, segmentation.segment_id(1))
    assert np.array_equal(now[5], painted[5]), "the painted slice keeps the user's voxels"
    others = [k for k in range(10) if k != 5]
    assert np.array_equal(now[others], (new[others] == 1)), "every other slice gets the new result"
    assert np.array_equal(segmentation.read_labels(scene, written, volume) == 2, new == 2)
    # The kept slice stays protected on the next run.
    (report,) = edit_guard.find_edits(scene, written, volume)
    assert (report.label, report.axis, report.slices) == (1, 0, [5])


def test_overwrite_replaces_the_edit(scene, volume, written):
    from SSSSegmentLib import edit_guard, segmentation

    paint(scene, written, volume, 1, lambda mask: mask.__setitem__((5, slice(15, 18), slice(6, 16)), 1))
    new = second_labels()
    segmentation.write_class_segments(scene, written, volume, new, CLASSES, update=[1])
    assert np.array_equal(segmentation.read_labels(scene, written, volume), new)
    assert edit_guard.find_edits(scene, written, volume) == []


def test_record_survives_saving_the_segmentation(scene, volume, written, tmp_path):
    import slicer

    from SSSSegmentLib import constants as C
    from SSSSegmentLib import edit_guard, segmentation

    paint(scene, written, volume, 2, lambda mask: mask.__setitem__((4, slice(16, 22), slice(18, 26)), 0))
    path = str(tmp_path / "result.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    assert storage.WriteData(written)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(path)
    assert reader.ReadData(loaded)
    loaded.SetAndObserveTransformNodeID(written.GetTransformNodeID())
    segment = loaded.GetSegmentation().GetSegment(segmentation.segment_id(2))
    assert edit_guard.decode_record(edit_guard._tag(segment, C.ATTR_WRITTEN_SLICES)) is not None
    (report,) = edit_guard.find_edits(scene, loaded, volume)
    assert (report.label, report.axis, report.slices) == (2, 0, [4])


def test_segments_without_a_record_count_as_unedited(scene, volume, written):
    from SSSSegmentLib import constants as C
    from SSSSegmentLib import edit_guard, segmentation

    written.GetSegmentation().GetSegment(segmentation.segment_id(1)).RemoveTag(C.ATTR_WRITTEN_SLICES)
    paint(scene, written, volume, 1, lambda mask: mask.__setitem__((5, 0, 0), 1))
    assert edit_guard.find_edits(scene, written, volume) == []
    assert edit_guard.decode_record("garbled") is None and edit_guard.decode_record(None) is None


def test_record_text_is_safe_in_a_seg_nrrd_header():
    from SSSSegmentLib import edit_guard

    mask = np.zeros((3, 4, 5), dtype=np.uint8)
    mask[1, 2, 3] = 1
    text = edit_guard.encode_record(mask)
    assert "|" not in text and ":" not in text
    record = edit_guard.decode_record(text)
    assert record.shape == (3, 4, 5) and [len(d) for d in record.digests] == [3, 4, 5]
    assert edit_guard.edited_slices(mask, record) is None
    mask[0, 0, 0] = 1
    assert edit_guard.edited_slices(mask, record) == (0, [0])
    assert edit_guard._ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_slice_digests_match_their_definition():
    """Chunked over the bounding box, the digests equal the per-slice weighted sums mod 2**64."""
    from SSSSegmentLib import edit_guard

    rng = np.random.default_rng(3)
    mask = np.zeros((40, 9, 11), dtype=np.uint8)  # more k slices than one chunk
    mask[3:37, 2:8, 1:10] = rng.random((34, 6, 9)) < 0.4
    mask[10, 3, 4], mask[10, 4, 3] = 1, 0
    w = [[int(v) for v in edit_guard._weights(a, n)] for a, n in enumerate(mask.shape)]
    expected = ([], [], [])
    for k in range(40):
        expected[0].append(sum(w[1][j] * w[2][i] for j, i in zip(*np.nonzero(mask[k]))) % 2**64)
    for j in range(9):
        expected[1].append(sum(w[0][k] * w[2][i] for k, i in zip(*np.nonzero(mask[:, j, :]))) % 2**64)
    for i in range(11):
        expected[2].append(sum(w[0][k] * w[1][j] for k, j in zip(*np.nonzero(mask[:, :, i]))) % 2**64)
    got = edit_guard.slice_digests(mask)
    assert [d.tolist() for d in got] == [list(e) for e in expected]
    moved = mask.copy()
    moved[10, 3, 4], moved[10, 4, 3] = mask[10, 4, 3], mask[10, 3, 4]  # swap two voxels of slice 10
    assert edit_guard.slice_digests(moved)[0][10] != got[0][10]


def test_finish_run_keeps_a_painted_slice_only_when_asked(scene, volume):
    """The logic's write of a run's result (SegmentLogic.finish_run, which the panel calls after
    edit_guard.ask_how_to_write): keep_edited=True keeps the painted slice, False overwrites it."""
    from SSSSegmentLib import edit_guard, geometry, markups, segmentation, testing
    from SSSSegmentLib.logic import SegmentLogic, labels_to_write

    logic = SegmentLogic(backbone_factory=lambda model, device: testing.make_box_backbone())
    nodes = logic.add_class(volume, "tumour")
    axis = logic.slice_axis(geometry.sss_volume_from_node(volume), "k")
    markups.write_box(logic.begin_box(volume, nodes.label), geometry.ijk_to_world_ras(volume), axis, 5, (6, 5, 15, 14))
    seg, _ = logic.segment(volume, axis_name="k")
    result = segmentation.read_segment_mask(scene, seg, volume, segmentation.segment_id(1))
    assert result[5].any() and not result[0].any()

    painted = paint(scene, seg, volume, 1, lambda mask: mask.__setitem__((5, slice(0, 3), slice(0, 3)), 1))
    request = logic.prepare_run(volume, axis_name="k")  # a Segment click: every class is recomputed
    outcome = logic.make_work(request)(lambda text, fraction: None, lambda: False)
    assert labels_to_write(outcome.result) == [1]
    assert [r.label for r in edit_guard.find_edits(scene, seg, volume, labels_to_write(outcome.result))] == [1]

    logic.finish_run(request, outcome, seg, keep_edited=True)
    kept = segmentation.read_segment_mask(scene, seg, volume, segmentation.segment_id(1))
    assert np.array_equal(kept[5], painted[5]) and not np.array_equal(kept[5], result[5])
    others = [k for k in range(10) if k != 5]
    assert np.array_equal(kept[others], result[others])

    logic.finish_run(request, outcome, seg, keep_edited=False)
    assert np.array_equal(segmentation.read_segment_mask(scene, seg, volume, segmentation.segment_id(1)), result)
    assert edit_guard.find_edits(scene, seg, volume) == []
