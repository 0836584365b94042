"""warm_up: one small synthetic run through the engine path a user's run takes."""

from __future__ import annotations

import pytest

from sss_lib.backbones.warmup import warm_up


def test_warm_up_embeds_decodes_and_propagates(sam2_to_span_edge, monkeypatch) -> None:
    embedded, decoded, spans = [], [], []
    embed, key, span = sam2_to_span_edge.embed_slice, sam2_to_span_edge.segment_key, sam2_to_span_edge.propagate_span

    def counting_embed(image):
        embedded.append(image.shape)
        return embed(image)

    def counting_key(slices, embedding, label, index, prompts):
        decoded.append(index)
        return key(slices, embedding, label, index, prompts)

    def counting_span(slices, embedding, label, s):
        spans.append((s.lo, s.hi))
        return span(slices, embedding, label, s)

    monkeypatch.setattr(sam2_to_span_edge, "embed_slice", counting_embed)
    monkeypatch.setattr(sam2_to_span_edge, "segment_key", counting_key)
    monkeypatch.setattr(sam2_to_span_edge, "propagate_span", counting_span)
    seconds = warm_up(sam2_to_span_edge)
    assert seconds > 0
    assert embedded == [(64, 64)] * 3  # every slice of the synthetic stack, once
    assert decoded == [1]  # the box's own slice
    assert sorted(spans) == [(0, 0), (2, 2)]  # propagation below and above the key slice


def test_a_broken_backbone_fails_in_the_warm_up(sam2_to_span_edge, monkeypatch) -> None:
    def broken(image):
        raise RuntimeError("encoder weights are damaged")

    monkeypatch.setattr(sam2_to_span_edge, "embed_slice", broken)
    with pytest.raises(RuntimeError, match="damaged"):
        warm_up(sam2_to_span_edge)


def test_warm_up_needs_a_slice(sam2_to_span_edge) -> None:
    with pytest.raises(ValueError, match="at least one slice"):
        warm_up(sam2_to_span_edge, slices=0)
