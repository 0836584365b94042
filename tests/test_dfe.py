"""DFE (SSS_METHOD.md section 3) on hand-built feature maps: shapes, gradients and the formula's
limiting cases checked numerically."""

from __future__ import annotations

import pytest
import torch

from sss_lib.semisup import DFE

torch.set_num_threads(1)

SAM2_LEVELS = [(32, 32), (64, 16), (256, 8)]  # (channels, side): SAM-2's FPN levels, shrunk


def _features(levels: list[tuple[int, int]], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in levels]


@pytest.mark.parametrize("levels,width,shared", [
    ([(256, 16)], None, True),          # LiteMedSAM: one 256-channel map
    (SAM2_LEVELS, 64, True),
    (SAM2_LEVELS, None, False),
])
def test_output_shapes_per_scale(levels: list[tuple[int, int]], width: int | None, shared: bool) -> None:
    torch.manual_seed(0)
    dfe = DFE([c for c, _ in levels], width=width, shared=shared)
    weak, strong = _features(levels, seed=1), _features(levels, seed=2)
    out = dfe(weak, strong)
    d = dfe.width
    assert d == (width or max(c for c, _ in levels))
    for level, (c, s) in enumerate(levels):
        assert out.enhanced[level].shape == (2, c, s, s)
        assert out.features[level].shape == (2, c, s, s)
        torch.testing.assert_close(out.features[level], strong[level] + out.enhanced[level])
        t = out.terms[level]
        assert t.fused.shape == t.discrepancy.shape == t.attended_weak.shape == (2, d, s, s)
        assert t.similarity.shape == (2,)
    assert out.similarity.shape == (len(levels), 2)
    # Scales whose channels match the width need no projection; the others get one each way.
    n_proj = sum(1 for c, _ in levels if c != d)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in dfe.proj_in) == n_proj
    assert len(dfe.attend) == (1 if shared else len(levels))


def test_gradients_reach_every_parameter_and_both_views() -> None:
    torch.manual_seed(0)
    dfe = DFE([32, 64, 256], width=64)
    weak = [f.requires_grad_() for f in _features(SAM2_LEVELS, seed=1)]
    strong = [f.requires_grad_() for f in _features(SAM2_LEVELS, seed=2)]
    out = dfe(weak, strong)
    sum((f ** 2).mean() for f in out.features).backward()
    for name, p in dfe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for f in weak + strong:
        assert f.grad is not None and f.grad.abs().sum() > 0


def test_identical_views_keep_no_discrepancy_and_fuse_to_the_mlp() -> None:
    torch.manual_seed(0)
    dfe = DFE([32, 64, 256], width=64)
    feats = _features(SAM2_LEVELS, seed=3)
    out = dfe(feats, [f.clone() for f in feats])
    for level, t in enumerate(out.terms):
        torch.testing.assert_close(t.similarity, torch.ones(2), atol=1e-6, rtol=0)
        assert t.discrepancy.abs().max() <= 1e-6
        # fused = w MLP(A) + (1 - w) MLP(A) = MLP(A), computed independently from the parts.
        a = dfe.attend[0](dfe.proj_in[level](feats[level]))
        torch.testing.assert_close(t.attended_weak, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t.fused, dfe.mlp[0](a), atol=1e-5, rtol=1e-5)
        # and the enhancement is the projected MLP(A) alone.
        torch.testing.assert_close(out.enhanced[level], dfe.proj_out[level](dfe.mlp[0](a)), atol=1e-5, rtol=1e-5)


