"""The whole engine path with SAM-2.1 tiny at random initialisation on a synthetic oblique volume:
in-memory adapter, both directions, several classes, the overlap rule, partial re-run, cancel."""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.backbones.base import ABSENT_LOGIT
from sss_lib.engine import SegmentationSession
from sss_lib.errors import Cancelled, PromptError
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis, Volume

torch = pytest.importorskip("torch")  # noqa: F841 - part of the models extra, always installed by scripts/test.sh

N_SLICES, SIZE = 6, 48


@pytest.fixture(scope="module")
def backbone():
    import torch

    from sss_lib.backbones.sam2_backbone import build_sam2_backbone

    torch.set_num_threads(2)
    # stop_after_empty=None: random weights give arbitrary masks, so sweep the whole stack.
    return build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, stop_after_empty=None)


@pytest.fixture(scope="module")
def volume() -> Volume:
    rng = np.random.default_rng(1)
    vox = rng.normal(100, 20, (N_SLICES, SIZE, SIZE)).astype(np.float32)
    vox[:, 10:25, 10:25] += 200  # two bright "organs"
    vox[2:5, 28:40, 26:44] += 300
    c, s = np.cos(0.3), np.sin(0.3)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return Volume(vox, (0.8, 0.8, 4.0), (5.0, -3.0, 12.0), direction, "synthetic")


def prompts(box2=(26, 28, 44, 40)) -> PromptSet:
    return PromptSet(SliceAxis(2), [
        ClassPrompts(1, "a", [SlicePrompt(3, box=(10, 10, 25, 25), positive_points=[(17, 17)])]),
        ClassPrompts(2, "b", [SlicePrompt(4, box=box2, negative_points=[(12, 12)])]),
    ])


@pytest.fixture
def encoder_calls(backbone, monkeypatch):
    calls = []
    original = backbone.model.forward_image

    def counting(image):
        calls.append(1)
        return original(image)

    monkeypatch.setattr(backbone.model, "forward_image", counting)
    return calls


def expected_labels(session: SegmentationSession, labels: list[int]) -> np.ndarray:
    """The overlap rule, computed independently: argmax of the class logits, 0 where all < 0."""
    stack = np.stack([session.class_logits(lbl).astype(np.float32) for lbl in labels])
    best = stack.argmax(axis=0)
    out = np.asarray(labels)[best]
    out[stack.max(axis=0) <= 0] = 0
    return out


def test_full_run_then_partial_rerun(backbone, volume, encoder_calls):
    session = SegmentationSession(volume, backbone)
    first = session.segment(prompts())
    assert len(encoder_calls) == N_SLICES  # every slice embedded exactly once
    assert first.embeddings_computed == N_SLICES
    assert first.recomputed == [1, 2] and first.reused == []

    # Both directions from key slices 3 and 4: every slice got real logits for both classes.
    for lbl in (1, 2):
        logits = session.class_logits(lbl)
        assert not np.any(np.all(logits.reshape(N_SLICES, -1) == ABSENT_LOGIT, axis=1))

    # Output on the input's exact grid; values follow the overlap rule.
    assert first.labels.same_grid(volume, tol=0) and first.labels.voxels.dtype == np.uint8
    np.testing.assert_array_equal(first.labels.voxels, expected_labels(session, [1, 2]))

    kept = session.class_logits(1)
    old2 = session.class_logits(2).copy()
    encoder_calls.clear()
    second = session.segment(prompts(box2=(24, 27, 46, 41)))
    assert encoder_calls == [] and second.embeddings_computed == 0  # embeddings reused
    assert second.recomputed == [2] and second.reused == [1]
    assert session.class_logits(1) is kept  # class 1 untouched
    assert not np.array_equal(session.class_logits(2), old2)
    np.testing.assert_array_equal(second.labels.voxels, expected_labels(session, [1, 2]))

    # An unchanged re-run recomputes nothing; dropping a class removes it from the output.
    assert session.segment(prompts(box2=(24, 27, 46, 41))).recomputed == []
    only1 = PromptSet(SliceAxis(2), [prompts().classes[0]])
    third = session.segment(only1)
    assert third.recomputed == [] and 2 not in np.unique(third.labels.voxels)
    np.testing.assert_array_equal(third.labels.voxels, expected_labels(session, [1]))


def test_cancel_leaves_the_session_unchanged(backbone, volume):
    session = SegmentationSession(volume, backbone)
    done = session.segment(prompts())
    before = {lbl: session.class_logits(lbl).copy() for lbl in (1, 2)}

    events = session.run(prompts(box2=(20, 20, 46, 46)))
    for event in events:
        if event.stage == "propagate":
            break  # the caller stops listening: a cancel
    events.close()
    for lbl in (1, 2):
        np.testing.assert_array_equal(session.class_logits(lbl), before[lbl])

    with pytest.raises(Cancelled):
        session.segment(prompts(box2=(20, 20, 46, 46)), should_cancel=lambda: True)
    for lbl in (1, 2):
        np.testing.assert_array_equal(session.class_logits(lbl), before[lbl])
    # The edit was never committed, so it is still seen as a change.
    assert session.segment(prompts(box2=(20, 20, 46, 46))).recomputed == [2]
    assert done.recomputed == [1, 2]


def test_progress_events_cover_embedding_and_propagation(backbone, volume):
    session = SegmentationSession(volume, backbone)
    events = list(session.run(prompts()))
    stages = [e.stage for e in events]
    assert stages[0] == "embed" and stages[-1] == "done"
    assert [e.done for e in events if e.stage == "embed"] == list(range(1, N_SLICES + 1))
    assert any(e.stage == "propagate" for e in events)
    assert events[-1].result is not None and all(e.result is None for e in events[:-1])


def test_prompts_on_another_axis_or_outside_are_refused(backbone, volume):
    session = SegmentationSession(volume, backbone)
    with pytest.raises(PromptError, match="slice axis"):
        session.segment(PromptSet(SliceAxis(0), prompts().classes))
    bad = PromptSet(SliceAxis(2), [ClassPrompts(1, "a", [SlicePrompt(N_SLICES + 2, box=(1, 1, 5, 5))])])
    with pytest.raises(PromptError, match="outside"):
        session.segment(bad)


def test_sessions_share_a_store_by_content(backbone, volume, encoder_calls):
    from sss_lib.embedding_cache import EmbeddingStore

    store = EmbeddingStore()
    SegmentationSession(volume, backbone, store=store).segment(prompts())
    encoder_calls.clear()
    copy = volume.with_voxels(volume.voxels.copy())
    SegmentationSession(copy, backbone, store=store).segment(prompts())
    assert encoder_calls == []  # same content, same key: no re-embedding
    changed = volume.with_voxels(volume.voxels + 1)
    SegmentationSession(changed, backbone, store=store).segment(prompts())
    assert len(encoder_calls) == N_SLICES
