"""SAM-2.1 backbone: embedding, in-memory propagation, stopping, cancel, checkpoints.

SAM-2.1 tiny at random init on a tiny synthetic stack (8 slices of 48x64, network input 64 px) so the
whole file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sss_lib.backbones.base import ABSENT_LOGIT, PropagationStep
from sss_lib.backbones.sam2_backbone import (
    SAM2_CONFIGS,
    Sam2Backbone,
    Sam2Embedding,
    build_sam2_backbone,
    sam2_overrides,
)
from sss_lib.errors import PromptError, WeightsError
from sss_lib.prompts import SlicePrompt

S, H, W = 8, 48, 64
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _two_threads_float32():
    # float32 on the CPU so logits can be compared exactly with sam2's own predictor; the bf16
    # autocast path (CPUs with AMX / AVX512-BF16, and CUDA) is tested on its own below.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSS_CPU_BF16", "0")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone() -> Sam2Backbone:
    return build_sam2_backbone("sam2.1_hiera_tiny", image_size=SIZE, random_init=True)


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    rng = np.random.default_rng(7)
    vol = rng.random((S, H, W), dtype=np.float32) * 0.2
    vol[:, 12:30, 20:44] += 0.7  # a bright block through every slice
    return np.clip(vol, 0, 1)


class Cache:
    """The engine's role: embed each slice on first use, count lookups and computations."""

    def __init__(self, backbone: Sam2Backbone, stack: np.ndarray) -> None:
        self.backbone, self.stack = backbone, stack
        self.items: dict[int, Sam2Embedding] = {}
        self.computed = 0
        self.asked: list[int] = []

    def __call__(self, s: int) -> Sam2Embedding:
        self.asked.append(s)
        if s not in self.items:
            self.items[s] = self.backbone.embed_slice(self.stack[s])
            self.computed += 1
        return self.items[s]


@pytest.fixture(scope="module")
def cache(backbone, stack) -> Cache:
    c = Cache(backbone, stack)
    for s in range(S):
        c(s)
    return c


@pytest.fixture
def encoder_calls(backbone, monkeypatch) -> list[int]:
    """Counts calls of the image encoder from now on."""
    calls: list[int] = []
    original = backbone.model.forward_image

    def counting(img):
        calls.append(1)
        return original(img)

    monkeypatch.setattr(backbone.model, "forward_image", counting)
    return calls


def two_objects() -> dict[int, list[SlicePrompt]]:
    return {
        1: [SlicePrompt(3, box=(20, 12, 43, 29), positive_points=[(31, 20)], negative_points=[(2, 2)])],
        5: [SlicePrompt(2, positive_points=[(10, 40)]), SlicePrompt(4, box=(5, 33, 16, 45))],
    }


def run(backbone, stack, lookup, objects) -> list[PropagationStep]:
    return list(backbone.propagate(stack, lookup, objects))


def visited(steps: list[PropagationStep], label: int) -> set[int]:
    return {st.slice_index for st in steps if label in st.logits}


def test_embedding_holds_features_only(backbone, cache):
    emb = cache.items[0]
    assert isinstance(emb, Sam2Embedding) and emb.image_size == SIZE
    assert [tuple(f.shape) for f in emb.features] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 256, 4, 4)]
    assert all(not f.requires_grad and f.device == backbone.device for f in emb.features)
    assert emb.nbytes == sum(f.numel() * f.element_size() for f in emb.features)
    assert all(f.dtype == torch.float32 for f in emb.features)  # float32 off CUDA without native bf16
    assert backbone.weights_sha256 == "random-init"
    assert backbone.cache_key() == f"sam2.1_hiera_tiny@{SIZE}#random-init"


