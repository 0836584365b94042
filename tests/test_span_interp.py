"""The interpolated-box span rules: a span between two key boxes decoded from boxes interpolated
between them (MedSAM's recipe), alone (``interp_box``) or averaged with the carried runs' blend
(``interp_blend``)."""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.backbones.litemedsam_propagate import interpolated_boxes, interpolated_run
from sss_lib.backbones.spans import Gate, KeySlice, Span, resolve_span
from sss_lib.prompts import SlicePrompt


def _key(index: int, *prompts: SlicePrompt) -> KeySlice:
    return KeySlice(index, tuple(prompts), np.zeros((4, 4), np.float32))


def test_boxes_are_interpolated_linearly_between_the_two_key_boxes():
    span = Span(3, 5, _key(2, SlicePrompt(2, box=(10, 20, 30, 40))), _key(6, SlicePrompt(6, box=(14, 20, 50, 60))))
    boxes = interpolated_boxes(span)
    assert sorted(boxes) == [3, 4, 5]
    assert boxes[4] == pytest.approx((12, 20, 40, 50))
    assert boxes[3] == pytest.approx((11, 20, 35, 45))


def test_no_interpolation_without_a_box_on_both_sides():
    box = SlicePrompt(2, box=(10, 20, 30, 40))
    assert interpolated_boxes(Span(3, 9, _key(2, box), None)) is None  # the stack's end above
    points_only = SlicePrompt(6, positive_points=((5.0, 5.0),))
    assert interpolated_boxes(Span(3, 5, _key(2, box), _key(6, points_only))) is None
    two_boxes = (SlicePrompt(6, box=(0, 0, 5, 5)), SlicePrompt(6, box=(20, 20, 30, 30)))
    assert interpolated_boxes(Span(3, 5, _key(2, box), _key(6, *two_boxes))) is None


def _runs(span: Span, decoded: list[int]):
    gates = {+1: Gate(), -1: Gate()}

    def run(direction: int):
        start, stop = (span.lo, span.hi + 1) if direction > 0 else (span.hi, span.lo - 1)
        for s in range(start, stop, direction):
            yield from gates[direction].wait(s)
            decoded.append(s)
            yield s, np.full((4, 4), 2.0 * direction, np.float32)

    return run(+1), run(-1), gates


def test_interp_box_takes_the_interpolated_decodes_and_the_carried_runs_decode_nothing():
    span = Span(3, 5, _key(2, SlicePrompt(2, box=(10, 20, 30, 40))), _key(6, SlicePrompt(6, box=(14, 20, 50, 60))))
    seen_boxes = []

    def decode(embedding, box, positive, negative):
        seen_boxes.append(tuple(box))
        return type("Out", (), {"logits": np.full((4, 4), embedding, np.float32)})()

    decoded: list[int] = []
    forward, backward, gates = _runs(span, decoded)
    interpolated = interpolated_run(decode, lambda s: float(s), interpolated_boxes(span))
    out = dict(resolve_span(span, forward, backward, gates, rule="interp_box", interpolated=interpolated))
    assert sorted(out) == [3, 4, 5] and decoded == []
    assert all(np.all(out[s] == s) for s in out)
    assert seen_boxes[1] == pytest.approx((12, 20, 40, 50))


def test_interp_blend_averages_the_interpolated_decode_with_the_blend():
    span = Span(3, 5, _key(2, SlicePrompt(2, box=(10, 20, 30, 40))), _key(6, SlicePrompt(6, box=(14, 20, 50, 60))))
    decoded: list[int] = []
    forward, backward, gates = _runs(span, decoded)
    interpolated = iter([(s, np.full((4, 4), 10.0, np.float32)) for s in span.slices()])
    out = dict(resolve_span(span, forward, backward, gates, rule="interp_blend", interpolated=interpolated))
    # slice 4 lies midway: the blend of +2 and -2 is 0, so the mean with 10 is 5
    assert float(out[4][0, 0]) == pytest.approx(5.0)
    assert sorted(set(decoded)) == [3, 4, 5]


def test_without_an_interpolated_run_the_interp_rules_blend():
    span = Span(3, 5, _key(2, SlicePrompt(2, positive_points=((1.0, 1.0),))), _key(6, SlicePrompt(6, box=(0, 0, 3, 3))))
    decoded: list[int] = []
    forward, backward, gates = _runs(span, decoded)
    out = dict(resolve_span(span, forward, backward, gates, rule="interp_box", interpolated=None))
    assert float(out[4][0, 0]) == pytest.approx(0.0)  # the blend of +2 and -2
