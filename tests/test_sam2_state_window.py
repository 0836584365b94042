"""SAM-2's inference state during a span's propagation holds only the slices its memory can still
read, and the results are exactly those of a state that keeps every slice."""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.embedding_cache import EmbeddingStore
from sss_lib.engine import SegmentationSession
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis

pytest.importorskip("torch")

N_SLICES = 12


def test_forgetting_slices_behind_changes_nothing(sam2_to_span_edge, bright_box_volume, monkeypatch):
    model = sam2_to_span_edge.model
    assert model.sss_memory_reach() == 16  # SAM-2.1: 7 memories, 16 object pointers
    # Fewer object pointers (the memory then reaches back 7 slices) so that a short stack runs
    # well past the reach: the pointers read, and the slices forgotten, follow the setting.
    monkeypatch.setattr(model, "max_obj_ptrs_in_encoder", 6)
    reach = model.sss_memory_reach()
    assert reach == 7 and N_SLICES - 2 > reach
    volume = bright_box_volume(N_SLICES, 32, 5)
    prompts = PromptSet(SliceAxis(2), [
        ClassPrompts(1, "one key", [SlicePrompt(1, box=(14, 12, 31, 29))]),  # a run 10 slices up, one down
        ClassPrompts(2, "two keys", [SlicePrompt(0, box=(14, 12, 31, 29)),  # blended runs both ways
                                     SlicePrompt(N_SLICES - 1, box=(10, 10, 30, 30))]),
    ])
    store = EmbeddingStore()  # shared: the slices are embedded once

    held = []
    forget = model._sss_forget_behind

    def counting(outputs, slice_index, reverse):
        forget(outputs, slice_index, reverse)
        held.append(len(outputs))

    monkeypatch.setattr(model, "_sss_forget_behind", counting)
    windowed = SegmentationSession(volume, sam2_to_span_edge, store=store)
    result = windowed.segment(prompts)
    assert result.recomputed_slices == {1: list(range(N_SLICES)), 2: list(range(N_SLICES))}
    assert len(held) > 2 * (N_SLICES - 2) and max(held) == reach + 1

    new_state = model.sss_new_state
    monkeypatch.setattr(model, "sss_new_state", lambda *a, **k: new_state(*a, **{**k, "forget_behind": False}))
    held.clear()
    keep_all = SegmentationSession(volume, sam2_to_span_edge, store=store)
    keep_all.segment(prompts)
    assert held == []
    for label in (1, 2):
        np.testing.assert_array_equal(windowed.class_logits(label), keep_all.class_logits(label))
