"""Coarse head: shapes, probabilities on the slice grid, rebuilding from saved weights, and the
feature geometry of both backbones (LiteMedSAM's padded 256 frame, SAM-2's resized square)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sss_lib.coarse_head import CoarseHead, build_coarse_head, slice_probabilities, stack_probabilities


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sam2_like_features(n: int = 2, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, size // stride, size // stride, generator=g)
            for c, stride in ((32, 4), (64, 8), (256, 16))]


def test_multiscale_logits_come_at_the_finest_level():
    feats = sam2_like_features()
    head = CoarseHead([32, 64, 256], num_classes=3, width=16)
    out = head(feats)
    assert out.shape == (2, 4, 16, 16)
    # Every level reaches the output: changing only the coarsest map changes the logits.
    changed = head([feats[0], feats[1], feats[2] + 1.0])
    assert not torch.allclose(out, changed)
    with pytest.raises(ValueError, match="3 feature level"):
        head(feats[:2])


def test_rebuilt_from_state_dict_gives_the_same_output():
    feats = sam2_like_features()
    head = build_coarse_head(feats, 3, width=16, seed=5).eval()
    arrays = {k: v.numpy() for k, v in head.state_dict().items()}  # as a task-model file returns them
    twin = CoarseHead.from_state_dict(arrays).eval()
    assert (twin.in_channels, twin.num_classes, twin.width) == ((32, 64, 256), 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(feats), twin(feats))
    # The seed alone decides the initial weights.
    again = build_coarse_head(feats, 3, width=16, seed=5)
    other = build_coarse_head(feats, 3, width=16, seed=6)
    assert torch.equal(again.classifier.weight, head.classifier.weight)
    assert not torch.equal(other.classifier.weight, head.classifier.weight)


def test_foreign_weights_are_refused():
    with pytest.raises(ValueError, match="not a coarse head"):
        CoarseHead.from_state_dict({"conv.weight": np.zeros((4, 8, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="multiple of 8"):
        CoarseHead([256], 3, width=12)


def test_litemedsam_grid_drops_the_padding():
    from sss_lib.backbones.litemedsam import LiteMedSamBackbone, LiteMedSamEmbedding
    from sss_lib.trainer.adapters import adapter_for

    # A 100 x 200 slice becomes 128 x 256 inside the padded 256 x 256 input (network rows 0-127).
    emb = LiteMedSamEmbedding(torch.zeros(1, 256, 64, 64), (100, 200), 256 / 200, (128, 256))
    maps = torch.full((1, 2, 64, 64), -5.0)
    maps[:, :, :32] = 5.0  # the valid region: feature rows 0-31 = network rows 0-127
    # The geometry needs no network: an identity module stands in for the weights.
    adapter = adapter_for(LiteMedSamBackbone(torch.nn.Identity(), "0" * 64, torch.device("cpu")))
    grid = adapter.to_slice_grid(maps, emb, (100, 200))
    assert grid.shape == (1, 2, 100, 200)
    # Only the last row may blend with the padding under bilinear resampling.
    assert bool((grid[..., :-1, :] > 4.0).all())
    assert adapter.coarse_features(emb)[0].shape == (1, 256, 64, 64)


def test_stack_probabilities_on_a_sam2_backbone():
    from sss_lib.backbones.sam2_backbone import build_sam2_backbone
    from sss_lib.trainer.adapters import adapter_for

    backbone = build_sam2_backbone("sam2.1_hiera_tiny", image_size=64, random_init=True)
    adapter = adapter_for(backbone)
    rng = np.random.default_rng(1)
    stack = rng.random((3, 40, 56), dtype=np.float32)
    cache = {s: backbone.embed_slice(stack[s]) for s in range(3)}
    feats = adapter.coarse_features(cache[0])
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 256, 4, 4)]
    head = build_coarse_head(feats, 2, width=16, seed=0)
    probs = stack_probabilities(head, adapter, cache.__getitem__, (3, 40, 56), labels=[4, 7])
    assert sorted(probs) == [4, 7]
    assert probs[4].shape == (3, 40, 56) and probs[4].dtype == np.float32
    total = probs[4] + probs[7]
    assert float(total.min()) >= 0.0 and float(total.max()) <= 1.0 + 1e-5
    one = slice_probabilities(head, adapter, cache[1], (40, 56))
    np.testing.assert_allclose(one.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(one[2], probs[7][1], atol=1e-6)
    assert head.training  # left as it was
