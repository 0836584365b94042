"""Warm a backbone up before the first real run.

A backbone's first run in a process pays costs that later runs do not: on a GPU, CUDA's start-up
(context, library handles, loading each kernel on first use: 4.8-12.8 s against 2.5-3.1 s for the
same run in a warm process, H200, ``benchmarks/results/engine_cuda_7132eec.json``); on a CPU, loading or
compiling the exported encoder (:mod:`.encoder_runtime`). :func:`warm_up` pays them on a small
synthetic stack (a bright disc on every slice, one box on slice 1), through the same engine path a
user's run takes: embedding, the key slice's decode, and propagation both ways.

The stack has three slices, or, where SAM-2 replays CUDA graphs (:mod:`.sam2_graphs`), as many as
its memory reaches plus two, so the run upwards passes through every memory shape a run from one key
slice meets and captures their graphs before a user's first run.
"""

from __future__ import annotations

import time

import numpy as np

from .base import Backbone

#: In-plane size of the synthetic slices (the backbone resizes them to its own input size).
WARMUP_SIZE = 64


def warm_up_slices(backbone: Backbone) -> int:
    """How many slices :func:`warm_up` uses for ``backbone`` by default (see the module doc)."""
    model = getattr(backbone, "model", None)
    graphs = getattr(model, "sss_step_graphs", None)
    if graphs is not None and graphs.capture:
        return int(model.sss_memory_reach()) + 2
    return 3


def warm_up(backbone: Backbone, *, slices: int | None = None) -> float:
    """Segment a synthetic ``slices x 64 x 64`` stack once with ``backbone``; returns the seconds.

    ``slices``: None for :func:`warm_up_slices`.

    Nothing is kept: the run's session and its embeddings are dropped when it returns.

    Raises:
        whatever the run raises (a broken backbone fails here, before a user's run).
    """
    from ..engine import SegmentationSession
    from ..prompts import ClassPrompts, PromptSet, SlicePrompt
    from ..volume import SliceAxis, Volume

    if slices is None:
        slices = warm_up_slices(backbone)
    if slices < 1:
        raise ValueError("warm_up needs at least one slice")
    yy, xx = np.mgrid[:WARMUP_SIZE, :WARMUP_SIZE]
    disc = ((yy - WARMUP_SIZE / 2) ** 2 + (xx - WARMUP_SIZE / 2) ** 2 <= (WARMUP_SIZE / 5) ** 2)
    voxels = np.repeat((disc * 800.0 - 400.0)[None].astype(np.float32), slices, axis=0)
    volume = Volume(voxels, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3),
                    source="warm-up")
    lo, hi = WARMUP_SIZE * 0.25, WARMUP_SIZE * 0.75
    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "warm-up", [
        SlicePrompt(key_slice=min(1, slices - 1), box=(lo, lo, hi, hi), source="user")])])
    start = time.perf_counter()
    session = SegmentationSession(volume, backbone, slice_axis=SliceAxis(2))
    try:
        session.segment(prompts)
    finally:
        session.store.close()
    return time.perf_counter() - start
