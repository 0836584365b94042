"""SSS Segment's runs through the SSS service, as the panel does them: the real service
(``python -m sss_lib serve``) started as a subprocess by the shared ServiceLink, the logic stepping a
ServiceRun from this (main) thread, real MRML (slicer-core).

* the oblique lung crop under a rotating, shifting parent transform, segmented with LiteMedSAM
  through the service, gives exactly the labels sss_lib gives in this process for the same volume
  and prompts, written on the volume's exact grid; a Re-run sends no volume and recomputes only the
  class whose prompts changed;
* the service killed mid-run: one clear error, the segmentation node exactly as before, and the
  next run starts a new service by itself;
* a refused connection (a server that is not there): one clear error, nothing written;
* Cancel: the run ends cancelled and nothing is written.
"""

import os
import signal
import sys

import numpy as np
import pytest

from panel_stubs import REPO

pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture
def link(local_service_link):
    return local_service_link


@pytest.fixture
def oblique_lung_volume(scene, data_file):
    """The whole 192 x 192 x 48 lung crop, oblique and under a rotating, shifting parent transform."""
    from SSSSegmentLib import testing

    volume = testing.load_volume_file(scene, str(data_file("lung1_crop_image.nrrd")), "lung1_crop")
    testing.make_oblique_with_transform(scene, volume)
    return volume


def add_tumour_box(logic, volume, box, label_name="tumour", key_slice=5):
    from SSSSegmentLib import geometry, markups

    nodes = logic.add_class(volume, label_name)
    axis = logic.slice_axis(geometry.sss_volume_from_node(volume), "auto")
    markups.write_box(logic.begin_box(volume, nodes.label), geometry.ijk_to_world_ras(volume), axis, key_slice, box)
    return nodes


def texts(messages):
    return [m.text for m in messages]


def test_service_run_matches_sss_lib_in_process_on_an_oblique_transformed_volume(scene, crop_volume, tumour_box, link):
    from SSSSegmentLib import service_run, testing
    from SSSSegmentLib.logic import SegmentLogic, status_text

    logic = SegmentLogic()
    add_tumour_box(logic, crop_volume, tumour_box)
    request = logic.prepare_run(crop_volume, model="litemedsam", device="cpu")
    run = logic.service_run(link, request)
    messages = run.run_to_end(timeout=300)
    assert messages[-1].kind == service_run.DONE, texts(messages)
    assert "Volume uploaded." in texts(messages)
    fractions = [m.fraction for m in messages if m.fraction is not None]
    assert all(0 <= f <= 1 for f in fractions)
    outcome = messages[-1].value
    seg = logic.finish_run(request, outcome)

    # The same volume and prompts in this process, with sss_lib's own LiteMedSAM.
    reference = SegmentLogic()
    _, expected = reference.segment(crop_volume, model="litemedsam", device="cpu")
    assert outcome.labels.shape == (10, 64, 64) and outcome.backbone_name == "litemedsam"
    assert int((expected.labels.voxels == 1).sum()) > 50, "LiteMedSAM found no tumour: the comparison would be empty"
    assert np.array_equal(outcome.labels, expected.labels.voxels), (
        f"{int((outcome.labels != expected.labels.voxels).sum())} voxels differ from the in-process result")
    testing.check_segmentation_matches(seg, crop_volume, outcome.labels, [1])
    assert seg.GetParentTransformNode() is crop_volume.GetParentTransformNode()
    assert "litemedsam on cpu" in status_text(outcome.result, outcome.backbone_name, outcome.device)
    # Slicer's local service preloads the default backbone (litemedsam here: no SAM-2 weights cached).
    assert [(p["name"], p["state"]) for p in link.wait().info()["preload"]] == [("auto", "ready")]

    # A second class, then Re-run: no upload, only the new class is propagated, class 1 untouched.
    add_tumour_box(logic, crop_volume, (5.0, 5.0, 15.0, 15.0), "corner", key_slice=3)
    seg_again, again = logic.segment_through(link, crop_volume, segmentation_node=seg, model="litemedsam",
                                             device="cpu", rerun=True)
    assert seg_again is seg
    assert again.result.recomputed == [2] and again.result.reused == [1]
    embedded = outcome.result.embeddings_computed + again.result.embeddings_computed
    assert embedded <= 10, f"{embedded} slice embeddings for 10 slices: the re-run did not reuse the service's"
    testing.check_segmentation_matches(seg, crop_volume, outcome.labels, [1])  # not rewritten
    testing.check_segmentation_matches(seg, crop_volume, again.labels, [2])
    assert int((again.labels == 2).sum()) > 0


