"""A SAM-2 run queues each slice before it reads the previous one (so a GPU's work on one slice
overlaps the host's on the last), and still yields, stops and waits at gates as a slice-by-slice run."""

from __future__ import annotations

import types

import numpy as np

from sss_lib.backbones.spans import Gate


def _fake_tracking(backbone, monkeypatch, empty_from: int | None = None) -> list[str]:
    events: list[str] = []

    def queue(state, s, ids, reverse):  # noqa: ANN001, ANN202
        events.append(f"queue {s}")
        value = -5.0 if empty_from is not None and s >= empty_from else 5.0

        def result():
            events.append(f"read {s}")
            return {ids[0]: (np.full((4, 4), value, np.float32), value)}

        return types.SimpleNamespace(result=result)

    monkeypatch.setattr(backbone.model, "sss_track_slice_async", queue)
    return events


def test_each_slice_is_queued_before_the_previous_one_is_read(sam2_to_span_edge, monkeypatch):
    events = _fake_tracking(sam2_to_span_edge, monkeypatch)
    yielded = [s for s, _ in sam2_to_span_edge._run(None, 1, 2, 6, +1, Gate())]
    assert yielded == [2, 3, 4, 5]
    assert events == ["queue 2", "queue 3", "read 2", "queue 4", "read 3", "queue 5", "read 4", "read 5"]


def test_where_the_object_ends_the_slice_queued_past_it_is_dropped_unread(sam2_to_span_edge, monkeypatch):
    monkeypatch.setattr(sam2_to_span_edge, "stop_after_empty", 2)
    events = _fake_tracking(sam2_to_span_edge, monkeypatch, empty_from=4)
    yielded = [s for s, _ in sam2_to_span_edge._run(None, 1, 2, 9, +1, Gate())]
    assert yielded == [2, 3, 4, 5]  # ends at its second empty slice, as a slice-by-slice run does
    assert events[-2:] == ["queue 6", "read 5"] and "read 6" not in events


def test_a_gate_that_holds_the_run_gets_the_slice_already_computed_first(sam2_to_span_edge, monkeypatch):
    events = _fake_tracking(sam2_to_span_edge, monkeypatch)
    gate = Gate()
    gate.allow = lambda s: s < 5
    run = sam2_to_span_edge._run(None, 1, 2, 9, +1, gate)
    first = [next(run) for _ in range(4)]
    assert [s for s, _ in first] == [2, 3, 4, 5]
    assert all(logits is not None for _, logits in first[:3]) and first[3][1] is None  # waiting at 5
    assert events == ["queue 2", "queue 3", "read 2", "queue 4", "read 3", "read 4"]
    gate.allow = lambda s: True
    rest = [s for s, logits in run if logits is not None]
    assert rest == [5, 6, 7, 8]
