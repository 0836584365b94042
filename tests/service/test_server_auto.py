"""Task-model sessions on a real service: a ``.ssstask`` uploaded (content-keyed) or named from
``--models``, auto-segment, and an edited class re-run that recomputes only that class from the
cached embeddings. The task model is trained here for a few seconds on tiny phantoms (SAM-2.1 tiny
at random init, 64 px: tests/conftest.py), as tests/test_auto_segment.py does."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from sss_lib.service import protocol

from server_helpers import assert_error, open_session, run_to_end, upload

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def case(heart_phantoms) -> dict[str, np.ndarray]:
    from sss_lib.volume_io import read_volume

    v = read_volume(heart_phantoms / "imagesTr" / "case_000_0000.nii.gz")
    return {"voxels": v.voxels, "spacing": v.spacing, "origin": v.origin, "direction": v.direction}


def test_models_are_uploaded_by_content_and_offered_by_name(api, heart_task_model, models_dir):
    data = heart_task_model.read_bytes()
    r = api.post("/models", content=data, headers={"Content-Type": protocol.OCTET_TYPE})
    assert r.status_code == 200, r.text
    model = r.json()
    assert model["model_id"] == hashlib.sha256(data).hexdigest() and model["backbone"] == "sam2.1_hiera_tiny"
    assert [c["label"] for c in model["classes"]] == [1, 2, 3]
    assert api.post("/models", content=data).json()["model_id"] == model["model_id"]

    shutil.copy(heart_task_model, models_dir / "heart.ssstask")
    listed = {m["name"]: m for m in api.get("/info").json()["models"]}
    assert listed["heart"]["model_id"] == model["model_id"] and len(listed["heart"]["classes"]) == 3


def test_auto_segment_then_an_edited_class_recomputes_alone(api, heart_task_model, models_dir, case):
    shutil.copy(heart_task_model, models_dir / "heart.ssstask")
    volume = upload(api, case)
    sess = open_session(api, volume["volume_id"], task_model="heart")
    assert sess["kind"] == "task" and sess["backbone"] == "sam2.1_hiera_tiny"
    assert sess["model_id"] == hashlib.sha256(heart_task_model.read_bytes()).hexdigest()
    assert_error(api.post(f"/sessions/{sess['session_id']}/segment", json={"prompts": {}}), 409, "wrong_session_kind")

    status, (patch, start, meta) = run_to_end(api, sess["session_id"], "auto-segment")
    assert start == (0, 0, 0) and patch.shape == case["voxels"].shape and meta["base_run_id"] is None
    auto = {c["label"]: c for c in meta["prompts"]["classes"]}
    assert len(auto) >= 2, meta["pcsw"]
    assert sorted(meta["recomputed"]) == sorted(auto) and meta["user_classes"] == [] and meta["reused"] == []
    assert set(meta["pcsw"]) <= {"1", "2", "3"} and all(p["status"] in ("ok", "fallback", "absent")
                                                      for p in meta["pcsw"].values())
    assert meta["embeddings_computed"] == case["voxels"].shape[0]
    assert sorted(int(k) for k in meta["voxel_counts"]) == sorted(int(v) for v in np.unique(patch) if v)

    # Move one class's box by a pixel: it becomes the user's and is the only class recomputed.
    edited = meta["prompts"]
    label = sorted(auto)[0]
    target = next(c for c in edited["classes"] if c["label"] == label)
    x0, y0, x1, y1 = target["prompts"][0]["box"]
    target["prompts"][0]["box"] = [x0 + 1, y0, x1 + 1, y1]
    status2, (patch2, start2, meta2) = run_to_end(api, sess["session_id"], "auto-segment", prompts=edited)
    assert meta2["recomputed"] == [label] and meta2["user_classes"] == [label]
    assert sorted(meta2["reused"]) == sorted(set(auto) - {label})
    assert meta2["embeddings_computed"] == 0 and meta2["base_run_id"] == status["run_id"]
    assert set(meta2["changed_labels"]) <= set(auto)
    labels2 = protocol.apply_patch(patch, start2, patch2)
    full, _, _ = protocol.decode_result(api.get(f"/runs/{status2['run_id']}/result", params={"full": 1}).content)
    np.testing.assert_array_equal(labels2, full)


def test_a_coarse_class_is_reported_until_the_user_edits_it(api, heart_task_model, models_dir, case):
    import dataclasses

    from sss_lib.task_model import load_task_model, save_task_model

    model = load_task_model(heart_task_model)
    save_task_model(dataclasses.replace(model, coarse_classes=(3,)), models_dir / "heart_coarse.ssstask")
    sess = open_session(api, upload(api, case)["volume_id"], task_model="heart_coarse")
    _, (patch, _, meta) = run_to_end(api, sess["session_id"], "auto-segment")
    auto = {c["label"]: c for c in meta["prompts"]["classes"]}
    assert 3 in auto, meta["pcsw"]
    assert meta["from_coarse"] == [3]
    edited = meta["prompts"]
    target = next(c for c in edited["classes"] if c["label"] == 3)
    x0, y0, x1, y1 = target["prompts"][0]["box"]
    target["prompts"][0]["box"] = [x0 + 1, y0, x1 + 1, y1]
    _, (_, _, meta2) = run_to_end(api, sess["session_id"], "auto-segment", prompts=edited)
    assert meta2["user_classes"] == [3] and "from_coarse" not in meta2
