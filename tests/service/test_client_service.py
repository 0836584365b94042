"""The client against a real service (``python -m sss_lib serve`` on uvicorn, started by LocalService):
upload, segment, one-class re-runs as patches, a wrong base answered with the full map, cancel,
errors, auto-segment, the CLI's ``--server`` path writing the local path's files, and the service
killed mid-run.

Input: the bundled lung CT cropped to 6 slices around the tumour (LiteMedSAM, real weights). The
in-process reference runs the same engine in this process. The last test kills the service.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from sss_lib.cli import main
from sss_lib.demo import box_prompt_from_label
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.service.client import (
    AuthError,
    RunCancelled,
    ServiceClient,
    ServiceError,
    ServiceUnavailable,
    VersionMismatch,
)
from sss_lib.service.local import LocalService
from sss_lib.service.protocol import VERSION_HEADER
from sss_lib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("service") / "service.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the machine's cores are shared
    svc = LocalService(["--device", "cpu", "--memory-budget", "1"], log_path=str(log_path), env=env).start()
    try:
        svc.wait_ready(timeout=300)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(service) -> ServiceClient:
    return service.client(timeout=120)


@pytest.fixture(scope="module")
def lung(data_file, tmp_path_factory):
    """(image, label, image path): the lung sample's slices 30-35 (the tumour's), written as NRRD."""
    from sss_lib.volume_io import read_label, read_volume, write_volume

    image = read_volume(data_file("lung1_crop_image.nrrd"))
    label = read_label(data_file("lung1_crop_label.nrrd"), reference=image)
    k0, k1 = 30, 36
    origin = image.voxel_to_physical(np.array([0.0, 0.0, k0]))
    crop = Volume(image.voxels[k0:k1].copy(), image.spacing, origin, image.direction)
    crop_label = crop.with_voxels(label.voxels[k0:k1].copy())
    path = write_volume(crop, tmp_path_factory.mktemp("lung") / "lung10.nrrd")
    return read_volume(path), crop_label, path


@pytest.fixture(scope="module")
def prompts(lung) -> PromptSet:
    """Class 1: the tumour's box; class 2: a box on the other side of the same slice."""
    tumour = box_prompt_from_label(lung[1])
    key = tumour.classes[0].prompts[0].key_slice
    other = ClassPrompts(2, "other", [SlicePrompt(key, (120, 60, 160, 100))], (0, 200, 0))
    return PromptSet(tumour.slice_axis, tumour.classes + [other])


@pytest.fixture(scope="module")
def reference(lung, prompts):
    """The engine in this process, on the same volume (prompts -> label map)."""
    from sss_lib.backbones.registry import build_backbone
    from sss_lib.engine import SegmentationSession

    session = SegmentationSession(lung[0], build_backbone("litemedsam", device="cpu"), slice_axis=prompts.slice_axis)
    return lambda p: session.segment(p).labels.voxels


def moved(prompts: PromptSet, label: int, dx: float) -> PromptSet:
    classes = []
    for c in prompts.classes:
        if c.label == label:
            c = ClassPrompts(c.label, c.name, [dataclasses.replace(p, box=(p.box[0] + dx, p.box[1], p.box[2] + dx,
                                                                           p.box[3])) for p in c.prompts], c.color)
        classes.append(c)
    return PromptSet(prompts.slice_axis, classes)


def bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0) + 1


# -- tests ---------------------------------------------------------------------------------------
def test_info_upload_and_bad_requests(service, client, lung):
    info = client.info()
    assert info["api_version"] == 1 and "litemedsam" in info["backbones"]
    first = client.upload_volume(lung[0])
    again = client.upload_volume(lung[0])
    assert first.volume_id == again.volume_id == lung[0].content_hash()
    assert first.shape_kji == lung[0].voxels.shape and again.reused

    with pytest.raises(AuthError) as e:
        ServiceClient(service.url, "wrong-token-0123456789")
    assert e.value.status == 403
    with pytest.raises(VersionMismatch, match="install the same SSS version on both"):
        client._request("GET", "/v1/info", headers={VERSION_HEADER: "2"})
    with pytest.raises(ServiceError) as e:
        client._request("POST", "/v1/sessions/no-such-session/segment", json={"prompts": {"classes": []}})
    assert e.value.status == 404 and e.value.code == "unknown_session"
    session = client.open_session(first.volume_id, backbone="litemedsam")
    bad = {"slice_axis": "k", "classes": [{"label": 1, "prompts": [{"key_slice": 500, "box": [1, 1, 4, 4]}]}]}
    with pytest.raises(ServiceError) as e:
        session.segment(bad)
    assert 400 <= e.value.status < 500 and "outside the volume" in e.value.message
    assert client.info()["api_version"] == 1  # still serving
    session.close()


