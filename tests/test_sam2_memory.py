"""SAM-2's memory path in semi-supervised training (``--memory-path``, :mod:`sss_lib.trainer.sam2_memory`).

SAM-2.1 tiny at random init and 64 px on the CPU: the teacher's pseudo-label of every slice is the
engine's propagation output there, and the student's decoder is trained on the memory-conditioned
features the engine decodes at inference (not on a memory-free key-slice decode).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sss_lib.errors import InputError
from sss_lib.prompts import SlicePrompt
from sss_lib.trainer.adapters import DecoderAdapter, adapter_for
from sss_lib.trainer.sam2_memory import MemorySweeps, memory_decode

from test_semisup_train import _truth_probabilities, data, train  # noqa: F401  (data: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S, H, W = 6, 40, 48


@pytest.fixture(scope="module")
def stack(sam2_to_span_edge):
    rng = np.random.default_rng(0)
    vol = rng.random((S, H, W)).astype(np.float32)
    vol[:, 10:30, 12:36] += 1.0
    vol /= vol.max()
    return vol, [sam2_to_span_edge.embed_slice(vol[s]) for s in range(S)]


def _decoder_inputs(model, run) -> list[torch.Tensor]:  # noqa: ANN001
    """The ``image_embeddings`` of every mask-decoder call made by ``run()``."""
    seen: list[torch.Tensor] = []
    hook = model.sam_mask_decoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["image_embeddings"].detach().float().clone()), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_pseudo_labels_are_the_engines_propagation_and_the_student_decodes_memory_conditioned_features(
        sam2_to_span_edge, stack):
    backbone = sam2_to_span_edge
    vol, embs = stack
    prompt = SlicePrompt(2, (12, 10, 35, 29), [(24, 20)], [], source="auto")
    engine_inputs: list[torch.Tensor] = []
    engine: dict[int, np.ndarray] = {}

    def propagate() -> None:
        for step in backbone.propagate(vol, embs.__getitem__, {1: [prompt]}):
            engine[step.slice_index] = step.logits[1]

    engine_inputs = _decoder_inputs(backbone.model, propagate)
    targets = MemorySweeps(backbone).run(embs.__getitem__, (S, H, W), 1, prompt, range(S))
    assert sorted(targets) == list(range(S))
    for s in range(S):
        np.testing.assert_array_equal(targets[s].logits, engine[s])  # the pseudo-label's logits: the engine's
    assert targets[2].key_prompt is prompt and targets[2].state is None
    assert targets[0].reverse and not targets[4].reverse

    adapter = adapter_for(backbone)
    model = backbone.model
    decoder = list(model.sam_mask_decoder.parameters())
    for s in (0, 4):  # a slice below and one above the key slice
        for p in decoder:
            p.grad = None
        box: list = []
        mine = _decoder_inputs(model, lambda: box.append(memory_decode(adapter, embs[s], targets[s], 1, (H, W))))
        out = box[0]
        assert len(mine) == 1
        assert any(torch.equal(mine[0], e) for e in engine_inputs), \
            "the decoder's training input is the memory-conditioned feature the engine decodes at this slice"
        key_path = embs[s].features[-1].float() + model.no_mem_embed.view(1, -1, 1, 1)
        assert not torch.allclose(mine[0], key_path, atol=1e-3), "not the memory-free key-slice input"
        assert float(out.object_score.detach()) > 0  # so the engine's logits are the decoder's own (no absent gate)
        np.testing.assert_allclose(out.logits.detach().numpy(), engine[s], atol=1e-5)
        out.logits.sum().backward()
        assert sum(float(p.grad.abs().sum()) for p in decoder if p.grad is not None) > 0
    for p in decoder:
        p.grad = None


def test_the_sweeps_end_where_the_engines_run_ends(sam2_to_span_edge, stack, monkeypatch):
    vol, embs = stack
    backbone = sam2_to_span_edge
    prompt = SlicePrompt(1, (12, 10, 35, 29), [(24, 20)], [], source="auto")
    real = backbone.model.sss_track_slice_async

    def empty_at_4(state, s, ids, reverse):  # noqa: ANN001, ANN202
        tracked = real(state, s, ids, reverse)
        if s != 4:
            return tracked
        out = tracked.result()
        return types.SimpleNamespace(result=lambda: {k: (np.full_like(v[0], -5.0), v[1]) for k, v in out.items()})

    # the engine's runs and the sweeps both go through it
    monkeypatch.setattr(backbone.model, "sss_track_slice_async", empty_at_4)
    monkeypatch.setattr(backbone, "stop_after_empty", 1)
    engine = {st.slice_index for st in backbone.propagate(vol, embs.__getitem__, {1: [prompt]})}
    assert engine == {0, 1, 2, 3, 4}, "the engine's run ends at the empty slice"
    reached = MemorySweeps(backbone).run(embs.__getitem__, (S, H, W), 1, prompt, range(S))
    assert set(reached) == engine, "no pseudo-label beyond where Auto-segment stops"


def test_memory_path_needs_a_sam2_backbone():
    from sss_lib.trainer.semisup_step import memory_sweeps

    with pytest.raises(InputError, match="SAM-2"):
        memory_sweeps(DecoderAdapter(types.SimpleNamespace(name="litemedsam")))


def test_training_pseudo_labels_from_memory_and_decodes_memory_conditioned_features(data, backbone, tmp_path: Path,  # noqa: F811
                                                                                     monkeypatch):
    from sss_lib.trainer import sam2_memory, semisup_step

    lab, unl = data
    _truth_probabilities(monkeypatch, unl)
    swept: list[dict] = []
    decoded: list = []
    teacher_logits: list[torch.Tensor] = []
    Stepper = semisup_step.SemiSupStepper
    run, decode, targets = Stepper._memory_targets, sam2_memory.memory_decode, Stepper._targets
    monkeypatch.setattr(Stepper, "_memory_targets", lambda self, *a: swept.append(run(self, *a)) or swept[-1])
    monkeypatch.setattr(semisup_step, "memory_decode",
                        lambda ad, emb, t, label, hw: decoded.append(t) or decode(ad, emb, t, label, hw))
    monkeypatch.setattr(Stepper, "_targets",
                        lambda self, logits, untrusted: teacher_logits.append(logits.clone()) or targets(self, logits, untrusted))
    outcome, _ = train(tmp_path / "mem", lab, unl, backbone, iterations=4, confidence=0.0, memory_path=True,
                       class_guard=False)
    assert swept and decoded, "the teacher propagated and the student decoded through memory"
    assert any(t.state is not None for t in decoded), "non-key slices are decoded from memory-conditioned features"
    # Every class the sweeps reached on a slice gave that slice's teacher logits (the engine's output).
    reached = [t for found in swept for per_slice in found.values() for t in per_slice.values()]
    assert reached
    assert all(any(np.array_equal(t.logits, row.numpy()) for lg in teacher_logits for row in lg[0]) for t in reached)
    assert outcome.last["unsup_decoder"] > 0
    swept.clear()
    decoded.clear()
    train(tmp_path / "key", lab, unl, backbone, iterations=4, confidence=0.0, class_guard=False)
    assert not swept and not decoded, "without the switch the memory path is not used"


def test_labeled_slices_train_the_decoder_on_memory_conditioned_features(data, backbone, tmp_path: Path,  # noqa: F811
                                                                          monkeypatch):
    from sss_lib.trainer import sam2_memory, semisup_step
    from sss_lib.trainer.sam2_memory import labeled_key_prompt

    labels = np.zeros((5, 20, 30), np.int64)
    labels[1, 5:9, 10:14] = 2
    labels[3, 4:12, 8:20] = 2  # the largest area: the key slice
    prompt = labeled_key_prompt(labels, 2, (1.0, 1.0), 3)
    assert prompt.key_slice == 3 and prompt.box == (5.0, 1.0, 22.0, 14.0) and len(prompt.positive_points) == 1
    assert labeled_key_prompt(labels, 1, (1.0, 1.0), 3) is None

    lab, unl = data
    decoded: list = []
    decode = sam2_memory.memory_decode
    monkeypatch.setattr(semisup_step, "memory_decode",
                        lambda ad, emb, t, label, hw: decoded.append(t) or decode(ad, emb, t, label, hw))
    outcome, steps = train(tmp_path / "sup", lab, unl, backbone, iterations=3, consistency=False, memory_path=True,
                           class_guard=False)
    assert any(t.state is not None and t.key_prompt is None for t in decoded), \
        "supervised decoder samples off the key slice are decoded from the student's memory"
    assert all(np.isfinite(r.losses["decoder"]) for r in steps)
