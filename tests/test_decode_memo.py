"""The decode memo: a correction does not decode again what the last run already decoded, and the
result is exactly what decoding everything afresh gives."""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.backbones.decode_memo import DecodeMemo, weights_version
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis, Volume

torch = pytest.importorskip("torch")


class _Emb:
    """Stands in for an embedding object (the memo only needs its identity)."""


def test_memo_matches_only_the_same_embedding_object_and_prompt() -> None:
    memo = DecodeMemo("v1", max_entries=2)
    a, b = _Emb(), _Emb()
    memo.put(a, (1.0, 2.0), "out-a")
    assert memo.get(a, (1.0, 2.0)) == "out-a"
    assert memo.get(a, (1.0, 3.0)) is None  # another prompt
    assert memo.get(b, (1.0, 2.0)) is None  # another embedding
    # An embedding that is gone is never matched, even by an object that reuses its id.
    key_id = id(a)
    del a
    c = _Emb()
    if id(c) == key_id:
        assert memo.get(c, (1.0, 2.0)) is None
    # Least recently used dropped first.
    d, e = _Emb(), _Emb()
    memo.put(b, "k", 1)
    memo.put(d, "k", 2)
    memo.put(e, "k", 3)
    assert memo.get(b, "k") is None and memo.get(d, "k") == 2 and memo.get(e, "k") == 3
    assert len(memo) == 2


def test_weights_version_changes_with_in_place_edits_and_loads() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    v0 = weights_version(net)
    assert weights_version(net) == v0
    with torch.no_grad():
        net[0].weight.mul_(1.0)  # same values, but written: the memo must not trust it
    v1 = weights_version(net)
    assert v1 != v0
    net.load_state_dict(net.state_dict())
    assert weights_version(net) != v1
    assert weights_version(torch.nn.Sequential(torch.nn.Linear(3, 2))) != v0  # another module


# ------------------------------------------------------------- real LiteMedSAM through the engine

S = 12


def _disc_volume() -> Volume:
    """A bright disc on slices 2..9 whose radius changes slice to slice, on a noisy background."""
    rng = np.random.default_rng(3)
    vox = (200 + 20 * rng.standard_normal((S, 64, 64))).astype(np.int16)
    yy, xx = np.mgrid[:64, :64]
    for s in range(2, 10):
        r = 12 - abs(s - 5.5) * 1.5
        vox[s][(xx - 30) ** 2 + (yy - 32) ** 2 <= r * r] = 900
    return Volume(vox, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), np.eye(3), "disc")


def _prompts(keys: list[int]) -> PromptSet:
    boxes = {2: (24, 26, 36, 38), 5: (17, 19, 43, 45), 9: (22, 24, 38, 40)}
    return PromptSet(SliceAxis(2), [ClassPrompts(1, "disc", [SlicePrompt(k, box=boxes[k]) for k in keys])])


@pytest.fixture(scope="module")
def litemedsam(two_torch_threads):
    from sss_lib.backbones.litemedsam import build_litemedsam_backbone

    return build_litemedsam_backbone(device="cpu")


def test_a_correction_reuses_the_unchanged_runs_decodes_and_equals_a_fresh_run(litemedsam) -> None:
    from sss_lib.engine import SegmentationSession

    volume = _disc_volume()
    session = SegmentationSession(volume, litemedsam, slice_axis=SliceAxis(2))
    session.segment(_prompts([2, 9]))
    memo = litemedsam.decode_memo()
    hits, misses = memo.hits, memo.misses
    # A key slice between the two: the runs from 2 (up) and 9 (down) into the new, shorter spans
    # start exactly as before, so their first decodes come from the memo.
    corrected = session.segment(_prompts([2, 5, 9]))
    assert memo.hits > hits
    reused, decoded = memo.hits - hits, memo.misses - misses
    assert decoded >= 1  # the new key slice and its own runs were decoded

    # A fresh session has new embedding objects: nothing can come from the memo.
    fresh_session = SegmentationSession(volume, litemedsam, slice_axis=SliceAxis(2))
    hits, misses = memo.hits, memo.misses
    fresh = fresh_session.segment(_prompts([2, 5, 9]))
    assert memo.hits == hits
    fresh_decoded = memo.misses - misses
    np.testing.assert_array_equal(corrected.labels.voxels, fresh.labels.voxels)
    np.testing.assert_array_equal(session.class_logits(1), fresh_session.class_logits(1))
    assert decoded + reused <= fresh_decoded  # the correction looked up no more than a fresh run decodes
    assert decoded < fresh_decoded