def test_propagate_reads_cache_only_and_visits_both_directions(backbone, stack, encoder_calls, monkeypatch):
    monkeypatch.setattr(backbone, "stop_after_empty", None)  # random weights: never stop early
    lookup = Cache(backbone, stack)
    for s in range(S):
        lookup(s)
    assert len(encoder_calls) == S

    steps = run(backbone, stack, lookup, two_objects())

    assert len(encoder_calls) == S, "propagation must never re-encode a slice"
    assert lookup.computed == S and set(lookup.asked) <= set(range(S))
    # Label 1 (key slice 3) is tracked forward to the last slice and backward to the first.
    assert visited(steps, 1) == set(range(S))
    assert visited(steps, 5) == set(range(S))
    # Each class on its own: key slices first, then each span in stack order, each slice once.
    # Label 5: keys 2 and 4; spans [0, 1] (from 2, down), [3] (between: the key below wins a
    # tie), [5, 7] (from 4, up).
    assert [st.slice_index for st in steps if 1 in st.logits] == [3] + [2, 1, 0] + [4, 5, 6, 7]
    assert [st.slice_index for st in steps if 5 in st.logits] == [2, 4] + [1, 0] + [3] + [5, 6, 7]
    assert all(len(st.logits) == 1 for st in steps)
    for st in steps:
        for logits in st.logits.values():
            assert logits.shape == (H, W) and logits.dtype == np.float32
            assert logits.min() >= ABSENT_LOGIT and np.isfinite(logits).all()


def test_matches_stock_sam2_video_predictor(backbone, stack, cache, monkeypatch):
    """Same logits as sam2's own predictor run on the same frames (its features computed on the
    fly): a key slice's span up is stock SAM-2's forward sweep from that prompt, its span down a
    backward sweep from the same prompt in a fresh state (a span's memory holds only its own key
    slices); between two key slices both are conditioning frames, and each slice takes both sweeps'
    logits weighted by distance (:func:`sss_lib.backbones.spans.blend_weight`)."""
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    monkeypatch.setattr(backbone, "stop_after_empty", None)
    objects = {
        1: [SlicePrompt(2, box=(20, 12, 43, 29)),
            SlicePrompt(6, box=(18, 10, 45, 31), negative_points=[(1, 1)])],
        3: [SlicePrompt(5, positive_points=[(30, 20)])],
    }
    ours = {}
    for st in run(backbone, stack, cache, objects):
        for label, logits in st.logits.items():
            assert (label, st.slice_index) not in ours, "a slice yielded twice"
            ours[label, st.slice_index] = logits

    overrides = [o for o in sam2_overrides(SIZE) if "_target_" not in o]
    overrides.append("++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor")
    cfg = compose(config_name=SAM2_CONFIGS["sam2.1_hiera_tiny"], overrides=overrides)
    OmegaConf.resolve(cfg)
    stock = instantiate(cfg.model, _recursive_=True).eval()
    stock.load_state_dict(backbone.model.state_dict())
    with torch.inference_mode():
        images = torch.cat([backbone.model.sss_preprocess(stack[s]) for s in range(S)])

    def sweep(label, prompts, start, reverse):
        state = backbone.model.sss_new_state(S, H, W, lookup=None)
        state["images"] = images
        for p in prompts:
            pts = p.positive_points + p.negative_points
            labels = [1] * len(p.positive_points) + [0] * len(p.negative_points)
            stock.add_new_points_or_box(
                state, p.key_slice, label, box=p.box,
                points=np.array(pts, np.float32).reshape(-1, 2) if pts else None,
                labels=np.array(labels, np.int32) if pts else None,
            )
        return {f: masks[0, 0].clamp_min(ABSENT_LOGIT).numpy()
                for f, _, masks in stock.propagate_in_video(state, start_frame_idx=start, reverse=reverse)}

    a, b = objects[1]
    expected = {}
    for s, logits in sweep(1, [a], 2, True).items():  # key 2 alone, down to 0 (and key 2 itself)
        expected[1, s] = logits
    between_up, between_down = sweep(1, [a, b], 2, False), sweep(1, [a, b], 6, True)
    for s in (3, 4, 5):  # the "blend" span rule: distance-weighted mean of both sweeps' logits
        w = (6 - s) / (6 - 2)
        expected[1, s] = w * between_up[s] + (1 - w) * between_down[s]
    expected[1, 6] = sweep(1, [b], 6, False)[6]
    expected[1, 7] = sweep(1, [b], 6, False)[7]
    for s, logits in sweep(3, objects[3], 5, False).items():
        expected[3, s] = logits
    for s, logits in sweep(3, objects[3], 5, True).items():
        expected[3, s] = logits

    assert sorted(ours) == sorted(expected)
    for key, logits in expected.items():
        np.testing.assert_allclose(ours[key], logits, atol=1e-4, err_msg=str(key))


