"""Test scenarios shared by pytest (tests/slicer, on slicer-core's real MRML classes) and the
module's self-test (SSSSegmentTest, inside Slicer). Each scenario raises AssertionError on failure.

The logic scenarios use only MRML, vtk, numpy and sss_lib, never ``slicer.app`` or Qt, so they run
in both places. Data: the bundled ``lung1_crop_image.nrrd`` (a real CT crop; :func:`find_test_data`
finds it in a source checkout and in an installed extension), else a synthetic phantom. Model:
:func:`make_box_backbone`, a deterministic stand-in for a network (it fills each prompt's box on
nearby slices), so geometry checks know the expected voxels.

:func:`scenario_panel_segments_lung_sample` is what a user does, through the panel itself: the lung
sample, the demo's box, a click on Segment, LiteMedSAM in the SSS service, the Dice against the
sample's label. Inside Slicer the panel is the real one; in tests/slicer it is built on Qt stand-ins.
"""

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import constants as C
from . import geometry, markups, segmentation

BOX_FILL_REACH = 2  # the stand-in model marks a box on its key slice and this many slices each side


# Where the sample data is installed, relative to the module folder (qt-scripted-modules/):
# SSSSegment/CMakeLists.txt copies the repository's Testing/Data there (MODULE_TESTING_DATA_DIR).
INSTALLED_TEST_DATA = os.path.join("Resources", "SSSTestingData")
LUNG_IMAGE = "lung1_crop_image.nrrd"
LUNG_LABEL = "lung1_crop_label.nrrd"
# The lung sample segmented with LiteMedSAM from the demo's box (sss_lib.demo: the tumour's box on
# its largest slice plus 3 px) reaches a 3D Dice of 0.821 (`python -m sss_lib demo --device cpu`,
# and the same through the panel and the service). 0.75 leaves room for GPU arithmetic (bf16
# autocast on CUDA) while failing a wrong box, a wrong slice axis, a shifted or flipped result, an
# empty result or one spilled over the lung (each of those falls below 0.6).
LUNG_DICE_MIN = 0.75


def test_data_candidates(module_dir: str) -> List[str]:
    """Where the sample data may be: the installed extension's copy, then a source checkout's."""
    return [
        os.path.join(module_dir, INSTALLED_TEST_DATA),
        os.path.normpath(os.path.join(module_dir, "..", "Testing", "Data")),
    ]


def find_test_data(module_dir: str) -> str:
    """The folder holding the bundled sample data (``lung1_crop_*.nrrd``), for a module folder.

    Raises:
        FileNotFoundError: neither an installed extension's ``Resources/SSSTestingData`` nor a source
            checkout's ``Testing/Data`` has the lung sample; the message says where it looked.
    """
    for folder in test_data_candidates(module_dir):
        if os.path.isfile(os.path.join(folder, LUNG_IMAGE)) and os.path.isfile(os.path.join(folder, LUNG_LABEL)):
            return folder
    raise FileNotFoundError(
        f"The SSS sample data ({LUNG_IMAGE}, {LUNG_LABEL}) is in none of: "
        + ", ".join(test_data_candidates(module_dir))
        + ". An installed extension carries it in Resources/SSSTestingData: reinstall the SSS extension. "
        "From a source checkout, restore the repository's Testing/Data folder."
    )


def repository_test_data(module_dir: str) -> Optional[str]:
    """The sample data folder (see :func:`find_test_data`), or None when there is none."""
    try:
        return find_test_data(module_dir)
    except FileNotFoundError:
        return None


def load_volume_file(scene: Any, path: str, name: str) -> Any:
    """Read a volume file with a storage node (works without ``slicer.app``)."""
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    if not storage.ReadData(volume):
        raise RuntimeError(f"could not read {path}")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    return volume


def phantom_volume(scene: Any, name: str = "SSS phantom") -> Any:
    """A 64 x 48 x 12 CT-like volume (HU) with a bright ellipsoid, for when no sample file exists."""
    import slicer.util

    k, j, i = np.mgrid[0:12, 0:48, 0:64].astype(float)
    voxels = np.full(k.shape, -800.0)
    voxels[((i - 30) / 10) ** 2 + ((j - 22) / 8) ** 2 + ((k - 6) / 4) ** 2 <= 1] = 60.0
    node = slicer.util.addVolumeFromArray(voxels.astype(np.int16), name=name)
    node.SetSpacing(0.7, 0.7, 3.0)
    return node