def test_formula_on_different_views() -> None:
    """Recompute s, w, fused and the discrepancy by hand from A^a and A^b."""
    torch.manual_seed(0)
    dfe = DFE([256], width=256)
    weak, strong = _features([(256, 8)], seed=4), _features([(256, 8)], seed=5)
    t = dfe(weak, strong).terms[0]
    a, b = dfe.attend[0](weak[0]), dfe.attend[0](strong[0])
    pa, pb = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))
    s = (pa * pb).sum(1) / (pa.norm(dim=1) * pb.norm(dim=1))
    torch.testing.assert_close(t.similarity, s, atol=1e-5, rtol=1e-5)
    w = torch.sigmoid(s).view(-1, 1, 1, 1)
    torch.testing.assert_close(t.fused, w * dfe.mlp[0](a) + (1 - w) * dfe.mlp[0](b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.discrepancy, (1 - s).view(-1, 1, 1, 1) * (b - a), atol=1e-5, rtol=1e-5)


def test_discrepancy_grows_as_views_diverge() -> None:
    torch.manual_seed(0)
    dfe = DFE([32, 64, 256], width=64)
    base = _features(SAM2_LEVELS, seed=6)
    noise = _features(SAM2_LEVELS, seed=7)
    sims, norms = [], []
    with torch.no_grad():
        for amount in (0.1, 0.3, 1.0, 3.0):
            strong = [f + amount * n for f, n in zip(base, noise)]
            out = dfe(base, strong)
            sims.append(out.similarity)
            norms.append(torch.stack([t.discrepancy.flatten(1).norm(dim=1) for t in out.terms]))
    for s, n in zip(sims, norms):
        assert (s < 1).all() and (n > 0).all()
    for earlier, later in zip(sims, sims[1:]):
        assert (later < earlier).all(), "similarity must fall as the strong view moves away"
    for earlier, later in zip(norms, norms[1:]):
        assert (later > earlier).all(), "the kept discrepancy must grow as the views diverge"


def test_zero_init_gain_leaves_strong_features_unchanged_at_first() -> None:
    torch.manual_seed(0)
    dfe = DFE([32, 64], width=32, zero_init_gain=True)
    weak, strong = _features([(32, 8), (64, 4)], seed=8), _features([(32, 8), (64, 4)], seed=9)
    out = dfe(weak, strong)
    for f, s in zip(out.features, strong):
        torch.testing.assert_close(f, s)
    sum(f.sum() for f in out.features).backward()
    assert dfe.gain is not None and dfe.gain.grad is not None and dfe.gain.grad.abs().sum() > 0


def test_mismatched_inputs_are_refused_with_a_clear_message() -> None:
    dfe = DFE([32, 64])
    with pytest.raises(ValueError, match="built for 2 scale"):
        dfe(_features([(32, 8)]), _features([(32, 8)]))
    with pytest.raises(ValueError, match="differ"):
        dfe(_features([(32, 8), (64, 4)]), _features([(32, 8), (64, 8)]))
    with pytest.raises(ValueError, match=r"expected \(B, 64"):
        dfe(_features([(32, 8), (32, 4)]), _features([(32, 8), (32, 4)]))


def test_self_enhance_is_the_forward_pass_with_identical_views() -> None:
    torch.manual_seed(1)
    dfe = DFE([32, 64, 256], width=64, shared=False)
    feats = _features(SAM2_LEVELS, seed=4)
    direct = dfe.self_enhance(feats)
    via_forward = dfe(feats, [f.clone() for f in feats]).features
    for a, b, f in zip(direct, via_forward, feats):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert (a - f).abs().max() > 1e-3  # the enhancement is not a no-op


def test_from_state_dict_rebuilds_width_sharing_and_gain_strictly() -> None:
    torch.manual_seed(2)
    for shared, gain in ((True, False), (False, True)):
        dfe = DFE([32, 64, 256], width=64, shared=shared, zero_init_gain=gain)
        if gain:
            with torch.no_grad():
                dfe.gain.fill_(0.5)
        state = {k: v.numpy() for k, v in dfe.state_dict().items()}
        back = DFE.from_state_dict(state, [32, 64, 256])
        assert (back.width, back.shared, back.gain is not None) == (64, shared, gain)
        feats = _features(SAM2_LEVELS, seed=5)
        for a, b in zip(dfe.self_enhance(feats), back.self_enhance(feats)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="not a DFE"):
        DFE.from_state_dict({"lateral.0.weight": torch.zeros(1)}, [256])
    with pytest.raises(RuntimeError):  # weights for other channels do not load
        DFE.from_state_dict(DFE([128], width=64).state_dict(), [256])


def test_coarse_head_reads_features_through_the_dfe() -> None:
    from sss_lib.coarse_head import CoarseHead
    from sss_lib.semisup import DfeCoarseHead

    torch.manual_seed(3)
    head, dfe = CoarseHead([32, 64, 256], 3, width=16), DFE([32, 64, 256], width=32)
    wrapped = DfeCoarseHead(head, dfe)
    feats = _features(SAM2_LEVELS, seed=6)
    assert wrapped.num_classes == 3 and wrapped.in_channels == (32, 64, 256)
    torch.testing.assert_close(wrapped(feats), head(dfe.self_enhance(feats)))
    assert (wrapped(feats) - head(feats)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="channels"):
        DfeCoarseHead(head, DFE([256], width=32))
