"""One optimiser step of semi-supervised training (SSS_METHOD.md sections 3 and 4).

Supervised part (every step), as the supervised trainer: the coarse head on ``head_batch``
labeled slices (cross-entropy + Dice) and the mask decoder on ``decoder_batch`` prompts drawn
from the labels (BCE + Dice + IoU/object heads).

Unsupervised part (after the warm-up, weighted by the ramped lambda_u), per unlabeled slice:

1. **Teacher** (EMA of the student) on the weak view: coarse head over the slice's whole volume
   -> PCSW -> a prompt per class on this slice (:mod:`.slice_prompts`) -> the teacher's mask
   decoder -> per-class logits -> pseudo-label and confidence (highest class probability, with a
   0 background logit, ``>= confidence``); pixels the teacher's prompts cannot vouch for are not
   trusted.
2. **Student** on two cached strong views (:mod:`.unlabeled`); the coarse head reads each one
   enhanced by DFE with the weak view's features (``--no-dfe``: as they are):

   * view 1 -> coarse head and, with the teacher's prompts, mask decoder; both against the
     pseudo-label on trusted pixels (cross-entropy + Dice);
   * view 2 -> CutMix with its partner slice of the batch (the features of both views are mixed
     on the feature grid, the pseudo-labels and trust on the slice grid with the same box)
     -> coarse head, against the mixed pseudo-label.

   **(ours)** Where a slice has one view (labeled slices, the teacher's weak view, validation and
   inference) the coarse head reads it through the same DFE enhanced with itself
   (:class:`sss_lib.semisup.DfeCoarseHead`), so that the head never learns on a kind of feature
   that inference does not give it; the DFE ships in the task model for that reason.
   **(ours)** The mask decoder decodes the strong view's own features: at inference (SAM-2
   propagation) it reads the backbone's features, never DFE's. ``--dfe-to-decoder`` decodes the
   DFE-enhanced strong features instead (section 3's last line), so DFE also learns through it.

   ``--memory-path`` (SAM-2): the teacher's pseudo-label of a slice is the engine's memory
   propagation from PCSW's key slice and the decoder decodes the strong view's memory-conditioned
   features (:mod:`.sam2_memory`) instead of a key-slice decode from the slice's own prompt;
   ``--adaptive-thresholds``: class-wise confidence thresholds (:mod:`sss_lib.semisup.thresholds`).
   **(ours)** CutMix goes to the prompt-free coarse head only: content pasted into a slice is not
   described by that slice's prompts, so a prompted decoder cannot be asked to segment it.
   **(ours)** CutMix runs on cached embeddings (features of both partners mixed inside a box on
   the feature grid) rather than on pixels, which would need a fresh encoding.

Every loss is a mean of per-sample terms, and CutMix partners are neighbours ``(2k, 2k + 1)`` of
the global batch, so data-parallel processes that each take a contiguous even share compute
exactly the single-process step (:mod:`.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..backbones.base import ABSENT_LOGIT
from ..semisup import EmaTeacher, confidence_mask, masked_cross_entropy, object_probabilities
from ..semisup import unsupervised_weight, with_background_logit
from ..semisup.guard import ClassGuard, guarded_trust
from ..semisup.thresholds import ClassThresholds
from ..semisup.warmup import WarmupPlan
from .adapters import DecoderAdapter
from .data import LabeledCase
from .distributed import DistContext
from .losses import coarse_loss, mask_loss
from .sam2_memory import MemorySweeps, key_prompts, labeled_key_prompt, memory_decode
from .samples import ClassIndex, draw_samples
from .semisup_config import SemiSupConfig
from .slice_prompts import SlicePlan, box_slice_plans, pcsw_slice_plans
from .unlabeled import UnlabeledCase

log = logging.getLogger(__name__)

#: CutMix box area (fraction of the feature grid) and aspect ratio ranges (UniMatch's).
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_RATIO = (0.3, 1 / 0.3)


@dataclasses.dataclass
class Targets:
    """The teacher's answer for one unlabeled slice (slice grid ``(H, W)``).

    ``pseudo``: long channel index (0 = background, ``c`` = the c-th class); ``trusted``: bool;
    ``decoder_trusted``: the pixels the mask decoder's consistency uses: ``trusted``, or with
    ``SemiSupConfig.decoder_agreement`` those of them where the teacher's coarse head agrees with
    ``pseudo``.
    """

    pseudo: torch.Tensor
    trusted: torch.Tensor
    plan: SlicePlan
    decoder_trusted: torch.Tensor
    #: ``SemiSupConfig.memory_path``: class label -> :class:`.sam2_memory.MemoryTarget` (the
    #: classes SAM-2's propagation reaches on this slice); None: the key-slice decodes of ``plan``.
    memory: dict[int, Any] | None = None


class UnlabeledOrder:
    """Epochs over the unlabeled slices: a seeded permutation, consumed a global batch at a time."""

    def __init__(self, slices: Sequence[tuple[int, int]], rng: np.random.Generator) -> None:
        self.slices = list(slices)
        self.rng = rng
        self.epoch = 0
        self.position = 0
        self.perm = rng.permutation(len(self.slices)) if self.slices else np.zeros(0, np.int64)

    def next(self, n: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(n):
            if self.position >= len(self.perm):
                self.epoch += 1
                self.position = 0
                self.perm = self.rng.permutation(len(self.slices))
            out.append(self.slices[int(self.perm[self.position])])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"perm": torch.as_tensor(self.perm, dtype=torch.int64), "position": self.position,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm = state["perm"].numpy().astype(np.int64)
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])


@dataclasses.dataclass
class StepContext:
    """What a step needs besides the modules: data, classes, geometry helpers."""

    config: SemiSupConfig
    adapter: DecoderAdapter
    labeled: list[LabeledCase]
    unlabeled: list[UnlabeledCase]
    labels: list[int]
    class_ranges: dict[int, tuple[float, float]]
    carry_fraction: float
    carry_points: bool
    dist: DistContext


class SemiSupStepper:
    """Owns the student's optimiser, the EMA teacher, the generators and the data order."""

    def __init__(self, ctx: StepContext, student: nn.ModuleDict, warmup: WarmupPlan | None = None) -> None:
        """``warmup``: when the supervised-only steps end (None: ``cfg.warmup`` steps, fixed)."""
        cfg = ctx.config
        self.ctx = ctx
        self.cfg = cfg
        self.adapter = ctx.adapter
        self.student = student
        self.rng = np.random.default_rng(np.random.SeedSequence([int(cfg.train.seed), 0x7EA1]))
        augment_seed = np.random.SeedSequence([int(cfg.train.seed), 0xC07]).generate_state(1)[0]
        self.gen = torch.Generator().manual_seed(int(augment_seed))
        top = max(max(ctx.labels), max(int(c.labels.max(initial=0)) for c in ctx.labeled))
        self.lut = np.zeros(top + 2, np.int64)
        for channel, lbl in enumerate(ctx.labels, start=1):
            self.lut[lbl] = channel
        self.lut[-1] = -1  # IGNORE (-1) indexes the last entry
        self.slices = [(c, s) for c, case in enumerate(ctx.labeled) for s in range(case.n_slices)]
        self.stacks = [c.labels for c in ctx.labeled]
        self.index = ClassIndex.build(self.stacks, ctx.labels)
        self.order = UnlabeledOrder([(c, s) for c, u in enumerate(ctx.unlabeled) for s in range(u.n_slices)], self.rng)

        for module in self.adapter.modules().values():
            module.requires_grad_(False)
        decoder_params = self.adapter.trainable_parameters() if cfg.train.train_decoder else []
        for p in decoder_params:
            p.requires_grad_(True)
        groups = [{"params": list(student["coarse_head"].parameters()), "lr": cfg.train.lr_head}]
        if "dfe" in student:
            groups.append({"params": list(student["dfe"].parameters()), "lr": cfg.dfe_lr})
        if "image_encoder" in student:  # the encoder's last blocks (trainer/encoder_tuning.py)
            groups.append({"params": [p for p in student["image_encoder"].parameters() if p.requires_grad],
                           "lr": cfg.train.lr_encoder})
        if decoder_params:
            groups.append({"params": decoder_params, "lr": cfg.train.lr_decoder})
        self.params = [p for g in groups for p in g["params"]]
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
        self.teacher = EmaTeacher(student, cfg.ema_decay) if cfg.semi_supervised else None
        self.teacher_points = cfg.teacher_points if cfg.teacher_points is not None else self.adapter.knows_points
        #: The confirmation-bias guard (:mod:`sss_lib.semisup.guard`) and its anchor: the coarse head
        #: (with DFE) frozen at the end of the warm-up; the loop feeds the guard validations.
        self.warmup = warmup if warmup is not None else WarmupPlan(cfg.warmup, cfg.warmup, cfg.val_every, until_plateau=False)
        self.guard = ClassGuard(ctx.labels, self.warmup.last_possible, cfg.guard_margin) \
            if cfg.semi_supervised and cfg.class_guard and not ctx.dist.distributed else None
        self.anchor: nn.ModuleDict | None = None
        #: SAM-2's memory path (``SemiSupConfig.memory_path``, :mod:`.sam2_memory`).
        self.sweeps = memory_sweeps(self.adapter) if cfg.memory_path else None
        #: Class-wise adaptive confidence thresholds (``SemiSupConfig.adaptive_thresholds``).
        self.thresholds = ClassThresholds(len(ctx.labels) + 1, cfg.confidence, min(cfg.adaptive_floor, cfg.confidence)) \
            if cfg.semi_supervised and cfg.adaptive_thresholds else None

    # -- state -------------------------------------------------------------------------------------
    @property
    def generators(self) -> dict[str, Any]:
        return {"sample": self.rng, "augment": self.gen}

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    # -- the step ----------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        """Run optimiser step ``step`` (1-based); returns this process's loss values and stats."""
        cfg = self.cfg
        factor = (1.0 - (step - 1) / cfg.total_steps) ** 0.9
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor
        self.student.train()
        self.adapter.train(cfg.train.train_decoder)
        self.optimizer.zero_grad(set_to_none=True)
        weight = 0.0
        if self.teacher is not None and not self.warmup.supervised_only(step):
            weight = unsupervised_weight(step - 1, warmup_steps=self.warmup.last_possible, rampup_steps=cfg.rampup,
                                         lambda_u=cfg.lambda_u)
        with training_autocast(self.device):
            head = self._head_loss()
            dec = self._decoder_loss() if cfg.train.train_decoder else None
            sup = head if dec is None else head + dec
            stats: dict[str, float] = {}
            total = sup
            if weight > 0:
                unsup, stats = self._unsupervised()
                total = sup + weight * unsup
        total.backward()
        self.ctx.dist.average_gradients(self.params)
        self.optimizer.step()
        if self.teacher is not None:
            self.teacher.update(self.student)
        if self.guard is not None and step == self.warmup.end and self.anchor is None:
            self.anchor = self.snapshot_anchor()
        row = {"total": total.item(), "sup": sup.item(), "head": head.item(),
               "decoder": dec.item() if dec is not None else float("nan"),
               "unsup": stats.get("unsup", float("nan")), "lambda_u": weight,
               "mask_ratio": stats.get("mask_ratio", float("nan"))}
        row.update({k: v for k, v in stats.items() if k not in row})
        row["lr"] = self.optimizer.param_groups[-1]["lr"]
        if self.thresholds is not None:
            row["threshold_min"] = float(self.thresholds.thresholds().min())
        return row

    def end_warmup(self, best_weights: dict[str, torch.Tensor] | None) -> None:
        """Start the unsupervised phase after the step :attr:`warmup` has just decided to end at:
        the student (and the teacher) restart from ``best_weights`` (None: as they are), and the
        guard takes its baselines up to here and its anchor from them."""
        if best_weights is not None:
            self.student.load_state_dict(best_weights)
        if self.teacher is not None:
            self.teacher.module.load_state_dict(self.student.state_dict())
        self._guard_follows_warmup()
        if self.guard is not None:
            self.anchor = self.snapshot_anchor()

    def load_warmup_state(self, state: dict[str, Any] | None) -> None:
        """Restore :attr:`warmup` from a checkpoint (the guard's baselines follow its end)."""
        self.warmup.load_state_dict(state)
        self._guard_follows_warmup()

    def _guard_follows_warmup(self) -> None:
        """The guard takes baselines up to the warm-up's last step, known only once it has ended."""
        if self.guard is not None:
            self.guard.warmup = int(self.warmup.last_possible)

    def snapshot_anchor(self) -> nn.ModuleDict:
        """A frozen copy of the student's coarse head (and DFE): the guard's anchor."""
        import copy

        anchor = nn.ModuleDict({k: copy.deepcopy(self.student[k]) for k in ("coarse_head", "dfe") if k in self.student})
        anchor.eval()
        for p in anchor.parameters():
            p.requires_grad_(False)
        return anchor

    def guard_state(self) -> dict[str, Any] | None:
        """The guard and its anchor, for a checkpoint (None without a guard)."""
        if self.guard is None:
            return None
        anchor = {k: v.detach().cpu().clone() for k, v in self.anchor.state_dict().items()} if self.anchor else None
        return {"guard": self.guard.state_dict(), "anchor": anchor}

    def load_guard_state(self, state: dict[str, Any] | None) -> None:
        if self.guard is None or not state:
            return
        self.guard.load_state_dict(state["guard"])
        if state.get("anchor") is not None:
            self.anchor = self.snapshot_anchor()
            self.anchor.load_state_dict(state["anchor"])

    @torch.no_grad()
    def _anchor_channels(self, emb: Any, hw: tuple[int, int]) -> np.ndarray | None:
        """The anchor's argmax channel on one slice ``(H, W)`` (0 = background), None without one."""
        if self.anchor is None:
            return None
        head = coarse_head_of(self.anchor)
        logits = head(self.adapter.coarse_features(emb)).float()
        return self.adapter.to_slice_grid(logits, emb, hw)[0].argmax(dim=0).cpu().numpy()

    # -- supervised ------------------------------------------------------------------------------
    def _head_loss(self) -> torch.Tensor:
        n = self.cfg.train.head_batch
        picks = self.rng.choice(len(self.slices), size=n, replace=n > len(self.slices))
        mine = self.ctx.dist.shard([int(i) for i in picks])
        embs, targets = [], []
        for i in mine:
            c, s = self.slices[i]
            case = self.ctx.labeled[c]
            embs.append((case, case.session.embedding(s)))
            targets.append(self.lut[case.labels[s].astype(np.int64)])
        levels = zip(*(self.adapter.coarse_features(e) for _, e in embs))
        logits = coarse_head_of(self.student)([torch.cat(level) for level in levels]).float()
        loss = logits.new_zeros(())
        for n_, ((case, emb), target) in enumerate(zip(embs, targets)):
            grid = self.adapter.to_slice_grid(logits[n_:n_ + 1], emb, tuple(case.labels.shape[1:]))
            loss = loss + coarse_loss(grid, torch.from_numpy(target).to(grid.device)[None])
        return loss / len(embs)

    def _decoder_loss(self) -> torch.Tensor:
        cfg = self.cfg.train
        samples = draw_samples(self.stacks, self.index, cfg.decoder_batch, self.rng, cfg.jitter,
                               carry_fraction=self.ctx.carry_fraction, carry_points=self.ctx.carry_points,
                               ended_fraction=cfg.ended_fraction,
                               spacings_xy=[c.spacing_xy for c in self.ctx.labeled])
        total = None
        # Drawn for the global batch (every process the same), only with the memory path.
        coins = self.rng.random(len(samples)) < 0.5 if self.sweeps is not None else np.zeros(len(samples), bool)
        mine = self.ctx.dist.shard(list(zip(samples, coins)))
        for sample, coin in mine:
            case = self.ctx.labeled[sample.case_index]
            emb = case.session.embedding(sample.slice_index)
            reached = self._labeled_memory(sample) if coin else None
            if reached is not None:
                out = memory_decode(self.adapter, emb, reached, sample.label, case.labels.shape[1:])
            else:
                out = self.adapter.decode(emb, case.labels.shape[1:], sample.box, sample.positive, sample.negative)
            target = torch.from_numpy(sample.target).to(out.logits.device)
            loss, _ = mask_loss(out.logits.float(), target, out.iou.float(),
                                out.object_score.float() if out.object_score is not None else None)
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(mine)

    def _labeled_memory(self, sample: Any) -> Any:
        """The student's memory at a labeled sample's slice (:mod:`.sam2_memory`): propagated from
        the class's key slice with its PCSW-style prompt from the label; None on the key slice or
        where the propagation ends before the slice."""
        assert self.sweeps is not None
        case = self.ctx.labeled[sample.case_index]
        prompt = labeled_key_prompt(case.labels, sample.label, case.spacing_xy, self.cfg.train.pcsw.box_margin_px)
        if prompt is None or prompt.key_slice == sample.slice_index:
            return None
        self.adapter.train(False)  # propagate as the engine does (eval mode)
        try:
            reached = self.sweeps.run(case.session.embedding, tuple(case.labels.shape), sample.label, prompt,
                                      [sample.slice_index])
        finally:
            self.adapter.train(self.cfg.train.train_decoder)
        return reached.get(sample.slice_index)

    # -- unsupervised ----------------------------------------------------------------------------
    def _unsupervised(self) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        n = cfg.unlabeled_batch
        picks = self.order.next(n)
        k = cfg.strong_views
        # Drawn for the whole global batch on every process, so every share sees the same draws.
        views = torch.rand(n, k, generator=self.gen).argsort(dim=1)
        first = views[:, 0]
        second = views[:, 1] if k > 1 else views[:, 0]
        coins = torch.rand(n, generator=self.gen) < cfg.cutmix_p
        box_draws = torch.rand(n, 4, generator=self.gen)
        class_order = torch.rand(n, len(self.ctx.labels), generator=self.gen).argsort(dim=1)

        start, stop = self.ctx.dist.bounds(n)
        local = list(range(start, stop))
        targets = self._teacher([picks[i] for i in local])

        weak = [self._unlabeled_case(picks[i]).session.embedding(picks[i][1]) for i in local]
        strong1 = [self._unlabeled_case(picks[i]).strong[picks[i][1]][int(first[i])] for i in local]
        strong2 = [self._unlabeled_case(picks[i]).strong[picks[i][1]][int(second[i])] for i in local]
        f_weak = [self.adapter.coarse_features(e) for e in weak]
        f_s1 = [self.adapter.coarse_features(e) for e in strong1]
        f_s2 = [self.adapter.coarse_features(e) for e in strong2]

        # CutMix on view 2 with the partner (2k <-> 2k + 1) when it is in this share.
        pseudo2 = [t.pseudo for t in targets]
        trusted2 = [t.trusted for t in targets]
        f_w2 = list(f_weak)
        mixed = 0
        for j, i in enumerate(local):
            partner = i ^ 1
            if not (start <= partner < stop) or not bool(coins[i]):
                continue
            pj = partner - start
            if targets[pj].pseudo.shape != targets[j].pseudo.shape or \
                    [f.shape for f in f_s2[pj]] != [f.shape for f in f_s2[j]]:
                continue
            hw = tuple(targets[j].pseudo.shape)
            to_grid = lambda m, e=weak[j], hw=hw: self.adapter.to_slice_grid(m, e, hw)  # noqa: E731
            view = cutmix_features(f_weak[j], f_s2[j], targets[j].pseudo, targets[j].trusted,
                                   f_weak[pj], f_s2[pj], targets[pj].pseudo, targets[pj].trusted, box_draws[i], to_grid)
            f_w2[j], f_s2[j], pseudo2[j], trusted2[j] = view.weak, view.strong, view.pseudo, view.trusted
            mixed += 1

        enhanced1 = self._enhance(f_weak, f_s1)
        enhanced2 = self._enhance(f_w2, f_s2)
        head1 = self._head_consistency(enhanced1, weak, [t.pseudo for t in targets], [t.trusted for t in targets])
        head2 = self._head_consistency(enhanced2, weak, pseudo2, trusted2)
        dec = self._decoder_consistency(self._decoder_views(strong1, enhanced1), targets, [class_order[i] for i in local])
        per_sample = cfg.unsup_head_weight * (head1 + head2) / 2 + cfg.unsup_decoder_weight * dec
        loss = per_sample.mean()
        ratio = float(np.mean([t.trusted.float().mean().item() for t in targets]))
        decoder_ratio = float(np.mean([t.decoder_trusted.float().mean().item() for t in targets]))
        return loss, {"unsup": loss.item(), "unsup_head": float((head1 + head2).mean().item() / 2),
                      "unsup_decoder": float(dec.mean().item()), "mask_ratio": ratio, "decoder_trust": decoder_ratio,
                      "cutmix": mixed / max(1, len(local))}

    def _unlabeled_case(self, pick: tuple[int, int]) -> UnlabeledCase:
        return self.ctx.unlabeled[pick[0]]

    def _enhance(self, weak: list[list[torch.Tensor]], strong: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per level ``(B, C_l, h_l, w_l)``: DFE-enhanced strong features (or the strong ones)."""
        w = [torch.cat(level) for level in zip(*weak)]
        s = [torch.cat(level) for level in zip(*strong)]
        if "dfe" not in self.student:
            return s
        return self.student["dfe"](w, s).features

    def _decoder_views(self, strong: list[Any], enhanced: list[torch.Tensor]) -> list[Any]:
        """What the decoder's consistency decodes: the strong views as cached or, with
        ``SemiSupConfig.dfe_to_decoder``, with DFE's enhanced features (``enhanced``: per level
        ``(B, C_l, h_l, w_l)``, sample n = ``strong[n]``) in place of their own."""
        if not self.cfg.dfe_to_decoder or "dfe" not in self.student:
            return strong
        return [self.adapter.with_features(e, [f[n:n + 1] for f in enhanced]) for n, e in enumerate(strong)]

    def _head_consistency(self, feats: list[torch.Tensor], embs: list[Any], pseudo: list[torch.Tensor],
                          trusted: list[torch.Tensor]) -> torch.Tensor:
        logits = self.student["coarse_head"](feats).float()
        out = []
        for n, emb in enumerate(embs):
            grid = self.adapter.to_slice_grid(logits[n:n + 1], emb, tuple(pseudo[n].shape))
            out.append(consistency_loss(grid, pseudo[n][None], trusted[n][None]))
        return torch.stack(out)

    def _decoder_consistency(self, embs: list[Any], targets: list[Targets],
                             orders: list[torch.Tensor]) -> torch.Tensor:
        cap = self.cfg.unsup_decoder_classes
        out = []
        dropped = set(self.guard.dropped) if self.guard is not None else set()
        for n, (emb, t) in enumerate(zip(embs, targets)):
            available = t.memory if t.memory is not None else t.plan.prompts
            prompted = [self.ctx.labels[int(c)] for c in orders[n]
                        if self.ctx.labels[int(c)] in available and self.ctx.labels[int(c)] not in dropped]
            chosen = prompted if cap is None else prompted[:cap]
            if not chosen or not self.cfg.train.train_decoder:
                out.append(torch.zeros((), device=self.device))
                continue
            terms = []
            for label in chosen:
                if t.memory is not None:
                    logits = memory_decode(self.adapter, emb, t.memory[label], label, tuple(t.pseudo.shape)).logits
                else:
                    p = t.plan.prompts[label]
                    logits = self.adapter.decode(emb, tuple(t.pseudo.shape), p.box, p.positive, p.negative).logits
                binary = with_background_logit(logits.float()[None, None])
                channel = self.ctx.labels.index(label) + 1
                terms.append(consistency_loss(binary, (t.pseudo == channel).long()[None], t.decoder_trusted[None]))
            out.append(torch.stack(terms).mean())
        return torch.stack(out)

    # -- teacher ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher(self, picks: list[tuple[int, int]]) -> list[Targets]:
        from ..coarse_head import stack_probabilities

        assert self.teacher is not None
        cfg = self.cfg
        teacher = self.teacher.module
        by_case: dict[int, list[int]] = {}
        for c, s in picks:
            by_case.setdefault(c, []).append(s)
        plans: dict[tuple[int, int], SlicePlan] = {}
        coarse: dict[tuple[int, int], np.ndarray] = {}
        keys: dict[int, dict[int, Any]] = {}
        for c, slices in by_case.items():
            case = self.ctx.unlabeled[c]
            probs = stack_probabilities(coarse_head_of(teacher), self.adapter, case.session.embedding,
                                        case.session.stack_shape, self.ctx.labels)
            if cfg.use_pcsw:
                found = pcsw_slice_plans(probs, slices, in_plane_spacing=case.spacing_xy,
                                         slice_spacing=case.slice_spacing, class_ranges=self.ctx.class_ranges,
                                         config=cfg.train.pcsw, untrusted_floor=cfg.floor)
            else:
                found = box_slice_plans(probs, slices, config=cfg.train.pcsw, untrusted_floor=cfg.floor)
            plans.update({(c, s): plan for s, plan in found.items()})
            if self.sweeps is not None:
                keys[c] = key_prompts(probs, in_plane_spacing=case.spacing_xy, slice_spacing=case.slice_spacing,
                                      class_ranges=self.ctx.class_ranges, config=cfg.train.pcsw,
                                      points=self.teacher_points)
            if cfg.decoder_agreement:
                coarse.update({(c, s): coarse_channels(probs, s, self.ctx.labels) for s in slices})
        if not self.teacher_points:
            plans = {key: boxes_only_plan(plan) for key, plan in plans.items()}

        out = []
        with swapped_modules(self.adapter, {k: teacher[k] for k in self.adapter.modules()}):
            memory = self._memory_targets(by_case, keys) if self.sweeps is not None else {}
            for c, s in picks:
                case = self.ctx.unlabeled[c]
                plan = plans[(c, s)]
                emb = case.session.embedding(s)
                h, w = case.shape_hw
                logits = torch.full((1, len(self.ctx.labels), h, w), ABSENT_LOGIT, device=self.device)
                for label, m in memory.get((c, s), {}).items():
                    logits[0, self.ctx.labels.index(label)] = torch.from_numpy(m.logits).to(self.device)
                for label, p in plan.prompts.items() if self.sweeps is None else ():
                    decoded = self.adapter.decode(emb, (h, w), p.box, p.positive, p.negative)
                    logits[0, self.ctx.labels.index(label)] = decoded.logits.float()
                pseudo, trusted = self._targets(logits, plan.untrusted)
                if self.guard is not None and self.guard.dropped:
                    trusted = guarded_trust(trusted, pseudo, self.guard.dropped_channels(),
                                            self._anchor_channels(emb, (h, w)))
                decoder_trusted = agreeing(pseudo, trusted, coarse[(c, s)]) if cfg.decoder_agreement else trusted
                out.append(Targets(pseudo, trusted, plan, decoder_trusted, memory.get((c, s))))
        return out

    def _memory_targets(self, by_case: dict[int, list[int]], keys: dict[int, dict[int, Any]]
                        ) -> dict[tuple[int, int], dict[int, Any]]:
        """(case, slice) -> class -> :class:`.sam2_memory.MemoryTarget`: the teacher's memory
        propagation from each class's PCSW key slice (run with the teacher's modules in place)."""
        assert self.sweeps is not None
        found: dict[tuple[int, int], dict[int, Any]] = {(c, s): {} for c, slices in by_case.items() for s in slices}
        for c, slices in by_case.items():
            case = self.ctx.unlabeled[c]
            shape = (case.n_slices, *case.shape_hw)
            for label, prompt in keys[c].items():
                for s, target in self.sweeps.run(case.session.embedding, shape, label, prompt, slices).items():
                    found[(c, s)][label] = target
        return found

    def _targets(self, logits: torch.Tensor, untrusted: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`teacher_targets`, or with class-wise adaptive thresholds (fed this slice first)."""
        if self.thresholds is None:
            return teacher_targets(logits, untrusted, self.cfg.confidence)
        probs = object_probabilities(logits)
        keep = ~torch.as_tensor(np.asarray(untrusted, bool), device=probs.device)
        self.thresholds.update(probs, keep[None])
        pseudo, trusted = self.thresholds.trust(probs)
        return pseudo[0], trusted[0] & keep