def force_masks(backbone, monkeypatch, value_per_label: dict[int, float]) -> None:
    """Make SAM-2's tracked (non-key) masks of these labels all ``value`` (< 0: empty)."""
    original = backbone.model._run_single_frame_inference

    def forced(inference_state, output_dict, **kwargs):
        out, masks = original(inference_state=inference_state, output_dict=output_dict, **kwargs)
        for label, value in value_per_label.items():
            idx = inference_state["obj_id_to_idx"].get(label)
            if idx is not None and inference_state["output_dict_per_obj"][idx] is output_dict:
                masks = torch.full_like(masks, value)
                out["pred_masks"] = masks
                out["object_score_logits"] = torch.full_like(out["object_score_logits"], value)
        return out, masks

    monkeypatch.setattr(backbone.model, "_run_single_frame_inference", forced)


def test_stop_after_empty_ends_each_object_and_sweep(backbone, stack, cache, monkeypatch):
    objects = {1: [SlicePrompt(3, box=(20, 12, 43, 29))], 2: [SlicePrompt(4, box=(20, 12, 43, 29))]}
    monkeypatch.setattr(backbone, "stop_after_empty", 2)

    # Label 1 empty everywhere off its key slice, label 2 always present.
    force_masks(backbone, monkeypatch, {1: -5.0, 2: 5.0})
    steps = run(backbone, stack, cache, objects)
    assert visited(steps, 1) == {1, 2, 3, 4, 5}, "ends 2 empty slices beyond its key slice, each way"
    assert visited(steps, 2) == set(range(S))
    assert all(1 not in st.logits for st in steps if st.slice_index in (0, 6, 7))

    # Both empty: each sweep stops once both have ended; slices 0 and 7 are never visited.
    force_masks(backbone, monkeypatch, {1: -5.0, 2: -5.0})
    steps = run(backbone, stack, cache, objects)
    assert visited(steps, 1) == {1, 2, 3, 4, 5} and visited(steps, 2) == {2, 3, 4, 5, 6}
    assert {st.slice_index for st in steps} == set(range(1, 7))

    # A longer patience visits more.
    monkeypatch.setattr(backbone, "stop_after_empty", 3)
    assert visited(run(backbone, stack, cache, objects), 1) == {0, 1, 2, 3, 4, 5, 6}


def test_object_score_alone_marks_empty(backbone, stack, cache, monkeypatch):
    """Positive logits but a negative object score count as empty."""
    monkeypatch.setattr(backbone, "stop_after_empty", 1)
    original = backbone.model._run_single_frame_inference

    def no_object(**kwargs):
        out, masks = original(**kwargs)
        masks = torch.full_like(masks, 3.0)
        out["pred_masks"] = masks
        out["object_score_logits"] = torch.full_like(out["object_score_logits"], -1.0)
        return out, masks

    monkeypatch.setattr(backbone.model, "_run_single_frame_inference", no_object)
    steps = run(backbone, stack, cache, {4: [SlicePrompt(3, box=(20, 12, 43, 29))]})
    assert visited(steps, 4) == {2, 3, 4}


