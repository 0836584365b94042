"""Auto-segment in Slicer: task model -> coarse head -> PCSW prompts as markups -> segmentation, and
a re-run that keeps the user's edited class while PCSW redoes the others.

The task model is built here from untrained parts (SAM-2.1 tiny at random init, 64 px input) with a
coarse head whose classifier says "class 1 everywhere, class 2 nowhere": PCSW then prompts class 1
with a box over the slice and finds class 2 absent, whatever the image. The volume is the real lung
crop around its tumour, oblique and under a parent transform.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def task_model_file(tmp_path_factory, two_torch_threads):
    import torch

    from sss_lib.backbones.sam2_backbone import build_sam2_backbone
    from sss_lib.coarse_head import build_coarse_head
    from sss_lib.pcsw import PcswConfig
    from sss_lib.task_model import (
        RANDOM_INIT, BackboneRef, TaskClass, TaskModel, TaskPreprocessing, TrainingInfo, save_task_model,
    )
    from sss_lib.trainer.adapters import adapter_for

    backbone = build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, device="cpu")
    adapter = adapter_for(backbone)
    features = adapter.coarse_features(backbone.embed_slice(np.zeros((64, 64), np.float32)))
    head = build_coarse_head(features, num_classes=2, seed=0)
    with torch.no_grad():
        head.classifier.weight.zero_()
        head.classifier.bias.copy_(torch.tensor([0.0, 8.0, -8.0]))  # background, class 1, class 2
    weights = {"coarse_head": {k: v.detach().cpu() for k, v in head.state_dict().items()}, **adapter.state_dicts()}
    model = TaskModel(
        backbone=BackboneRef("sam2.1_hiera_tiny", RANDOM_INIT),
        classes=(TaskClass(1, "tumour", (230, 80, 60)), TaskClass(2, "vessel", (60, 160, 230))),
        preprocessing=TaskPreprocessing(modality="CT", slice_axis="k", image_size=64),
        pcsw=PcswConfig(),
        volume_ranges_mm3={},
        training=TrainingInfo.now("test", n_labeled=0, n_unlabeled=0, iterations=0, seed=0),
        validation=None,
        weights=weights,
    )
    return str(save_task_model(model, tmp_path_factory.mktemp("task") / "toy.ssstask"))


def test_auto_segment_writes_prompts_and_segments_then_keeps_user_edits(scene, crop_volume, task_model_file, tumour_box):
    import slicer

    from SSSSegmentLib import constants as C
    from SSSSegmentLib import geometry, markups, segmentation, testing
    from SSSSegmentLib.logic import SegmentLogic, status_text

    logic = SegmentLogic()
    request = logic.prepare_auto_run(crop_volume, task_model_file, device="cpu")
    outcome = logic.make_auto_work(request)(lambda text, fraction: None, lambda: False)
    seg = logic.finish_auto_run(request, outcome)
    result = outcome.result
    assert result.absent == [2] and [c.label for c in result.prompts.classes] == [1]

    tumour = logic.class_nodes(crop_volume, 1)
    assert tumour.source == C.SOURCE_AUTO and tumour.defined_boxes(), "PCSW's box must appear as an ROI"
    assert markups.find_class(scene, crop_volume, 2) is None, "an absent class gets no markups"
    assert seg.GetAttribute(C.ATTR_MODEL) == "task model toy.ssstask on sam2.1_hiera_tiny"
    assert [seg.GetSegmentation().GetSegment(segmentation.segment_id(l)).GetName() for l in (1, 2)] == ["tumour", "vessel"]
    testing.check_segmentation_matches(seg, crop_volume, result.labels.voxels, [1, 2])
    assert "empty: class 2" in status_text(result, outcome.backbone_name, "cpu")
    assert "coarse head" not in status_text(result, outcome.backbone_name, "cpu")
    import dataclasses

    coarse_text = status_text(dataclasses.replace(result, from_coarse=[1]), outcome.backbone_name, "cpu")
    assert "class 1 from the task model's coarse head" in coarse_text
    # The markups say what PCSW said, in world space on the oblique, transformed volume.
    axis = outcome.session.slice_axis
    (pcsw_prompt,) = result.prompts.classes[0].prompts
    (read,) = logic.prompts_from_markups(crop_volume, axis).classes[0].prompts
    assert read.key_slice == pcsw_prompt.key_slice and np.allclose(read.box, pcsw_prompt.box, atol=1e-4)

    # The user redraws the tumour box on the key slice; a re-run keeps it and recomputes only that class.
    box = tumour.defined_boxes()[0]
    markups.write_box(box, geometry.ijk_to_world_ras(crop_volume), axis, pcsw_prompt.key_slice, tumour_box)
    box.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert tumour.source == C.SOURCE_USER
    seg_again, again = logic.auto_segment(crop_volume, task_model_file, segmentation_node=seg, device="cpu", rerun=True)
    assert seg_again is seg
    assert again.user_classes == [1] and again.recomputed == [1]
    (kept,) = again.prompts.classes[0].prompts
    assert kept.source == "user" and np.allclose(kept.box, tumour_box, atol=1e-4)
    assert np.allclose(kept.positive_points, pcsw_prompt.positive_points, atol=1e-4)
    (still,) = logic.prompts_from_markups(crop_volume, axis).classes[0].prompts
    assert np.allclose(still.box, tumour_box, atol=1e-4), "the re-run moved the user's box"
    testing.check_segmentation_matches(seg, crop_volume, again.labels.voxels, [1, 2])
