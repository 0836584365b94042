"""End to end with a real network, in this process: markups -> SAM-2.1 -> segmentation node.

The volume is a 64 x 64 x 10 crop of the real lung CT around its tumour, made oblique and put under a
parent transform. The network is SAM-2.1 tiny at random init and 64 px input (no weights file, a few
seconds on a CPU), so the masks are meaningless but every step is the real one: SegmentLogic.prepare_run
/ make_work (called in this thread, as scripts do) / finish_run. The panel's path, through the SSS
service in its own process, is tested in test_service_segment.py.
"""

import time

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("two_torch_threads")


def sam2_tiny_factory(model, device):
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone

    assert model == "sam2.1_hiera_tiny" and device == "cpu"
    return build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, device="cpu")


def run_here(logic, request, should_cancel=lambda: False):
    """The in-process run; returns ``(progress reports as (text, fraction), outcome)``."""
    reports = []
    outcome = logic.make_work(request)(lambda text, fraction: reports.append((text, fraction)), should_cancel)
    return reports, outcome


def test_box_on_transformed_volume_to_segmentation_with_sam2(scene, crop_volume, tumour_box):
    import slicer

    from SSSSegmentLib import constants as C
    from SSSSegmentLib import geometry, markups, testing
    from SSSSegmentLib.logic import SegmentLogic, status_text

    logic = SegmentLogic(backbone_factory=sam2_tiny_factory)
    tumour = logic.add_class(crop_volume, "tumour", (230, 80, 60))
    # Place the box as a user would: an ROI in world coordinates on the key slice.
    volume = geometry.sss_volume_from_node(crop_volume)
    axis = logic.slice_axis(volume, "auto")
    assert axis.axis == 2  # 5 mm slices
    box = logic.begin_box(crop_volume, tumour.label)
    markups.write_box(box, geometry.ijk_to_world_ras(crop_volume), axis, 5, tumour_box)
    box.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent)  # the click that ends placing
    assert tumour.source == C.SOURCE_USER

    t0 = time.perf_counter()
    request = logic.prepare_run(crop_volume, model="sam2.1_hiera_tiny", device="cpu")
    (prompt,) = request.prompts.classes[0].prompts
    assert prompt.key_slice == 5 and np.allclose(prompt.box, tumour_box, atol=1e-6)
    reports, outcome = run_here(logic, request)
    fractions = [f for _, f in reports if f is not None]
    assert fractions and max(fractions) == 1.0 and all(0 <= f <= 1 for f in fractions)
    seg = logic.finish_run(request, outcome)
    seconds = time.perf_counter() - t0

    result = outcome.result
    assert result.labels.voxels.shape == (10, 64, 64) and result.recomputed == [1]
    assert seg.GetAttribute(C.ATTR_MODEL) == "sam2.1_hiera_tiny"
    assert seg.GetParentTransformNode() is crop_volume.GetParentTransformNode()
    testing.check_segmentation_matches(seg, crop_volume, result.labels.voxels, [1])
    assert "sam2.1_hiera_tiny" in status_text(result, outcome.backbone_name, "cpu")
    assert seconds < 60, f"end-to-end took {seconds:.1f} s"

    # Re-run with nothing changed: the cached session answers without embedding or propagating.
    request2 = logic.prepare_run(crop_volume, model="sam2.1_hiera_tiny", device="cpu", rerun=True)
    assert request2.reuse
    again = run_here(logic, request2)[1].result
    assert again.recomputed == [] and again.embeddings_computed == 0
    assert np.array_equal(again.labels.voxels, result.labels.voxels)


def test_cancel_writes_nothing(scene, crop_volume, tumour_box):
    from sss_lib.errors import Cancelled

    from SSSSegmentLib import geometry, markups, testing
    from SSSSegmentLib.logic import SegmentLogic

    logic = SegmentLogic(backbone_factory=lambda model, device: testing.make_box_backbone())
    nodes = logic.add_class(crop_volume, "tumour")
    volume = geometry.sss_volume_from_node(crop_volume)
    markups.write_box(logic.begin_box(crop_volume, nodes.label), geometry.ijk_to_world_ras(crop_volume),
                      logic.slice_axis(volume), 5, tumour_box)
    before = scene.GetNumberOfNodes()
    request = logic.prepare_run(crop_volume, model="test", device="cpu")
    with pytest.raises(Cancelled):  # the user pressed Cancel before the model finished loading
        run_here(logic, request, should_cancel=lambda: True)
    assert scene.GetNumberOfNodes() == before
    assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()


def test_missing_checkpoint_is_offered_and_downloaded_in_the_run(scene, crop_volume, tumour_box, monkeypatch, tmp_path):
    from sss_lib import weights

    from SSSSegmentLib import geometry, markups, testing
    from SSSSegmentLib.logic import SegmentLogic

    monkeypatch.setenv(weights.SSS_HOME_ENV, str(tmp_path))  # an empty weights cache
    built = []
    logic = SegmentLogic(backbone_factory=lambda model, device: built.append(model) or testing.make_box_backbone())
    name, url, _size = logic.weights_to_download("sam2.1_hiera_tiny")
    assert name == "sam2.1_hiera_tiny" and url.startswith("https://")
    assert logic.weights_to_download("litemedsam") is None and logic.weights_to_download("auto") is None

    fetched = []

    def fake_ensure(model, download=False, *, progress=None, timeout=30.0):
        assert download, "the worker must download only when the user agreed"
        progress(50_000_000, 100_000_000)
        fetched.append(model)
        return tmp_path / "weights" / f"{model}.pt"

    monkeypatch.setattr(weights, "ensure_weights", fake_ensure)
    nodes = logic.add_class(crop_volume, "tumour")
    markups.write_box(logic.begin_box(crop_volume, nodes.label), geometry.ijk_to_world_ras(crop_volume),
                      logic.slice_axis(geometry.sss_volume_from_node(crop_volume)), 5, tumour_box)
    request = logic.prepare_run(crop_volume, model="sam2.1_hiera_tiny", device="cpu")
    request.download_weights = True
    reports, _ = run_here(logic, request)
    assert fetched == ["sam2.1_hiera_tiny"] and built == ["sam2.1_hiera_tiny"]
    assert any(fraction == 0.5 and "50 MB" in text for text, fraction in reports)