def test_rerun_uploads_nothing(scene, crop_volume, tumour_box, link):
    from SSSSegmentLib import service_run
    from SSSSegmentLib.logic import SegmentLogic

    logic = SegmentLogic()
    add_tumour_box(logic, crop_volume, tumour_box)
    first = logic.service_run(link, logic.prepare_run(crop_volume, model="litemedsam", device="cpu"))
    assert first.run_to_end(300)[-1].kind == service_run.DONE
    second = logic.service_run(link, logic.prepare_run(crop_volume, model="litemedsam", device="cpu", rerun=True), rerun=True)
    messages = second.run_to_end(300)
    assert messages[-1].kind == service_run.DONE
    assert "The volume is on the service already." in texts(messages) and "Volume uploaded." not in texts(messages)
    assert "Re-using the previous run's session." in texts(messages)
    assert messages[-1].value.result.recomputed == [] and messages[-1].value.result.embeddings_computed == 0


def test_service_killed_mid_run_leaves_the_scene_as_it_was_and_restarts(scene, oblique_lung_volume, link):
    """The service dies while it propagates: one error that says so, the segmentation node exactly as
    before (voxels, segments, node count), and the next click starts a fresh service."""
    from SSSSegmentLib import segmentation, service_run
    from SSSSegmentLib.logic import SegmentLogic

    logic = SegmentLogic()
    add_tumour_box(logic, oblique_lung_volume, (70.0, 60.0, 120.0, 110.0), key_slice=24)
    seg, _ = logic.segment_through(link, oblique_lung_volume, model="litemedsam", device="cpu")
    labels_before = segmentation.read_labels(scene, seg, oblique_lung_volume)
    segments_before = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    nodes_before = scene.GetNumberOfNodes()
    starts_before = link.starts

    # Move the box: a fresh Segment (new session) embeds all 48 slices again on the service's side.
    from SSSSegmentLib import geometry, markups

    nodes = logic.class_nodes(oblique_lung_volume, 1)
    axis = logic.slice_axis(geometry.sss_volume_from_node(oblique_lung_volume), "auto")
    markups.write_box(nodes.defined_boxes()[0], geometry.ijk_to_world_ras(oblique_lung_volume), axis, 30,
                      (40.0, 40.0, 150.0, 150.0))
    request = logic.prepare_run(oblique_lung_volume, model="litemedsam", device="cpu")
    run = logic.service_run(link, request)
    messages = []
    while run.handle is None and not run.finished:
        messages += run.step()
    assert run.handle is not None, texts(messages)
    os.kill(link.local_pid, signal.SIGKILL)  # the service crashes while the run goes on
    messages += run.run_to_end(60)
    failures = [m for m in messages if m.kind == service_run.FAILED]
    assert len(failures) == 1 and messages[-1] is failures[0], texts(messages)
    assert "stopped" in failures[0].text and "Nothing was changed" in failures[0].text
    # Nothing was written: the logic never saw a result.
    assert scene.GetNumberOfNodes() == nodes_before
    assert [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())] == segments_before
    assert np.array_equal(segmentation.read_labels(scene, seg, oblique_lung_volume), labels_before)

    # The next click: a new service starts by itself and the run succeeds.
    seg_again, outcome = logic.segment_through(link, oblique_lung_volume, segmentation_node=seg, model="litemedsam",
                                               device="cpu")
    assert link.starts == starts_before + 1 and seg_again is seg
    assert outcome.result.recomputed == [1]


def test_refused_connection_is_one_clear_error(scene, crop_volume, tumour_box):
    import socket

    from SSSSegmentLib import service_link, service_run
    from SSSSegmentLib.logic import SegmentLogic

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = service_link.ServiceLink(sys.executable, str(REPO))
    remote.configure(service_link.ComputeSettings(service_link.SERVER, f"http://127.0.0.1:{port}", "x" * 32))
    logic = SegmentLogic()
    add_tumour_box(logic, crop_volume, tumour_box)
    nodes_before = scene.GetNumberOfNodes()
    messages = logic.service_run(remote, logic.prepare_run(crop_volume, model="litemedsam")).run_to_end(30)
    assert [m.kind for m in messages] == [service_run.FAILED]
    assert f"http://127.0.0.1:{port}" in messages[0].text and "Nothing was changed" in messages[0].text
    assert scene.GetNumberOfNodes() == nodes_before