def memory_sweeps(adapter: DecoderAdapter) -> Any:
    """The teacher's :class:`.sam2_memory.MemorySweeps` for ``SemiSupConfig.memory_path``.

    Raises:
        InputError: the backbone is not SAM-2 (it has no memory to train on).
    """
    from .adapters import Sam2Adapter

    if not isinstance(adapter, Sam2Adapter):
        from ..errors import InputError

        raise InputError(None, f"--memory-path needs a SAM-2 backbone; {adapter.backbone.name} has no memory",
                         "Drop --memory-path, or train a SAM-2.1 backbone.")
    return MemorySweeps(adapter.backbone)


def coarse_channels(probabilities: dict[int, np.ndarray], slice_index: int, labels: Sequence[int]) -> np.ndarray:
    """The coarse head's answer on one slice as ``(H, W)`` int64 channel indices (0 = background,
    ``c`` = ``labels[c - 1]``) from :func:`sss_lib.coarse_head.stack_probabilities`' class
    probabilities (background = what the classes leave)."""
    stack = np.stack([probabilities[label][slice_index] for label in labels])
    background = 1.0 - stack.sum(axis=0, keepdims=True)
    return np.concatenate([background, stack]).argmax(axis=0).astype(np.int64)


def agreeing(pseudo: torch.Tensor, trusted: torch.Tensor, coarse: np.ndarray) -> torch.Tensor:
    """The trusted pixels ``(H, W)`` where the coarse head's channel (:func:`coarse_channels`)
    equals the pseudo-label's (``SemiSupConfig.decoder_agreement``)."""
    return trusted & (pseudo == torch.from_numpy(np.asarray(coarse, np.int64)).to(pseudo.device))


