"""autocast_cache_held: weights cast to bf16 once per propagation span instead of once per slice,
with the same result; the casts are dropped when it closes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sss_lib import device


def _casts(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def _nesting() -> int:
    """Autocast's nesting level in this thread (read by raising it and putting it back)."""
    level = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return level


def _regions(layer: torch.nn.Linear, x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` calls, each in its own autocast region (as SAM-2 tracking runs one per slice)."""
    for _ in range(n):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    return out


def test_weights_are_cast_once_while_held_and_recast_after() -> None:
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    per_region = _casts(lambda: _regions(layer, x, 5))

    def held() -> None:
        with device.autocast_cache_held():
            _regions(layer, x, 5)

    assert _casts(held) == per_region - 2 * 4  # weight and bias cast once instead of five times
    assert _nesting() == 0

    # Closed: the cached casts are gone, so a changed weight is seen.
    with device.autocast_cache_held():
        before = _regions(layer, x, 1)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    after = _regions(layer, x, 1)
    assert not torch.equal(before, after)


def test_a_span_propagates_the_same_with_fewer_casts(sam2_to_span_edge, monkeypatch) -> None:
    from sss_lib.engine import SegmentationSession
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis, Volume

    monkeypatch.setenv("SSS_CPU_BF16", "1")  # bf16 autocast on this CPU, as on a GPU
    backbone = sam2_to_span_edge
    voxels = np.random.default_rng(0).normal(0, 1, (8, 48, 48)).astype(np.float32)
    volume = Volume(voxels, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "noise")
    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "a", [SlicePrompt(key_slice=0, box=(10, 10, 30, 30))])])

    def propagate() -> tuple[np.ndarray, int]:
        session = SegmentationSession(volume, backbone, slice_axis=SliceAxis(2))
        for s in range(8):
            session.embedding(s)  # embeddings outside the count
        casts = _casts(lambda: session.segment(prompts))
        return session.class_logits(1), casts

    held_logits, held_casts = propagate()
    monkeypatch.setattr(device, "autocast_cache_held", contextlib.nullcontext)
    plain_logits, plain_casts = propagate()
    np.testing.assert_array_equal(held_logits, plain_logits)
    assert held_casts < plain_casts * 0.75, (held_casts, plain_casts)


@pytest.fixture(autouse=True)
def _autocast_level_is_left_at_zero():
    yield
    assert _nesting() == 0


def test_a_training_step_never_sees_casts_of_earlier_weights() -> None:
    from sss_lib.trainer.semisup_step import training_autocast

    torch.manual_seed(1)
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    torch.autocast_increment_nesting()  # a hold that was never released (a leaked engine run)
    try:
        stale = _regions(layer, x, 1)  # caches the weight's bf16 cast
        with torch.no_grad():
            layer.weight.mul_(2.0)  # an optimizer step
        assert torch.equal(_regions(layer, x, 1), stale)  # the cached cast hides the new weight
        with training_autocast(torch.device("cpu")):
            pass
        assert not torch.equal(_regions(layer, x, 1), stale)  # the step began without cached casts
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