def test_cancel_writes_nothing(scene, oblique_lung_volume, link):
    from SSSSegmentLib import service_run
    from SSSSegmentLib.logic import SegmentLogic

    logic = SegmentLogic()
    add_tumour_box(logic, oblique_lung_volume, (30.0, 30.0, 160.0, 160.0), key_slice=24)
    nodes_before = scene.GetNumberOfNodes()
    run = logic.service_run(link, logic.prepare_run(oblique_lung_volume, model="litemedsam", device="cpu"))
    messages = []
    while run.handle is None and not run.finished:
        messages += run.step()
    run.cancel()
    messages += run.run_to_end(120)
    # 48 slices to embed on two CPU threads: the cancel arrives long before the end.
    assert messages[-1].kind == service_run.CANCELLED, texts(messages)
    assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
    assert scene.GetNumberOfNodes() == nodes_before


def test_the_local_service_is_shared_and_stops_when_slicer_quits():
    """Both panels get one link (one service); the function registered for aboutToQuit stops it."""
    from SSSSegmentLib import service_link

    saved = service_link._SHARED.pop("link", None)  # the session's link stays untouched
    registered = []
    try:
        first = service_link.shared_link(sys.executable, str(REPO), dict(os.environ, OMP_NUM_THREADS="1"),
                                         about_to_quit=registered.append)
        second = service_link.shared_link("another python", None, None, about_to_quit=registered.append)
        assert second is first and registered == [first.stop], "one link, its stop registered once"
        first.configure(service_link.ComputeSettings(), device="cpu")
        client = first.wait(timeout=300)
        assert client.info()["device"] == "cpu"
        pid = first.local_pid
        os.kill(pid, 0)  # running
        registered[0]()  # Slicer quits
        with pytest.raises(ProcessLookupError):  # stop() waited for the process to end
            os.kill(pid, 0)
        assert first.local_pid is None
    finally:
        service_link._SHARED.pop("link", None)
        if saved is not None:
            service_link._SHARED["link"] = saved


from test_slicer_auto_segment import task_model_file  # noqa: E402,F401 - the toy task model (a fixture)


def test_auto_segment_through_the_service_matches_in_process_and_keeps_user_edits(scene, crop_volume, task_model_file,
                                                                                  tumour_box, link):
    """Auto-segment as the panel runs it: the task model uploaded once, PCSW's prompts written back as
    markups, labels equal to sss_lib's in this process; a user-edited class survives the Re-run."""
    import slicer

    from SSSSegmentLib import constants as C
    from SSSSegmentLib import geometry, markups, testing
    from SSSSegmentLib.logic import SegmentLogic

    logic = SegmentLogic()
    seg, outcome = logic.auto_segment_through(link, crop_volume, task_model_file)
    result = outcome.result
    assert result.absent == [2] and [c.label for c in outcome.prompts.classes] == [1]
    assert seg.GetAttribute(C.ATTR_MODEL) == "task model toy.ssstask on sam2.1_hiera_tiny"
    tumour = logic.class_nodes(crop_volume, 1)
    assert tumour.source == C.SOURCE_AUTO and tumour.defined_boxes(), "PCSW's box must appear as an ROI"
    assert markups.find_class(scene, crop_volume, 2) is None
    testing.check_segmentation_matches(seg, crop_volume, outcome.labels, [1, 2])

    reference = SegmentLogic()
    request = reference.prepare_auto_run(crop_volume, task_model_file, device="cpu")
    in_process = reference.make_auto_work(request)(lambda text, fraction: None, lambda: False)
    assert np.array_equal(outcome.labels, in_process.labels), "the service's labels differ from sss_lib's in process"

    # The user redraws the box; Re-run keeps it, recomputes only that class, uploads nothing.
    axis = logic.slice_axis(geometry.sss_volume_from_node(crop_volume), "k")
    (auto_prompt,) = outcome.prompts.classes[0].prompts
    box = tumour.defined_boxes()[0]
    markups.write_box(box, geometry.ijk_to_world_ras(crop_volume), axis, auto_prompt.key_slice, tumour_box)
    box.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert tumour.source == C.SOURCE_USER
    request = logic.prepare_auto_run(crop_volume, task_model_file, rerun=True)
    run = logic.service_auto_run(link, request)
    messages = run.run_to_end(300)
    assert "The volume is on the service already." in texts(messages) and "Uploading the task model..." not in texts(messages)
    again = logic.finish_auto_run(request, messages[-1].value, seg)
    assert again is seg
    rerun = messages[-1].value.result
    assert rerun.user_classes == [1] and rerun.recomputed == [1]
    (still,) = logic.prompts_from_markups(crop_volume, axis).classes[0].prompts
    assert np.allclose(still.box, tumour_box, atol=1e-4), "the re-run moved the user's box"
    testing.check_segmentation_matches(seg, crop_volume, messages[-1].value.labels, [1, 2])