def boxes_only_plan(plan: SlicePlan) -> SlicePlan:
    """``plan`` with every prompt reduced to its box (see ``SemiSupConfig.teacher_points``)."""
    prompts = {label: dataclasses.replace(p, positive=[], negative=[]) for label, p in plan.prompts.items()}
    return dataclasses.replace(plan, prompts=prompts)


def coarse_head_of(modules: nn.ModuleDict) -> nn.Module:
    """The coarse head as inference runs it: through the DFE (each view enhanced with itself)
    when the model has one (:class:`sss_lib.semisup.DfeCoarseHead`)."""
    if "dfe" not in modules:
        return modules["coarse_head"]
    from ..semisup import DfeCoarseHead

    return DfeCoarseHead(modules["coarse_head"], modules["dfe"])


def consistency_loss(logits: torch.Tensor, pseudo: torch.Tensor, trusted: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + Dice of one sample's logits ``(1, C, H, W)`` against its pseudo-label
    ``(1, H, W)`` on the trusted pixels ``(1, H, W)``.

    The cross-entropy is :func:`sss_lib.semisup.masked_cross_entropy` (summed over trusted pixels,
    divided by all pixels). **(ours)** The Dice term covers only the foreground classes that the
    trusted pseudo-label holds: the loss is computed per slice (so that data-parallel shares add
    up to the whole batch), and a per-slice Dice of a class the slice does not show would push
    that class's probability to zero on every trusted pixel, also next to a structure whose own
    pixels the teacher could not vouch for. Measured on an earlier, smaller form of the phantom
    benchmark (12-case pool, 3 labeled, 100 steps, 20 test cases, one seed): consistency without
    DFE 0.787 -> 0.841 mean test Dice, full SSS 0.823 -> 0.827, against 0.818 supervised only.
    """
    ce = masked_cross_entropy(logits, pseudo, trusted)
    keep = trusted.unsqueeze(1).float()
    prob = torch.softmax(torch.where(trusted.unsqueeze(1), logits.float(), torch.zeros((), device=logits.device)),
                         dim=1) * keep
    target = torch.nn.functional.one_hot(torch.where(trusted, pseudo, 0).long(), logits.shape[1]).permute(0, 3, 1, 2)
    target = target.float() * keep
    present = target.sum(dim=(0, 2, 3))[1:] > 0
    if not bool(present.any()):
        return ce
    inter = (prob * target).sum(dim=(0, 2, 3))[1:]
    denom = (prob.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3)))[1:]
    dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    return ce + dice[present].mean()


def training_autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; float32 elsewhere. **(ours)** Training stays in float32 on a CPU even
    where the engine uses bf16 (CPUs with native bf16): a run's numbers must not depend on which
    CPU it ran on, and LiteMedSAM's training step gains little from it (measured: ~10%)."""
    import contextlib

    # Casts cached by autocast belong to the weights as they were: a step starts without any, even
    # if an engine run (validation) left its cast cache held (device.autocast_cache_held).
    torch.clear_autocast_cache()
    if torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def teacher_targets(logits: torch.Tensor, untrusted: np.ndarray, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-label and trust of one slice from the teacher's per-class mask logits.

    Args:
        logits: ``(1, K, H, W)``, channel ``c - 1`` = the c-th class's mask logits
            (:data:`~sss_lib.backbones.base.ABSENT_LOGIT` where the class has no prompt).
        untrusted: ``(H, W)`` bool, pixels the prompts cannot vouch for (:class:`SlicePlan`).
        threshold: the confidence a trusted pixel needs.

    Returns:
        ``(pseudo, trusted)``: ``(H, W)`` long channel index (0 = background; the volume rule:
        highest logit wins, background where all are below 0) and ``(H, W)`` bool.
    """
    pseudo, trusted = confidence_mask(object_probabilities(logits), threshold)
    keep = ~torch.as_tensor(np.asarray(untrusted, bool), device=trusted.device)
    return pseudo[0], trusted[0] & keep


@dataclasses.dataclass
class MixedView:
    """A CutMix view: features per level ``(1, C_l, h_l, w_l)``, mixed targets ``(H, W)`` and the
    slice-grid box ``(H, W)`` (True where content comes from the partner)."""

    weak: list[torch.Tensor]
    strong: list[torch.Tensor]
    pseudo: torch.Tensor
    trusted: torch.Tensor
    box: torch.Tensor


def cutmix_features(weak: list[torch.Tensor], strong: list[torch.Tensor], pseudo: torch.Tensor, trusted: torch.Tensor,
                    weak_p: list[torch.Tensor], strong_p: list[torch.Tensor], pseudo_p: torch.Tensor,
                    trusted_p: torch.Tensor, draws: torch.Tensor, to_slice_grid: Any) -> MixedView:
    """Paste the partner's box into a slice: both views' features on every level (the box of
    :func:`feature_boxes`), and the pseudo-label and trust on the slice grid (the box mapped by
    ``to_slice_grid``: ``(1, 1, h_0, w_0)`` float -> ``(1, 1, H, W)``, the backbone's rule).
    Inside the box every target is the partner's, outside it stays the slice's own."""
    boxes = feature_boxes([f.shape[-2:] for f in strong], draws)
    mix = lambda own, other: [torch.where(b.to(f.device), fp, f) for b, f, fp in zip(boxes, own, other)]  # noqa: E731
    grid = to_slice_grid(boxes[0].float().to(strong[0].device))[0, 0] > 0.5
    grid = grid.to(pseudo.device)
    return MixedView(mix(weak, weak_p), mix(strong, strong_p), torch.where(grid, pseudo_p, pseudo),
                     torch.where(grid, trusted_p, trusted), grid)


def feature_boxes(shapes: Sequence[Sequence[int]], draws: torch.Tensor) -> list[torch.Tensor]:
    """One CutMix box as ``(1, 1, h_l, w_l)`` bool masks, one per feature level (finest first).

    The box is drawn on the coarsest grid from ``draws`` (4 uniforms: area, aspect, x, y) with
    :data:`CUTMIX_AREA` and :data:`CUTMIX_RATIO`, and scaled up to the finer grids, so it covers
    the same region of the slice at every level.
    """
    hc, wc = (int(v) for v in shapes[-1])
    area = CUTMIX_AREA[0] + (CUTMIX_AREA[1] - CUTMIX_AREA[0]) * float(draws[0])
    aspect = math.exp(math.log(CUTMIX_RATIO[0]) + (math.log(CUTMIX_RATIO[1]) - math.log(CUTMIX_RATIO[0])) * float(draws[1]))
    size = area * hc * wc
    bw = min(wc, max(1, int(math.sqrt(size / aspect))))
    bh = min(hc, max(1, int(math.sqrt(size * aspect))))
    x0 = int(float(draws[2]) * (wc - bw + 1))
    y0 = int(float(draws[3]) * (hc - bh + 1))
    out = []
    for h, w in shapes:
        fy, fx = int(h) // hc, int(w) // wc
        m = torch.zeros(1, 1, int(h), int(w), dtype=torch.bool)
        m[..., y0 * fy:(y0 + bh) * fy, x0 * fx:(x0 + bw) * fx] = True
        out.append(m)
    return out


class swapped_modules:
    """Run the backbone with other modules in place of its decoder components (the teacher's).

    ``modules``: component name (as :meth:`DecoderAdapter.modules`) -> module to put in its place.
    """

    def __init__(self, adapter: DecoderAdapter, modules: dict[str, nn.Module]) -> None:
        self.adapter = adapter
        self.modules = modules
        self._undo: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> "swapped_modules":
        own = self.adapter.modules()
        roots = [m for m in (getattr(self.adapter.backbone, "net", None), getattr(self.adapter.backbone, "model", None))
                 if isinstance(m, nn.Module)]
        found = []
        for comp, replacement in self.modules.items():
            target = own[comp]
            for root in roots:
                for parent in root.modules():
                    found += [(parent, name, target, replacement) for name, child in parent.named_children()
                              if child is target]
        for parent, name, target, replacement in found:  # after the walk: never edit what is walked
            self._undo.append((parent, name, target))
            setattr(parent, name, replacement)
        return self

    def __exit__(self, *exc: object) -> None:
        for parent, name, module in reversed(self._undo):
            setattr(parent, name, module)
        self._undo.clear()
