"""Prompt sessions on a real service (LiteMedSAM, CPU): upload (content-keyed reuse), segment,
a one-class re-run that recomputes only that class from cached embeddings and sends a patch,
the NDJSON stream, and cancel (running and queued) leaving the session as it was."""

from __future__ import annotations

import json

import numpy as np

from sss_lib.service import protocol

from server_helpers import assert_error, open_session, prompts_doc, result, run_to_end, two_squares, upload, wait_run


def test_upload_is_content_keyed_and_reused(api):
    arrays = two_squares(seed=11)
    first = upload(api, arrays)
    again = upload(api, {k: v.copy() for k, v in arrays.items()})
    assert first["reused"] is False and again["reused"] is True
    assert again["volume_id"] == first["volume_id"] and first["shape_kji"] == [4, 48, 48]
    moved = dict(arrays, origin=np.array([0.0, 0.0, 1.0]))  # same voxels, other geometry: another volume
    assert upload(api, moved)["volume_id"] != first["volume_id"]


def test_segment_then_rerun_one_class_sends_only_its_patch(api):
    volume = upload(api, two_squares(seed=1))
    sess = open_session(api, volume["volume_id"], backbone="litemedsam")
    assert sess["kind"] == "prompts" and sess["slice_axis"] == "k" and sess["stack_shape"] == [4, 48, 48]
    assert sess["backbone"] == "litemedsam"

    status, (patch, start, meta) = run_to_end(api, sess["session_id"], prompts=prompts_doc())
    stages = {e["stage"] for e in status["events"]}
    assert {"propagate", "done"} <= stages  # LiteMedSAM embeds lazily, while it propagates
    assert start == (0, 0, 0) and patch.shape == (4, 48, 48) and patch.dtype == np.uint8  # first run: the whole map
    assert meta["base_run_id"] is None and meta["recomputed"] == [1, 2] and meta["reused"] == []
    assert meta["embeddings_computed"] == 4 and meta["changed_labels"] == [1, 2]
    first = patch
    for label in (1, 2):
        assert meta["voxel_counts"][str(label)] == int((first == label).sum()) > 20
    assert (first[:, 6:18, 6:18] == 1).mean() > 0.5 and (first[:, 28:42, 26:40] == 2).mean() > 0.5

    # Move class 2's box: only class 2 is recomputed, nothing is embedded again, class 1 is untouched.
    status2, (patch2, start2, meta2) = run_to_end(api, sess["session_id"], prompts=prompts_doc(box2=(27, 28, 40, 41)))
    assert meta2["recomputed"] == [2] and meta2["reused"] == [1] and meta2["embeddings_computed"] == 0
    assert meta2["base_run_id"] == status["run_id"]
    second = protocol.apply_patch(first, start2, patch2)
    full, full_start, full_meta = result(api, status2["run_id"], full=True)
    assert full_start == (0, 0, 0) and full_meta["full"] is True
    np.testing.assert_array_equal(second, full)
    np.testing.assert_array_equal(second == 1, first == 1)  # the other class's voxels are unchanged
    assert set(meta2["changed_labels"]) <= {2}
    if meta2["changed_labels"]:  # the patch covers class 2's change only, not class 1's square
        assert patch2.size < first.size and start2[2] >= 18
    else:
        assert patch2.size == 0

    # The same volume uploaded again, in a new session: every embedding is reused.
    again = upload(api, two_squares(seed=1))
    assert again["reused"] is True and again["volume_id"] == volume["volume_id"]
    other = open_session(api, again["volume_id"], backbone="litemedsam")
    _, (_, _, meta3) = run_to_end(api, other["session_id"], prompts=prompts_doc())
    assert meta3["embeddings_computed"] == 0 and meta3["base_run_id"] is None


def test_stream_gives_ndjson_events_then_the_state(api):
    volume = upload(api, two_squares(n_slices=3, seed=2))
    sess = open_session(api, volume["volume_id"], backbone="litemedsam")
    r = api.post(f"/sessions/{sess['session_id']}/segment", json={"prompts": prompts_doc()})
    assert r.status_code == 202
    run_id = r.json()["run_id"]
    with api.stream("GET", f"/runs/{run_id}/stream") as stream:
        assert stream.headers["content-type"].startswith(protocol.NDJSON_TYPE)
        lines = [json.loads(line) for line in stream.iter_lines() if line.strip()]
    assert lines[-1] == {"state": "done"}
    events = lines[:-1]
    assert events and all(set(e) == {"stage", "done", "total", "message"} for e in events)
    assert events[-1]["stage"] == "done"
    # The stream and the long-poll tell the same story.
    assert wait_run(api, run_id)["events"] == events


def test_cancel_a_running_and_a_queued_run_leaves_the_sessions_unchanged(api):
    n = 8
    volume = upload(api, two_squares(n_slices=n, seed=3))  # new content: every slice must be embedded
    sess = open_session(api, volume["volume_id"], backbone="litemedsam")
    small = upload(api, two_squares(n_slices=2, seed=4))
    queued_sess = open_session(api, small["volume_id"], backbone="litemedsam")

    run_id = api.post(f"/sessions/{sess['session_id']}/segment", json={"prompts": prompts_doc()}).json()["run_id"]
    queued_id = api.post(f"/sessions/{queued_sess['session_id']}/segment",
                         json={"prompts": prompts_doc()}).json()["run_id"]
    # The device runs one inference at a time: the second run waits.
    assert api.get(f"/runs/{queued_id}").json()["state"] == "queued"
    r = api.post(f"/runs/{queued_id}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"

    first = api.get(f"/runs/{run_id}", params={"wait": 30}).json()  # the first slice's event
    assert first["state"] == "running" and first["events"]
    assert api.post(f"/runs/{run_id}/cancel").status_code == 202
    end = wait_run(api, run_id)
    assert end["state"] == "cancelled"
    steps = [e for e in end["events"] if e["stage"] in ("embed", "propagate")]
    assert len(steps) < n and not any(e["stage"] == "done" for e in end["events"])
    assert_error(api.get(f"/runs/{run_id}/result"), 409, "run_not_done")
    assert wait_run(api, queued_id)["events"] == []  # it never started
    assert api.get(f"/sessions/{sess['session_id']}").json()["last_run_id"] is None

    # The sessions are as before: a new run starts from nothing (no base, every class recomputed).
    for session_id in (sess["session_id"], queued_sess["session_id"]):
        _, (_, _, meta) = run_to_end(api, session_id, prompts=prompts_doc())
        assert meta["base_run_id"] is None and meta["recomputed"] == [1, 2]
