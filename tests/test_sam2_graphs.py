"""The tracking step through :mod:`sss_lib.backbones.sam2_graphs` (SAM-2's memory gathered by a tap,
then the shape-stable core that a GPU replays from CUDA graphs) gives SAM-2's own results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sss_lib.backbones import sam2_graphs
from sss_lib.backbones.sam2_backbone import build_sam2_backbone
from sss_lib.backbones.sam2_graphs import StepGraphs
from sss_lib.embedding_cache import EmbeddingStore
from sss_lib.engine import SegmentationSession
from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
from sss_lib.volume import SliceAxis

N_SLICES = 22  # past SAM-2.1's 16 object pointers and 7 memories: the step reaches its steady shape


def test_the_graph_path_gives_sam2s_own_results_on_every_slice(sam2_to_span_edge, bright_box_volume, monkeypatch):
    model = sam2_to_span_edge.model
    volume = bright_box_volume(N_SLICES, 32, 11)
    prompts = PromptSet(SliceAxis(2), [
        ClassPrompts(1, "one key", [SlicePrompt(4, box=(14, 12, 31, 29))]),  # runs both ways from one key
        ClassPrompts(2, "two keys", [SlicePrompt(0, box=(14, 12, 31, 29)),  # a span between two keys
                                     SlicePrompt(N_SLICES - 1, box=(10, 10, 30, 30))]),
    ])
    store = EmbeddingStore()
    assert model.sss_step_graphs is None  # on the CPU SAM-2's own track_step runs
    stock = SegmentationSession(volume, sam2_to_span_edge, store=store)
    stock.segment(prompts)

    shapes = []
    core = sam2_graphs.track_core

    def spying(model_, sizes, n_ptr, multimask, *tensors):
        shapes.append((n_ptr, tuple(tensors[-2].shape)))
        return core(model_, sizes, n_ptr, multimask, *tensors)

    monkeypatch.setattr("sss_lib.backbones.sam2_predictor.track_core", spying)
    graphs = StepGraphs(capture=False)
    monkeypatch.setattr(model, "sss_step_graphs", graphs)
    through_core = SegmentationSession(volume, sam2_to_span_edge, store=store)
    result = through_core.segment(prompts)

    assert result.recomputed_slices == {1: list(range(N_SLICES)), 2: list(range(N_SLICES))}
    # class 1: every slice but its key; class 2: the slices between its keys, once each way
    assert graphs.eager_runs == len(shapes) == (N_SLICES - 1) + 2 * (N_SLICES - 2)
    # Every memory shape from the first tracked slice to the steady one went through the core:
    # 1 to 16 object pointers (4 tokens each at tiny's 64-wide memory), 1 to 7 memories + a second key.
    pointer_tokens = sorted({n for n, _ in shapes})
    assert pointer_tokens[0] == 4 and pointer_tokens[-1] == 16 * 4
    assert len({shape for _, shape in shapes}) > 16
    for label in (1, 2):
        np.testing.assert_array_equal(through_core.class_logits(label), stock.class_logits(label))


def test_the_memory_attention_is_back_in_place_when_gathering_fails(sam2_to_span_edge, monkeypatch):
    model = sam2_to_span_edge.model
    real = model.memory_attention

    def broken(**kwargs):
        assert isinstance(model.memory_attention, sam2_graphs.MemoryTap)
        raise KeyError("no cond frame")

    monkeypatch.setattr(model, "_prepare_memory_conditioned_features", broken)
    with pytest.raises(KeyError):
        sam2_graphs.gather_memory(model, 3, [], [], [], {}, 5, False)
    assert model.memory_attention is real
    assert "memory_attention.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())


def test_graphs_are_dropped_when_the_weights_are_replaced_not_when_updated_in_place():
    graphs = StepGraphs(capture=False)
    linear = torch.nn.Linear(3, 2)
    assert graphs.bind(list(linear.parameters())) is True
    with torch.no_grad():
        linear.weight.add_(1.0)  # an optimiser step or load_state_dict: same tensors
    assert graphs.bind(list(linear.parameters())) is False
    linear.weight = torch.nn.Parameter(torch.zeros(2, 3))  # a module or tensor swapped in
    assert graphs.bind(list(linear.parameters())) is True


def test_cuda_graphs_are_refused_without_cuda(monkeypatch):
    with pytest.raises(ValueError, match="needs a CUDA device"):  # a CPU device, whatever the machine has
        build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True, cuda_graphs=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(capture=True)


def test_graphs_share_an_input_buffer_per_argument_and_shape_never_within_one_call():
    graphs = StepGraphs(capture=False)
    feats, memory, memory_pos = torch.zeros(16, 1, 8), torch.zeros(20, 1, 4), torch.zeros(20, 1, 4)
    a = [graphs.input_buffer(i, x) for i, x in enumerate((feats, memory, memory_pos))]
    assert a[1] is not a[2]  # same shape, different arguments: two buffers
    # a later graph with a longer memory shares the features' buffer and gets its own memory buffers
    longer = torch.zeros(24, 1, 4)
    b = [graphs.input_buffer(i, x) for i, x in enumerate((feats, longer, longer))]
    assert b[0] is a[0] and b[1] is not a[1] and b[1].shape == (24, 1, 4)
    assert graphs.input_buffer(1, memory) is a[1]
    graphs.clear()
    assert graphs.input_buffer(0, feats) is not a[0]
