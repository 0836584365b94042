"""Two switches of semi-supervised training (issue 13, item 4 and the targets):

* class-wise adaptive confidence thresholds (``--adaptive-thresholds``): a class the teacher is
  rarely sure of is erased by its own pseudo-labels with one fixed threshold, and keeps being
  learned with per-class thresholds; the training loop uses and checkpoints them;
* DFE features to the mask decoder (``--dfe-to-decoder``): the decoder's consistency decodes the
  DFE-enhanced strong view, so its loss changes and DFE learns through the decoder.

SAM-2.1 tiny at random init, 64 px, on the 48 x 48 phantoms of tests/test_semisup_train.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from sss_lib.phantoms_cardiac import make_hard_cardiac_case
from sss_lib.semisup.thresholds import ClassThresholds
from sss_lib.trainer.semisup_step import SemiSupStepper, consistency_loss

from test_semisup_train import _truth_probabilities, data, train  # noqa: F401  (data: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_thresholds_follow_the_per_class_confidence_between_floor_and_confidence():
    thr = ClassThresholds(3, confidence=0.95, floor=0.5, momentum=0.0)
    assert thr.thresholds().tolist() == pytest.approx([0.95] * 3)  # before any evidence: the fixed threshold
    probs = torch.zeros(1, 3, 2, 4)
    probs[0, :, 0] = torch.tensor([0.99, 0.005, 0.005])[:, None]  # background: sure
    probs[0, :, 1, :2] = torch.tensor([0.3, 0.7, 0.0])[:, None]  # class 1: 0.7 sure
    probs[0, :, 1, 2:] = torch.tensor([0.6, 0.0, 0.4])[:, None]  # argmax background at 0.6
    thr.update(probs)
    # background's level is the mean of 0.99 (x4) and 0.6 (x2) = 0.86; class 1's 0.7; class 2 unseen (1.0)
    expected = [0.95 * 0.86, 0.95 * 0.7, 0.95]
    assert thr.thresholds().tolist() == pytest.approx(expected, abs=1e-6)
    pseudo, trusted = thr.trust(probs)
    assert pseudo[0, 1].tolist() == [1, 1, 0, 0]
    assert trusted[0].tolist() == [[True] * 4, [True, True, False, False]]  # 0.7 >= 0.665; 0.6 < 0.817
    thr.update(torch.full((1, 3, 2, 2), 1 / 3), valid=torch.zeros(1, 2, 2, dtype=torch.bool))  # nothing valid
    assert thr.thresholds().tolist() == pytest.approx(expected, abs=1e-6)
    low = ClassThresholds(3, confidence=0.95, floor=0.8, momentum=0.0)
    low.update(probs)
    assert float(low.thresholds()[1]) == pytest.approx(0.8)  # never below the floor
    back = ClassThresholds(3, 0.95)
    back.load_state_dict(thr.state_dict())
    assert torch.equal(back.thresholds(), thr.thresholds())
    with pytest.raises(ValueError, match="channels"):
        ClassThresholds(4, 0.95).load_state_dict(thr.state_dict())
    with pytest.raises(ValueError, match="floor"):
        ClassThresholds(3, 0.9, floor=0.95)


def test_a_rarely_confident_class_is_erased_by_a_fixed_threshold_and_kept_by_class_thresholds():
    """Self-training of a 1x1 head (EMA teacher, lambda_u = 1, four unlabeled slices per labeled
    one) on the hard phantom's labels, where the myocardium's features are weak: the teacher's
    Myo probabilities stay below 0.95, so a fixed threshold leaves the Myo out of the consistency
    loss while the classes around it train, and the ring shrinks to nothing."""
    torch.manual_seed(0)
    labels = make_hard_cardiac_case(3, size=(64, 64), fov_mm=150.0, sub_slices=1).labels.voxels
    order = np.argsort(-(labels == 2).sum(axis=(1, 2)))
    truths = [torch.from_numpy(labels[int(k)].astype(np.int64)) for k in order[:5]]
    strength = torch.tensor([1.0, 1.0, 0.4, 1.0])  # the Myo's signal is weak
    feats = [((torch.nn.functional.one_hot(t, 4).float() * strength).permute(2, 0, 1)
              + 0.3 * torch.randn(4, *t.shape))[None] for t in truths]
    head = torch.nn.Conv2d(4, 4, 1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):  # supervised warm-up on the labeled slice
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats[0]), truths[0][None]).backward()
        opt.step()

    def myo_dice(model: torch.nn.Module) -> float:
        pred = torch.cat([model(f).argmax(dim=1) for f in feats[1:]])
        a, b = pred == 2, torch.stack(truths[1:]) == 2
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    def self_train(thresholds: ClassThresholds | None) -> tuple[float, float]:
        student, teacher = copy.deepcopy(head), copy.deepcopy(head)
        opt = torch.optim.Adam(student.parameters(), lr=0.05)
        myo_trusted = []
        for _ in range(100):
            with torch.no_grad():
                probs = torch.softmax(torch.cat([teacher(f) for f in feats[1:]]), dim=1)
            if thresholds is None:
                confidence, pseudo = probs.max(dim=1)
                trusted = confidence >= 0.95
            else:
                thresholds.update(probs)
                pseudo, trusted = thresholds.trust(probs)
            myo_trusted.append(float(trusted[pseudo == 2].float().mean()) if bool((pseudo == 2).any()) else 0.0)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(student(feats[0]), truths[0][None])
            for n, f in enumerate(feats[1:]):
                loss = loss + consistency_loss(student(f), pseudo[n:n + 1], trusted[n:n + 1])
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), student.parameters()):
                    pt.mul_(0.9).add_(0.1 * ps)
        return myo_dice(student), float(np.mean(myo_trusted))

    warm = myo_dice(head)
    assert warm > 0.55
    fixed, fixed_share = self_train(None)
    assert fixed_share < 0.05, "the teacher is rarely sure of the Myo: a fixed threshold trusts almost none of it"
    assert fixed < 0.2, "with one fixed threshold the pseudo-labels erase the class"
    adaptive, adaptive_share = self_train(ClassThresholds(4, confidence=0.95))
    assert adaptive_share > 0.3
    assert adaptive > warm, "with class-wise thresholds the class keeps being learned"


def test_the_loop_uses_and_checkpoints_the_class_thresholds(data, backbone, tmp_path: Path, monkeypatch):  # noqa: F811
    from sss_lib.runs.checkpoint import load_checkpoint

    lab, unl = data
    _truth_probabilities(monkeypatch, unl)
    calls = []
    real = ClassThresholds.trust
    monkeypatch.setattr(ClassThresholds, "trust", lambda self, p: calls.append(1) or real(self, p))
    outcome, steps = train(tmp_path / "run", lab, unl, backbone, iterations=5, adaptive_thresholds=True,
                           class_guard=False)
    assert len(calls) == 2 * 2, "the teacher's targets of both unlabeled steps (2 slices each) go through them"
    ssl = [r for r in steps if r.step > 3]
    level = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["extra"]["thresholds"]["level"]
    assert len(level) == 4 and min(level) < 1.0, "the teacher's confidence moved the levels off their start"
    assert all(r.losses["unsup"] is not None for r in ssl)
    calls.clear()
    train(tmp_path / "fixed", lab, unl, backbone, iterations=5, class_guard=False)
    assert not calls and "thresholds" in load_checkpoint(tmp_path / "fixed" / "checkpoints" / "last.pt")["extra"]


def test_dfe_to_decoder_changes_the_decoder_loss_and_trains_dfe_through_the_decoder(data, backbone, tmp_path: Path,  # noqa: F811
                                                                                    monkeypatch):
    lab, unl = data
    _truth_probabilities(monkeypatch, unl)
    seen: list[tuple[torch.Tensor, float]] = []
    real = SemiSupStepper._decoder_consistency

    def spy(self, embs, targets, orders):  # noqa: ANN001, ANN202
        out = real(self, embs, targets, orders)
        grads = torch.autograd.grad(out.sum(), list(self.student["dfe"].parameters()), allow_unused=True,
                                    retain_graph=True)
        seen.append((out.detach().clone(), sum(float(g.abs().sum()) for g in grads if g is not None)))
        return out

    monkeypatch.setattr(SemiSupStepper, "_decoder_consistency", spy)
    # The formula as specified (no zero gain), so that the enhancement is not zero at the first step.
    common = dict(iterations=4, confidence=0.0, dfe_zero_init_gain=False, class_guard=False)
    train(tmp_path / "off", lab, unl, backbone, **common)
    off = list(seen)
    seen.clear()
    train(tmp_path / "on", lab, unl, backbone, dfe_to_decoder=True, **common)
    on = list(seen)
    assert len(off) == len(on) == 1  # one unsupervised step (after the 3 warm-up steps)
    assert off[0][0].abs().sum() > 0, "prompts reached the decoder"
    assert off[0][1] == 0.0, "without the switch the decoder's consistency does not reach DFE"
    assert on[0][1] > 0.0, "with it DFE receives gradient through the decoder"
    assert not torch.allclose(on[0][0], off[0][0]), "the decoder decodes other (enhanced) features"
