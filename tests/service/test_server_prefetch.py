"""Embeddings ahead of need: after a run, the session's slices the run did not embed are embedded
in the background (nearest the prompts first), so a prompt placed on one of them next runs
without embedding anything."""

from __future__ import annotations

import time

import numpy as np

from server_helpers import open_session, run_to_end, upload


def test_slices_the_run_skipped_are_embedded_before_the_next_run(api):
    from sss_lib.service.prefetch import slice_order

    assert slice_order(7, (2, 3)) == [2, 3, 1, 4, 0, 5, 6] and slice_order(5, None) == [2, 1, 3, 0, 4]
    n = 10
    rng = np.random.default_rng(60)
    vox = rng.normal(100, 10, (n, 48, 48)).astype(np.float32)
    vox[1:3, 8:20, 8:20] += 400  # a small structure on two slices: propagation stops near them
    volume = upload(api, {"voxels": vox, "spacing": np.array([1.0, 1.0, 3.0]), "origin": np.zeros(3),
                          "direction": np.eye(3)})
    sid = open_session(api, volume["volume_id"], backbone="litemedsam")["session_id"]
    doc = {"format": "sss-prompts", "version": 1, "slice_axis": "k",
           "classes": [{"label": 1, "name": "a", "prompts": [{"key_slice": 1, "box": [8, 8, 19, 19]}]}]}
    _, (_, _, meta) = run_to_end(api, sid, prompts=doc)
    assert meta["embeddings_computed"] < n, "the run embedded every slice: nothing left to embed ahead"

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        session = api.get(f"/sessions/{sid}").json()
        if session["embedded_slices"] == n:
            break
        time.sleep(0.5)
    assert session["embedded_slices"] == n and session["prefetched"] == n - meta["embeddings_computed"]

    doc["classes"].append({"label": 2, "name": "far", "prompts": [{"key_slice": n - 1, "box": [30, 30, 40, 40]}]})
    _, (_, _, meta2) = run_to_end(api, sid, prompts=doc)
    assert meta2["recomputed"] == [2] and meta2["embeddings_computed"] == 0