def test_segment_then_a_one_class_rerun_moves_only_that_class(client, lung, prompts, reference):
    session = client.open_session(client.upload_volume(lung[0]).volume_id, backbone="litemedsam")
    run = session.segment(prompts)
    events = list(run.events())
    assert events and {e.stage for e in events} <= {"embed", "propagate", "done"} and run.state == "done"
    first = run.result()
    assert first.base_run_id is None and first.patch_shape == lung[0].voxels.shape
    np.testing.assert_array_equal(first.labels, reference(prompts))
    assert sorted(first.recomputed) == [1, 2] and first.labels.dtype == np.uint8
    assert first.voxel_counts[1] == int((first.labels == 1).sum()) > 0

    edited = moved(prompts, 2, 3.0)
    second = session.segment(edited).result()
    expected = reference(edited)
    np.testing.assert_array_equal(second.labels, expected)
    assert second.base_run_id == run.run_id and second.recomputed == [2] and second.reused == [1]
    assert not second.full_fetch and 2 in second.changed_labels
    # The patch is the box of what changed: inside class 2's old and new voxels, far from the whole map.
    lo, hi = bbox((first.labels == 2) | (expected == 2))
    start = np.array(second.patch_start_kji)
    assert np.all(start >= lo) and np.all(start + np.array(second.patch_shape) <= hi)
    assert np.prod(second.patch_shape) < first.labels.size / 4
    session.close()


def test_a_patch_on_another_base_is_refused_and_the_full_map_fetched(client, lung, prompts, reference):
    session = client.open_session(client.upload_volume(lung[0]).volume_id, backbone="litemedsam")
    held = session.segment(prompts).result()
    skipped = session.segment(moved(prompts, 2, 2.0))
    skipped.wait()  # done on the server, never fetched here
    latest_prompts = moved(prompts, 2, -2.0)
    latest = session.segment(latest_prompts).result()
    assert latest.base_run_id == skipped.run_id != held.run_id
    assert latest.full_fetch and latest.patch_shape == lung[0].voxels.shape
    np.testing.assert_array_equal(latest.labels, reference(latest_prompts))
    assert session.labels_run_id == latest.run_id
    session.close()


def test_cancel_leaves_the_session_as_before(client, lung, prompts, reference):
    volume = lung[0].with_voxels(lung[0].voxels + 1)  # new content: every slice must be embedded
    session = client.open_session(client.upload_volume(volume).volume_id, backbone="litemedsam")
    run = session.segment(prompts)
    run.cancel()
    with pytest.raises(RunCancelled):
        run.result()
    assert run.state == "cancelled" and session.labels is None
    after = session.segment(moved(prompts, 1, 1.0)).result()
    assert after.base_run_id is None and sorted(after.recomputed) == [1, 2]  # nothing was kept from the cancelled run
    session.close()


def test_cli_server_writes_the_local_file(service, lung, prompts, tmp_path, capsys):
    from sss_lib.volume_io import read_label

    prompts.save(tmp_path / "p.json", lung[0], coordinates="physical")
    common = ["segment", str(lung[2]), "--prompts", str(tmp_path / "p.json"), "--backbone", "litemedsam"]
    assert main([*common, "-o", str(tmp_path / "local.nrrd"), "--device", "cpu"]) == 0
    local_out = capsys.readouterr().out
    assert main([*common, "-o", str(tmp_path / "remote.nrrd"), "--server", service.url,
                 "--token-file", service.token_file]) == 0
    remote_out = capsys.readouterr().out
    local, remote = read_label(tmp_path / "local.nrrd"), read_label(tmp_path / "remote.nrrd", reference=lung[0])
    np.testing.assert_array_equal(remote.voxels, local.voxels)
    assert remote.voxels.dtype == local.voxels.dtype and remote.same_grid(local, tol=0)
    assert (tmp_path / "remote.nrrd").read_bytes() == (tmp_path / "local.nrrd").read_bytes()
    assert remote_out.splitlines()[:2] == local_out.splitlines()[:2]  # "class N: slices a-b" lines