def test_close_midway_leaves_nothing_behind(backbone, stack, cache, monkeypatch):
    monkeypatch.setattr(backbone, "stop_after_empty", None)
    states: list[dict] = []
    original = backbone.model.sss_new_state

    def spy(*args, **kwargs):
        states.append(original(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(backbone.model, "sss_new_state", spy)
    baseline = run(backbone, stack, cache, two_objects())

    gen = backbone.propagate(stack, cache, two_objects())
    next(gen)
    next(gen)
    # Between yields the caller is in plain torch mode (no leaked inference mode or autocast).
    assert not torch.is_inference_mode_enabled()
    assert not torch.is_autocast_enabled()
    gen.close()
    assert states[-1] == {}, "the per-call state is dropped on close"

    again = run(backbone, stack, cache, two_objects())
    assert [st.slice_index for st in again] == [st.slice_index for st in baseline]
    for a, b in zip(again, baseline):
        for label in b.logits:
            np.testing.assert_array_equal(a.logits[label], b.logits[label])


def test_second_propagation_reuses_embeddings(backbone, stack, encoder_calls, monkeypatch):
    monkeypatch.setattr(backbone, "stop_after_empty", None)
    lookup = Cache(backbone, stack)
    first = run(backbone, stack, lookup, {1: [SlicePrompt(3, box=(20, 12, 43, 29))]})
    other = SlicePrompt(3, box=(2, 30, 14, 46), negative_points=[(30, 20)])
    second = run(backbone, stack, lookup, {1: [other]})
    assert lookup.computed == S and len(encoder_calls) == S
    key_first = next(st for st in first if st.slice_index == 3).logits[1]
    key_second = next(st for st in second if st.slice_index == 3).logits[1]
    assert not np.allclose(key_first, key_second), "different prompts give different masks"


def test_prompt_errors(backbone, stack, cache):
    with pytest.raises(PromptError, match="outside"):
        run(backbone, stack, cache, {1: [SlicePrompt(3, box=(0, 0, 70, 10))]})
    with pytest.raises(PromptError, match="two boxes"):
        run(backbone, stack, cache, {1: [SlicePrompt(3, box=(0, 0, 9, 9)), SlicePrompt(3, box=(1, 1, 5, 5))]})
    assert run(backbone, stack, cache, {}) == []


def test_random_init_is_reproducible(backbone):
    other = build_sam2_backbone("sam2.1_hiera_tiny", image_size=SIZE, random_init=True)
    for (name, a), (_, b) in zip(backbone.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_roundtrip_and_mismatch(backbone, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"model": backbone.model.state_dict()}, path)
    loaded = build_sam2_backbone("sam2.1_hiera_tiny", image_size=SIZE, checkpoint=path)
    assert loaded.weights_sha256 != "random-init" and len(loaded.weights_sha256) == 64
    key = "sam_mask_decoder.iou_token.weight"
    assert torch.equal(loaded.model.state_dict()[key], backbone.model.state_dict()[key])

    broken = dict(backbone.model.state_dict())
    broken.pop(key)
    torch.save({"model": broken}, tmp_path / "broken.pt")
    with pytest.raises(WeightsError):
        build_sam2_backbone("sam2.1_hiera_tiny", image_size=SIZE, checkpoint=tmp_path / "broken.pt")


def test_build_argument_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_sam2_backbone("sam2.1_hiera_tiny", image_size=100, random_init=True)
    with pytest.raises(ValueError, match="unknown SAM-2.1 model"):
        build_sam2_backbone("sam2_hiera_huge", random_init=True)
    with pytest.raises(WeightsError, match="no checkpoint"):
        build_sam2_backbone("sam2.1_hiera_tiny")


def test_image_size_512_embeds_one_slice(stack):
    bb = build_sam2_backbone("sam2.1_hiera_tiny", image_size=512, random_init=True)
    assert bb.image_size == 512 and bb.model.sam_image_embedding_size == 32
    emb = bb.embed_slice(stack[0])
    assert [tuple(f.shape) for f in emb.features] == [(1, 32, 128, 128), (1, 64, 64, 64), (1, 256, 32, 32)]
    # The memory attention's RoPE grid follows image_size / 16.
    layer = bb.model.memory_attention.layers[0]
    assert layer.self_attn.freqs_cis.shape[0] == 32 * 32
    assert layer.cross_attn_image.freqs_cis.shape[0] == 32 * 32


def test_cpu_bf16_autocast_path_embeds_and_propagates(backbone, stack, monkeypatch):
    monkeypatch.setenv("SSS_CPU_BF16", "1")
    embs = [backbone.embed_slice(stack[s]) for s in range(S)]
    assert any(f.dtype == torch.bfloat16 for f in embs[0].features)  # computed under autocast
    assert embs[0].nbytes < sum(f.numel() * 4 for f in embs[0].features)
    steps = list(backbone.propagate(stack, lambda s: embs[s], {1: [SlicePrompt(3, box=(20, 12, 43, 29))]}))
    assert {st.slice_index for st in steps} >= {3}
    assert all(st.logits[1].dtype == np.float32 and st.logits[1].shape == (H, W) for st in steps if 1 in st.logits)