def sample_volume(scene: Any, module_dir: str) -> Any:
    data = repository_test_data(module_dir)
    path = os.path.join(data, LUNG_IMAGE) if data else None
    if path and os.path.isfile(path):
        return load_volume_file(scene, path, "lung1_crop")
    return phantom_volume(scene)


def rotation(axis: Tuple[float, float, float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` by ``degrees`` (Rodrigues)."""
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def make_oblique_with_transform(scene: Any, volume_node: Any) -> Any:
    """Tilt the volume's own axes (oblique IJK-to-RAS) and put it under a rotating, shifting transform."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASDirectionMatrix(m)
    direction = geometry.matrix_from_vtk(m)[:3, :3]
    tilted = rotation((1.0, 0.3, 0.2), 17.0) @ direction
    volume_node.SetIJKToRASDirections(
        tilted[0, 0], tilted[0, 1], tilted[0, 2], tilted[1, 0], tilted[1, 1], tilted[1, 2],
        tilted[2, 0], tilted[2, 1], tilted[2, 2],
    )
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation((0.2, -0.5, 1.0), -24.0)
    to_parent[:3, 3] = (12.5, -30.25, 41.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "SSS test transform")
    transform.SetMatrixTransformToParent(geometry.vtk_from_matrix(to_parent))
    volume_node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def make_box_backbone() -> Any:
    """A deterministic stand-in network: each class's box (or a 3-pixel disc around its positive
    points) on the key slice and :data:`BOX_FILL_REACH` slices either side; negative points carve a
    3-pixel disc out. Implements the sss_lib Backbone interface; embeddings are slice means."""
    from sss_lib.backbones.base import Backbone, PropagationStep

    class BoxFillBackbone(Backbone):
        name = "test-box-fill"
        image_size = 0
        weights_sha256 = "test-box-fill"
        eager_embedding = True

        def embed_slice(self, image: np.ndarray) -> Any:
            return float(np.mean(image))

        def propagate(self, slices: np.ndarray, embedding: Any, objects: Any) -> Any:
            n, h, w = slices.shape
            yy, xx = np.mgrid[0:h, 0:w]
            for s in range(n):
                logits = {}
                for label, prompts in objects.items():
                    inside = np.zeros((h, w), dtype=bool)
                    for p in prompts:
                        if abs(s - p.key_slice) > BOX_FILL_REACH:
                            continue
                        embedding(s)
                        inside |= expected_prompt_mask(p, h, w, xx, yy)
                    if inside.any():
                        logits[label] = np.where(inside, 8.0, -8.0).astype(np.float32)
                if logits:
                    yield PropagationStep(s, logits)

    return BoxFillBackbone()


def expected_prompt_mask(prompt: Any, h: int, w: int, xx: Optional[np.ndarray] = None, yy: Optional[np.ndarray] = None) -> np.ndarray:
    """The stand-in network's ``(h, w)`` mask for one prompt on a slice it reaches."""
    if xx is None or yy is None:
        yy, xx = np.mgrid[0:h, 0:w]
    inside = np.zeros((h, w), dtype=bool)
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        inside |= (xx >= math.ceil(x0 - 1e-6)) & (xx <= math.floor(x1 + 1e-6)) & (yy >= math.ceil(y0 - 1e-6)) & (yy <= math.floor(y1 + 1e-6))
    else:
        for x, y in prompt.positive_points:
            inside |= (xx - x) ** 2 + (yy - y) ** 2 <= 9
    for x, y in prompt.negative_points:
        inside &= ~((xx - x) ** 2 + (yy - y) ** 2 <= 9)
    return inside


def example_prompts(volume_node: Any, logic: Any) -> Any:
    """Two classes on the volume's default stack: a box + points, and points only on another slice."""
    import slicer.util
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt

    volume = geometry.sss_volume_from_node(volume_node, voxels=slicer.util.arrayFromVolume(volume_node))
    axis = logic.slice_axis(volume, "auto")
    n, h, w = axis.to_stack(volume.voxels).shape
    s1, s2 = n // 2, max(0, n // 2 - 4)
    tumour = ClassPrompts(
        1, "tumour",
        [SlicePrompt(s1, box=(0.3 * w, 0.35 * h, 0.55 * w, 0.6 * h), positive_points=[(0.42 * w, 0.47 * h)],
                     negative_points=[(0.33 * w, 0.38 * h)], source="auto", confidence=0.83)],
        (230, 80, 60),
    )
    vessel = ClassPrompts(2, "vessel", [SlicePrompt(s2, positive_points=[(0.7 * w, 0.25 * h), (0.72 * w, 0.27 * h)], source="auto", confidence=0.6)], (60, 160, 230))
    return PromptSet(axis, [tumour, vessel])


def physical_prompt_points(prompt_set: Any, volume: Any) -> Dict[Tuple[int, int, str], np.ndarray]:
    """Every prompt coordinate of ``prompt_set`` in LPS mm, keyed by (label, slice, kind)."""
    out = {}
    axis = prompt_set.slice_axis
    for c in prompt_set.classes:
        for p in c.prompts:
            def lps(xys: List[Tuple[float, float]]) -> np.ndarray:
                stack = np.array([[p.key_slice, x, y] for x, y in xys], dtype=float).reshape(-1, 3)
                return volume.voxel_to_physical(axis.stack_to_ijk(stack))

            if p.box is not None:
                out[(c.label, p.key_slice, "box")] = lps([p.box[:2], p.box[2:]])
            out[(c.label, p.key_slice, "positive")] = lps(sorted(p.positive_points))
            out[(c.label, p.key_slice, "negative")] = lps(sorted(p.negative_points))
    return out


# -- scenarios -------------------------------------------------------------------------------------


def scenario_prompt_roundtrip(scene: Any, logic: Any, volume_node: Any) -> float:
    """prompts -> markups -> prompts is exact in physical space; returns the worst error in mm."""
    import slicer.util

    original = example_prompts(volume_node, logic)
    logic.write_prompts(volume_node, original, source=C.SOURCE_AUTO)
    classes = logic.classes(volume_node)
    assert [c.label for c in classes] == [1, 2], [c.label for c in classes]
    assert classes[0].points.GetName() == "SSS tumour points", classes[0].points.GetName()
    assert classes[0].boxes and classes[0].boxes[0].GetName() == "SSS tumour box"
    assert classes[0].source == C.SOURCE_AUTO and classes[0].boxes[0].GetAttribute(C.ATTR_SOURCE) == C.SOURCE_AUTO
    positives = [markups.point_is_positive(classes[0].points, i) for i in range(classes[0].points.GetNumberOfControlPoints())]
    assert sorted(positives) == [False, True], positives
    read = logic.prompts_from_markups(volume_node, original.slice_axis)
    volume = geometry.sss_volume_from_node(volume_node, voxels=slicer.util.arrayFromVolume(volume_node))
    a, b = physical_prompt_points(original, volume), physical_prompt_points(read, volume)
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = max((float(np.abs(a[k] - b[k]).max()) for k in a if a[k].size), default=0.0)
    assert worst < 1e-4, f"prompt round trip moved a coordinate by {worst} mm"
    for c0, c1 in zip(original.classes, read.classes):
        assert (c0.label, c0.name, tuple(c0.color)) == (c1.label, c1.name, tuple(c1.color))
        assert [p.source for p in c1.prompts] == [p.source for p in c0.prompts]
        assert [p.confidence for p in c1.prompts] == [p.confidence for p in c0.prompts]
    return worst


def expected_labels(prompt_set: Any, shape_kji: Tuple[int, int, int]) -> np.ndarray:
    """The stand-in network's label volume ``[k, j, i]`` for ``prompt_set`` (later classes win ties
    only where the engine's argmax would: equal logits keep the lower label)."""
    axis = prompt_set.slice_axis
    stack_shape = axis.to_stack(np.empty(shape_kji, dtype=np.uint8)).shape
    n, h, w = stack_shape
    out = np.zeros(stack_shape, dtype=np.uint16)
    for c in sorted(prompt_set.classes, key=lambda c: c.label):
        for s in range(n):
            inside = np.zeros((h, w), dtype=bool)
            for p in c.prompts:
                if abs(s - p.key_slice) <= BOX_FILL_REACH:
                    inside |= expected_prompt_mask(p, h, w)
            out[s][inside & (out[s] == 0)] = c.label
    return axis.from_stack(out)


def segment_world_geometry(seg_node: Any, segment: str) -> Tuple[np.ndarray, np.ndarray, Tuple[int, ...]]:
    """(voxel-to-world RAS 4x4, the segment's 0/1 array [k, j, i] over its extent, extent)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    to_world = geometry.parent_to_world(seg_node) @ geometry.matrix_from_vtk(m)
    extent = tuple(image.GetExtent())
    dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
    if min(dims) <= 0:
        return to_world, np.zeros((0, 0, 0), dtype=np.uint8), extent
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    return to_world, (values > 0).astype(np.uint8), extent


def check_segmentation_matches(seg_node: Any, volume_node: Any, expected: np.ndarray, classes: List[int]) -> None:
    """Each class's segment lies on the volume's exact world grid and holds ``expected == label``."""
    vol_to_world = geometry.ijk_to_world_ras(volume_node)
    for label in classes:
        sid = segmentation.segment_id(label)
        assert seg_node.GetSegmentation().GetSegment(sid) is not None, f"segment {sid} missing"
        to_world, values, extent = segment_world_geometry(seg_node, sid)
        want = expected == label
        if values.size == 0:
            assert not want.any(), f"segment {sid} is empty but {int(want.sum())} voxels were expected"
            continue
        assert np.allclose(to_world, vol_to_world, atol=1e-6), f"segment {sid} is not on the volume's grid:\n{to_world}\n{vol_to_world}"
        full = np.zeros(expected.shape, dtype=bool)
        i0, i1, j0, j1, k0, k1 = extent
        full[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = values > 0
        assert np.array_equal(full, want), (
            f"segment {sid}: {int((full != want).sum())} voxels differ from the expected mask "
            f"({int(want.sum())} expected, {int(full.sum())} found)"
        )


def check_voxels_inside_boxes(seg_node: Any, volume_node: Any, prompt_set: Any) -> None:
    """Independent physical check: every voxel of a box class lies, in world mm, inside the class's ROI
    footprint (the ROI widened along the slice normal to the stand-in model's reach)."""
    for c in prompt_set.classes:
        box_prompts = [p for p in c.prompts if p.box is not None]
        if not box_prompts:
            continue
        nodes = markups.find_class(seg_node.GetScene(), volume_node, c.label)
        roi = nodes.defined_boxes()[0]
        to_world, values, extent = segment_world_geometry(seg_node, segmentation.segment_id(c.label))
        k, j, i = np.nonzero(values)
        assert k.size > 0, f"class {c.name} has no voxels"
        ijk = np.stack([i + extent[0], j + extent[2], k + extent[4]], axis=1).astype(float)
        world = geometry.apply(to_world, ijk)
        object_to_world = geometry.matrix_from_vtk(roi.GetObjectToWorldMatrix())
        local = geometry.apply(np.linalg.inv(object_to_world), world)
        half = np.array(roi.GetSize()) / 2.0
        slab = (BOX_FILL_REACH + 0.5) * 2 * half[2]
        tol = 1e-3
        assert np.all(np.abs(local[:, 0]) <= half[0] + tol) and np.all(np.abs(local[:, 1]) <= half[1] + tol), (
            f"class {c.name}: a voxel lies outside its box in the slice plane"
        )
        assert np.all(np.abs(local[:, 2]) <= slab + tol), f"class {c.name}: a voxel lies beyond the model's reach"


def scenario_segment_geometry(scene: Any, logic: Any, volume_node: Any) -> Any:
    """Prompts as markups -> engine -> segmentation node on the volume's exact geometry."""
    import slicer.util

    prompts = example_prompts(volume_node, logic)
    logic.write_prompts(volume_node, prompts, source=C.SOURCE_AUTO)
    seg_node, result = logic.segment(volume_node, model="test", device="cpu")
    assert seg_node.GetParentTransformNode() is volume_node.GetParentTransformNode()
    assert seg_node.GetAttribute(C.ATTR_MODEL) == "test-box-fill", seg_node.GetAttribute(C.ATTR_MODEL)
    names = [seg_node.GetSegmentation().GetSegment(segmentation.segment_id(c.label)).GetName() for c in prompts.classes]
    assert names == ["tumour", "vessel"], names
    color = seg_node.GetSegmentation().GetSegment(segmentation.segment_id(2)).GetColor()
    assert np.allclose(color, (60 / 255, 160 / 255, 230 / 255)), color
    read_back = logic.prompts_from_markups(volume_node, prompts.slice_axis)
    shape = tuple(slicer.util.arrayFromVolume(volume_node).shape)
    expected = expected_labels(read_back, shape)
    assert np.array_equal(result.labels.voxels, expected), "engine labels differ from the stand-in model's boxes"
    check_segmentation_matches(seg_node, volume_node, expected, [1, 2])
    check_voxels_inside_boxes(seg_node, volume_node, read_back)
    assert np.array_equal(segmentation.read_labels(scene, seg_node, volume_node), expected)
    return seg_node


def scenario_user_edit_survives_rerun(scene: Any, logic: Any, volume_node: Any) -> None:
    """A box the user moved is recomputed alone on re-run, and stays where the user put it when a
    later PCSW pass writes auto prompts again; the segmentation node is updated in place."""
    import slicer
    import slicer.util
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt

    prompts = example_prompts(volume_node, logic)
    axis = prompts.slice_axis
    logic.write_prompts(volume_node, prompts, source=C.SOURCE_AUTO)
    seg_node, first = logic.segment(volume_node, model="test", device="cpu")
    assert first.recomputed == [1, 2], first.recomputed
    ids_before = _segment_ids(seg_node)

    tumour = logic.class_nodes(volume_node, 1)
    roi = tumour.defined_boxes()[0]
    centre = [0.0, 0.0, 0.0]
    roi.GetCenter(centre)
    # What dragging the ROI does: it moves, then the widget sends PointEndInteractionEvent.
    roi.SetCenter(centre[0] + 3.0, centre[1] - 2.0, centre[2])
    roi.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert tumour.source == C.SOURCE_USER, "editing the box did not mark the class as the user's"
    assert roi.GetAttribute(C.ATTR_SOURCE) == C.SOURCE_USER
    user_centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(user_centre)

    seg_again, second = logic.segment(volume_node, segmentation_node=seg_node, model="test", device="cpu", rerun=True)
    assert seg_again is seg_node
    assert second.recomputed == [1] and second.reused == [2], (second.recomputed, second.reused)
    assert second.embeddings_computed == 0, "a re-run must reuse the slice embeddings"

    # A later PCSW pass proposes new prompts for both classes: only the auto class may change.
    key1, key2 = prompts.classes[0].prompts[0].key_slice, prompts.classes[1].prompts[0].key_slice
    proposal = PromptSet(axis, [
        ClassPrompts(1, "tumour", [SlicePrompt(key1, box=(5, 5, 20, 20), source="auto", confidence=0.9)], (230, 80, 60)),
        ClassPrompts(2, "vessel", [SlicePrompt(key2, box=(30, 10, 40, 20), source="auto", confidence=0.7)], (60, 160, 230)),
    ])
    written = logic.write_prompts(volume_node, proposal, source=C.SOURCE_AUTO)
    assert written == [2], f"only the auto class may be rewritten, got {written}"
    after = [0.0, 0.0, 0.0]
    logic.class_nodes(volume_node, 1).defined_boxes()[0].GetCenterWorld(after)
    assert np.allclose(after, user_centre, atol=1e-9), "the user's box was overwritten"

    _, third = logic.segment(volume_node, segmentation_node=seg_node, model="test", device="cpu", rerun=True)
    assert third.recomputed == [2] and third.reused == [1], (third.recomputed, third.reused)
    _, fourth = logic.segment(volume_node, segmentation_node=seg_node, model="test", device="cpu", rerun=True)
    assert fourth.recomputed == [] and fourth.reused == [1, 2], (fourth.recomputed, fourth.reused)
    assert _segment_ids(seg_node) == ids_before, (_segment_ids(seg_node), ids_before)

    read_back = logic.prompts_from_markups(volume_node, axis)
    assert read_back.classes[0].prompts[0].source == C.SOURCE_USER
    assert read_back.classes[1].prompts[0].box == proposal.classes[1].prompts[0].box or np.allclose(
        read_back.classes[1].prompts[0].box, proposal.classes[1].prompts[0].box, atol=1e-6
    )
    expected = expected_labels(read_back, tuple(slicer.util.arrayFromVolume(volume_node).shape))
    check_segmentation_matches(seg_node, volume_node, expected, [1, 2])


def _segment_ids(seg_node: Any) -> List[str]:
    seg = seg_node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


# -- the panel, as a user drives it ------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """3D Dice of two masks of the same shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def wait_for_panel_run(widget: Any, pump: Callable[[], None], timeout: float) -> None:
    """Let the panel's timer advance its run until it ends: ``pump`` is one turn of the event loop
    (``slicer.app.processEvents`` in Slicer). Cancels the run and fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while widget._run is not None:
        if time.monotonic() > deadline:
            widget.onCancel()
            raise AssertionError(f"the run did not end within {timeout:.0f} s; status: {widget.ui.statusLabel.text!r}")
        pump()


def scenario_panel_segments_lung_sample(
    scene: Any, widget: Any, module_dir: str, pump: Callable[[], None], timeout: float = 900.0
) -> Dict[str, float]:
    """The bundled lung CT through SSS Segment's panel, as a user segments it: choose the volume and
    LiteMedSAM, add a class, draw the demo's box on the tumour's largest slice, click Segment; the run
    goes through the SSS service (started on this computer on the first click) while ``pump`` turns
    the event loop. Checks the segment's name, model, transform and voxel grid, and that its 3D Dice
    against the sample's label is at least :data:`LUNG_DICE_MIN`. Returns ``{"dice", "seconds"}``.
    """
    import slicer
    from sss_lib.demo import box_prompt_from_label
    from sss_lib.volume_io import read_label, read_volume

    data = find_test_data(module_dir)
    volume = load_volume_file(scene, os.path.join(data, LUNG_IMAGE), "lung1_crop")
    reference = read_label(os.path.join(data, LUNG_LABEL), reference=read_volume(os.path.join(data, LUNG_IMAGE)))
    truth = reference.voxels > 0
    demo_prompts = box_prompt_from_label(reference)
    (demo_box,) = demo_prompts.classes[0].prompts

    widget.enter()  # what opening the module does
    pn = widget._parameterNode
    pn.inputVolume = volume
    pn.model = "litemedsam"
    ui = widget.ui
    ui.newClassNameLineEdit.text = "tumour"
    ui.addClassButton.click()
    label = widget._selectedLabel()
    assert label == 1, f"Add class selected label {label}; status: {ui.statusLabel.text!r}"
    # "Add box" hands the class's ROI node to the place mode; the user's drag then sets its corners
    # on the key slice and the click that ends placing fires PointPositionDefinedEvent.
    box_node = widget.logic.begin_box(volume, label)
    markups.write_box(box_node, geometry.ijk_to_world_ras(volume), demo_prompts.slice_axis, demo_box.key_slice,
                      demo_box.box)
    box_node.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)
    assert widget.logic.class_nodes(volume, label).source == C.SOURCE_USER

    assert ui.segmentButton.enabled, f"Segment is disabled; status: {ui.statusLabel.text!r}"
    started = time.perf_counter()
    ui.segmentButton.click()
    assert widget._run is not None, f"Segment started nothing; status: {ui.statusLabel.text!r}"
    assert not ui.segmentButton.enabled, "Segment must be disabled while the run goes on"
    wait_for_panel_run(widget, pump, timeout)
    seconds = time.perf_counter() - started

    seg_node = pn.outputSegmentation
    status = ui.statusLabel.text
    assert seg_node is not None, f"no segmentation after the run; status: {status!r}"
    assert status.startswith("Segmented 1 class(es)") and "litemedsam" in status, status
    assert ui.segmentButton.enabled, "Segment must be enabled again after the run"
    assert seg_node.GetAttribute(C.ATTR_MODEL) == "litemedsam", seg_node.GetAttribute(C.ATTR_MODEL)
    assert seg_node.GetParentTransformNode() is volume.GetParentTransformNode()
    sid = segmentation.segment_id(label)
    segment = seg_node.GetSegmentation().GetSegment(sid)
    assert segment is not None and segment.GetName() == "tumour", f"segment {sid} missing or misnamed"
    to_world, values, extent = segment_world_geometry(seg_node, sid)
    assert values.size and values.any(), "the tumour segment is empty"
    assert np.allclose(to_world, geometry.ijk_to_world_ras(volume), atol=1e-6), (
        f"the segment is not on the volume's voxel grid:\n{to_world}\n{geometry.ijk_to_world_ras(volume)}")
    dims = volume.GetImageData().GetDimensions()
    assert extent[0] >= 0 and extent[2] >= 0 and extent[4] >= 0 and extent[1] < dims[0] and extent[3] < dims[1] \
        and extent[5] < dims[2], f"the segment's extent {extent} leaves the volume {dims}"
    labels = segmentation.read_labels(scene, seg_node, volume)
    assert labels.shape == truth.shape, (labels.shape, truth.shape)
    score = dice(labels == label, truth)
    assert score >= LUNG_DICE_MIN, f"3D Dice {score:.3f} against the sample's label is below {LUNG_DICE_MIN}"
    return {"dice": score, "seconds": seconds}