# -- auto-segment ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task(backbone, tmp_path_factory):
    """(model path, image path): a coarse head trained briefly on two tiny phantoms (SAM-2.1 tiny at
    random init, rebuilt from its seed by the service), as tests/test_auto_segment.py makes one."""
    from sss_lib.phantoms import make_phantom_dataset
    from sss_lib.trainer import TrainConfig, train_task_model

    dataset = make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 2, seed=8, n_slices=5, size=(48, 48),
                                   spacing=(3.0, 3.0, 8.0))
    config = TrainConfig(dataset, tmp_path_factory.mktemp("model") / "heart.ssstask", iterations=100, seed=0,
                         head_batch=5, head_width=16, lr_head=1e-2, train_decoder=False, val_cases=())
    return train_task_model(config, backbone=backbone).model_path, dataset / "imagesTr" / "case_000_0000.nii.gz"


def test_auto_segment_on_the_service_equals_local(service, task, tmp_path, capsys):
    from sss_lib.volume_io import read_label

    model, image = task
    server = ["--server", service.url, "--token-file", service.token_file]

    def run(name: str, *extra: str) -> tuple[np.ndarray, bytes, str]:
        seg, prompts_out = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.json"
        assert main(["auto-segment", str(image), "--model", str(model), "-o", str(seg), "--prompts-out",
                     str(prompts_out), *extra]) == 0
        return read_label(seg).voxels, prompts_out.read_bytes(), capsys.readouterr().out

    local = run("local", "--device", "cpu")
    remote = run("remote", *server)
    np.testing.assert_array_equal(remote[0], local[0])
    assert remote[1] == local[1]  # the same prompts file, byte for byte
    assert len(json.loads(local[1])["classes"]) >= 2, "the coarse head found too few classes"
    assert remote[2].splitlines()[:-1] == local[2].splitlines()[:-1]  # per-class lines

    edited = json.loads(local[1])
    box = edited["classes"][0]["prompts"][0]["box"]
    edited["classes"][0]["prompts"][0]["box"] = [box[0] + 1, box[1], box[2] + 1, box[3]]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    local2 = run("local2", "--device", "cpu", "--prompts", str(tmp_path / "edited.json"))
    remote2 = run("remote2", *server, "--prompts", str(tmp_path / "edited.json"))
    np.testing.assert_array_equal(remote2[0], local2[0])
    assert remote2[1] == local2[1] and json.loads(remote2[1])["classes"][0]["prompts"][0]["source"] == "user"


# -- the service goes away (keep last: it kills the module's service) -----------------------------
def test_service_killed_mid_run_writes_nothing(service, client, lung, prompts, tmp_path, capsys):
    from sss_lib.remote_run import segment_remote

    prompts.save(tmp_path / "p.json")
    volume_path = lung[2]
    out = tmp_path / "seg.nrrd"

    def kill_on_first_event(event) -> None:
        if service.alive():
            os.kill(service.pid, signal.SIGKILL)
            service._proc.wait()

    with pytest.raises(ServiceUnavailable, match=f"the SSS service at {service.url} went away"):
        segment_remote(client, volume_path, tmp_path / "p.json", out, backbone="litemedsam",
                       progress=kill_on_first_event)
    assert not service.alive() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".seg")]  # no temp file left

    code = main(["segment", str(volume_path), "--prompts", str(tmp_path / "p.json"), "-o", str(out),
                 "--server", service.url, "--token-file", service.token_file])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: the SSS service at {service.url} went away") and not out.exists()
