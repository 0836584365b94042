"""The ``"blend_agree"`` span rule on synthetic runs: blend weights scaled by each run's agreement
with the far bounding key slice's own segmentation (IoU + floor, renormalised)."""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.backbones.spans import (
    AGREE_FLOOR,
    DEFAULT_SPAN_RULE,
    Gate,
    KeySlice,
    Span,
    agreement,
    resolve_span,
    run_stop,
)

# Key slices' own segmentations, (1, 4) logits: > 0 inside.
BELOW_KEY = np.array([[1, 1, -1, -1]], np.float32)
ABOVE_KEY = np.array([[1, 1, 1, 1]], np.float32)


def two_sided(lo: int = 1, hi: int = 3) -> Span:
    return Span(lo, hi, KeySlice(lo - 1, (), BELOW_KEY), KeySlice(hi + 1, (), ABOVE_KEY))


def synthetic_run(key: int, stop: int, direction: int, value: float, far: np.ndarray | None,
                  gate: Gate, decoded: list[int], reach: int = 99):
    """Yields ``value`` on every slice from ``key + direction`` up to ``stop`` (exclusive), at most
    ``reach`` slices, except ``far`` (its mask on the far key slice) on the last slice before
    ``stop`` when that is a key slice; records every slice decoded."""
    for n, s in enumerate(range(key + direction, stop, direction)):
        if n >= reach:
            return
        yield from gate.wait(s)
        decoded.append(s)
        is_far = s == stop - direction and far is not None
        yield s, (far if is_far else np.full((1, 4), value, np.float32))


def resolve(span: Span, rule: str, far_below: np.ndarray | None, far_above: np.ndarray | None,
            reach_up: int = 99, reach_down: int = 99) -> tuple[dict[int, np.ndarray], list[int]]:
    """The span resolved by ``rule`` from a run from below worth +10 and one from above worth -10,
    both made with :func:`run_stop` (``far_below``: the run from below's mask on the key above)."""
    gates, decoded = {+1: Gate(), -1: Gate()}, []
    up = (synthetic_run(span.below.index, run_stop(span, +1, rule), +1, 10.0, far_below, gates[+1], decoded, reach_up)
          if span.below is not None else None)
    down = (synthetic_run(span.above.index, run_stop(span, -1, rule), -1, -10.0, far_above, gates[-1], decoded,
                          reach_down) if span.above is not None else None)
    out = {}
    for s, logits in resolve_span(span, up, down, gates, rule=rule):
        assert s not in out, "each slice at most once"
        out[s] = logits
    return out, sorted(decoded)


def test_agreement_is_iou_with_the_key_slice_segmentation():
    assert agreement(np.array([[1, 1, -1, -1]], np.float32), ABOVE_KEY) == 0.5
    assert agreement(BELOW_KEY, BELOW_KEY) == 1.0
    assert agreement(np.array([[-1, -1, 1, 1]], np.float32), BELOW_KEY) == 0.0
    assert agreement(None, ABOVE_KEY) == 0.0, "a run that never got there is empty there"
    empty = np.full((1, 4), -1.0, np.float32)
    assert agreement(None, empty) == 1.0 and agreement(empty, empty) == 1.0


def test_runs_decode_the_far_key_slice_only_under_blend_agree_in_two_sided_spans():
    span = two_sided(1, 3)  # keys at 0 and 4
    assert (run_stop(span, +1, "blend_agree"), run_stop(span, -1, "blend_agree")) == (5, -1)
    assert (run_stop(span, +1, "blend"), run_stop(span, -1, "blend")) == (4, 0)
    assert (run_stop(span, +1, "nearest"), run_stop(span, -1, "nearest")) == (4, 0)
    one_sided = Span(0, 3, None, KeySlice(4, (), ABOVE_KEY))
    assert run_stop(one_sided, -1, "blend_agree") == -1  # the stack's start: nothing beyond


def test_a_run_that_disagrees_with_the_far_key_slice_gets_less_weight():
    span = two_sided(1, 3)
    # From below: half of the key above (IoU 0.5); from above: exactly the key below (IoU 1).
    out, decoded = resolve(span, "blend_agree", np.array([[1, 1, -1, -1]], np.float32), BELOW_KEY)
    assert sorted(out) == [1, 2, 3], "the far key slices' decodes are never yielded"
    assert decoded == [0, 1, 1, 2, 2, 3, 3, 4], "each run decoded its span and the far key slice"
    blend, _ = resolve(span, "blend", None, None)
    for s in (1, 2, 3):
        wb = (4 - s) / 4 * (0.5 + AGREE_FLOOR)
        wa = s / 4 * (1.0 + AGREE_FLOOR)
        w = wb / (wb + wa)
        np.testing.assert_allclose(out[s], np.full((1, 4), 10 * w - 10 * (1 - w)), rtol=1e-6)
        # the run from below (+10) counts less than under blend
        assert out[s][0, 0] < blend[s][0, 0]
    np.testing.assert_allclose(blend[2], 0.0, atol=1e-6)  # blend: the middle slice is an even mix


def test_a_run_that_never_reaches_the_far_key_slice_keeps_only_the_floor():
    span = two_sided(1, 3)
    # The run from below ends after two slices (1, 2): empty on the key above, agreement 0.
    out, decoded = resolve(span, "blend_agree", None, BELOW_KEY, reach_up=2)
    assert 4 not in decoded and 0 in decoded
    assert sorted(out) == [1, 2, 3]
    for s in (1, 2):
        wb = (4 - s) / 4 * AGREE_FLOOR
        wa = s / 4 * (1.0 + AGREE_FLOOR)
        np.testing.assert_allclose(out[s], 10 * wb / (wb + wa) - 10 * wa / (wb + wa), rtol=1e-6)
    np.testing.assert_allclose(out[3], -10.0)  # a slice one run reached takes that run's result


def test_equal_agreement_is_blend():
    span = two_sided(1, 5)  # keys at 0 and 6
    for far_below, far_above in ((ABOVE_KEY, BELOW_KEY),  # both agree fully
                                 (np.array([[1, 1, -1, -1]], np.float32), np.array([[1, -1, -1, -1]], np.float32))):
        assert agreement(far_below, ABOVE_KEY) == agreement(far_above, BELOW_KEY)
        agree, _ = resolve(span, "blend_agree", far_below, far_above)
        blend, _ = resolve(span, "blend", None, None)
        assert sorted(agree) == sorted(blend) == [1, 2, 3, 4, 5]
        for s in blend:
            np.testing.assert_allclose(agree[s], blend[s], rtol=1e-6, atol=1e-6)


def test_one_sided_spans_are_unchanged():
    assert DEFAULT_SPAN_RULE == "blend"
    for span, up in ((Span(0, 3, None, KeySlice(4, (), ABOVE_KEY)), False),
                     (Span(5, 8, KeySlice(4, (), BELOW_KEY), None), True)):
        results = {}
        for rule in ("blend", "blend_agree"):
            gates, decoded = {+1: Gate(), -1: Gate()}, []
            if up:
                run = synthetic_run(4, run_stop(span, +1, rule), +1, 10.0, None, gates[+1], decoded)
                got = resolve_span(span, run, None, gates, rule=rule)
            else:
                run = synthetic_run(4, run_stop(span, -1, rule), -1, -10.0, None, gates[-1], decoded)
                got = resolve_span(span, None, run, gates, rule=rule)
            results[rule] = ({s: float(v[0, 0]) for s, v in got}, sorted(decoded))
        assert results["blend_agree"] == results["blend"]
        assert sorted(results["blend"][0]) == list(span.slices())
