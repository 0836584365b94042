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


def test_where_cuda_graphs_replay_the_warm_up_meets_every_memory_shape_of_a_run(sam2_to_span_edge, monkeypatch) -> None:
    import types

    from sss_lib.backbones import sam2_graphs
    from sss_lib.backbones.sam2_graphs import StepGraphs
    from sss_lib.backbones.warmup import warm_up_slices

    model = sam2_to_span_edge.model
    assert warm_up_slices(sam2_to_span_edge) == 3  # no graphs on the CPU
    monkeypatch.setattr(model, "sss_step_graphs", types.SimpleNamespace(capture=True))
    slices = warm_up_slices(sam2_to_span_edge)
    assert slices == model.sss_memory_reach() + 2 == 18

    # The same run through the graph path (eager here): the memory shapes it meets are those a
    # GPU captures, from one object pointer and one memory up to the steady 16 and 7.
    seen = set()
    core = sam2_graphs.track_core

    def spying(model_, sizes, n_ptr, multimask, *tensors):
        seen.add((n_ptr, tensors[-2].shape[0]))
        return core(model_, sizes, n_ptr, multimask, *tensors)

    monkeypatch.setattr("sss_lib.backbones.sam2_predictor.track_core", spying)
    monkeypatch.setattr(model, "sss_step_graphs", StepGraphs(capture=False))
    warm_up(sam2_to_span_edge, slices=slices)
    tokens_per_memory = (64 // 16) ** 2  # a 64 px model's memory is 4 x 4
    pointer_tokens = sorted(n for n, _ in seen)
    assert pointer_tokens[0] == 4 and pointer_tokens[-1] == 16 * 4
    memories = sorted((m - n) // tokens_per_memory for n, m in seen)
    assert memories[0] == 1 and memories[-1] == 7
