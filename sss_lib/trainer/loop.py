"""Supervised fine-tuning of a task model (the supervised part of SSS_METHOD.md section 4).

1. Read the labeled cases (:func:`sss_lib.datasets.open_dataset`), hold some out for validation.
2. Embed every slice once with the frozen image encoder (the engine's store); every step after
   that runs on cached embeddings, which is what makes training on a CPU feasible.
3. Each step: the coarse head on ``head_batch`` random slices (cross-entropy + Dice against the
   labels), and the backbone's prompt encoder + mask decoder on ``decoder_batch`` prompts drawn
   from the labels (:mod:`.samples`: PCSW-like key prompts and, for 2D backbones, carried boxes;
   BCE + Dice, plus the IoU and object heads). AdamW with poly decay; bf16 autocast on CUDA.
4. Every ``val_every`` steps: the full Auto-segment pipeline (coarse head -> PCSW -> engine) on
   the held-out cases, per-class Dice; the best weights are kept.
5. Write the task model: classes, preprocessing, PCSW settings and the physical volume ranges
   measured on the training cases, training record, validation Dice of the kept weights.

Reproducible for a given seed on a CPU: the head's initialisation and every random draw come from it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..backbones.base import Backbone
from ..class_source import choose_coarse_classes
from ..embedding_cache import EmbeddingStore
from ..errors import Cancelled, InputError
from ..metrics import dice as dice_score
from ..pcsw import default_color, measure_class_ranges
from ..rings import measure_nesting
from ..task_model import (
    BackboneRef,
    TaskClass,
    TaskModel,
    TaskPreprocessing,
    TrainingInfo,
    ValidationMetrics,
    save_task_model,
)
from .adapters import DecoderAdapter, adapter_for
from .config import TrainConfig, TrainEvent, TrainResult, ValidationRecord
from .data import LabeledCase, class_labels, embed_cases, load_case, split_cases
from .encoder_tuning import start_training, uninstall_tuned
from .labeled_aug import switch_notes, training_set
from .losses import coarse_loss, mask_loss
from .samples import ClassIndex, draw_samples

if TYPE_CHECKING:
    from ..datasets import CaseList

log = logging.getLogger(__name__)

ProgressCallback = Callable[[TrainEvent], None]


def train_task_model(
    config: TrainConfig,
    *,
    backbone: Backbone | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a task model on the labeled cases of ``config.labeled`` and write it to ``config.out``.

    Args:
        config: the run's settings.
        backbone: a built backbone to fine-tune (tests, or a caller that already holds one). Its
            prompt encoder and mask decoder train in place and get their original weights back
            when the run ends; the trained weights are in the task model. None builds
            ``config.backbone``.
        progress: receives :class:`TrainEvent` s.
        should_cancel: checked between steps; True raises :class:`Cancelled` (nothing is written).

    Raises:
        InputError: the dataset is unusable. WeightsError / DeviceError: the backbone cannot be built.
        Cancelled: cancelled by the caller.
    """
    from ..datasets import open_dataset

    t_start = time.perf_counter()
    dataset = open_dataset(config.labeled, layout=config.layout, include_unlabeled=False)
    labeled = dataset.labeled[: config.max_cases] if config.max_cases else dataset.labeled
    if not labeled:
        raise InputError(config.labeled, "has no labeled cases", "Training needs at least one labeled case.")
    train_ids, val_ids = split_cases(labeled, config.val_cases, config.val_fraction)

    net = backbone if backbone is not None else _build_backbone(config)
    adapter = adapter_for(net)
    # The decoder trains in place; a caller's backbone gets its own weights back at the end.
    original = adapter.state_dicts()
    grad_flags = {id(p): p.requires_grad for m in adapter.modules().values() for p in m.parameters()}
    undo = adapter.prepare_for_task()  # validation must run the way the task model will
    try:
        return _train(config, net, adapter, dataset, labeled, train_ids, val_ids, progress, should_cancel, t_start)
    finally:
        undo()
        uninstall_tuned(net)
        adapter.load_state_dicts(original)
        for m in adapter.modules().values():
            for p in m.parameters():
                p.requires_grad_(grad_flags[id(p)])
        adapter.train(False)


def _train(config: TrainConfig, net: Backbone, adapter: DecoderAdapter, dataset: "CaseList", labeled: list,
           train_ids: list, val_ids: list, progress: ProgressCallback | None,
           should_cancel: Callable[[], bool] | None, t_start: float) -> TrainResult:
    from ..coarse_head import build_coarse_head

    device = adapter.device
    prep = TaskPreprocessing(config.modality, tuple(config.window), tuple(config.percentiles),  # type: ignore[arg-type]
                             config.slice_axis, int(net.image_size))
    store = EmbeddingStore(max_volumes=len(labeled) + 2)
    cases = [load_case(c, net, prep.to_preprocessing(), config.slice_axis, store, dataset.ignore_label)
             for c in labeled]
    by_id = {c.case_id: c for c in cases}
    train = [by_id[c.case_id] for c in train_ids]
    val = [by_id[c.case_id] for c in val_ids]
    classes = class_labels(dataset.class_names, cases)
    labels = list(classes)
    log.info("training on %d case(s), validating on %d; classes %s; backbone %s on %s",
             len(train), len(val), classes, net.name, device)

    t0 = time.perf_counter()
    # With the encoder's blocks training, training slices are embedded through its prefix instead.
    embed_cases([] if config.encoder_blocks else cases, _embed_progress(progress), should_cancel)
    t_embed = time.perf_counter() - t0

    ranges = measure_class_ranges([c.label.voxels for c in train], [c.label.spacing for c in train], labels=labels)
    nesting = measure_nesting([c.labels for c in train], labels)
    task_classes = tuple(TaskClass(lbl, name, default_color(lbl)) for lbl, name in classes.items())
    first = train[0]
    head = build_coarse_head(adapter.coarse_features(first.session.embedding(0)), len(labels),
                             width=config.head_width, seed=config.seed).to(device)

    carry = config.carry_fraction if config.carry_fraction is not None else (0.5 if adapter.carries_boxes else 0.0)
    points = config.carry_points if config.carry_points is not None else adapter.carries_points
    # Switches: weak views of the labeled cases, the encoder's last blocks (both off by default).
    encoder = start_training(net, config)
    t0 = time.perf_counter()
    samples = training_set(train, config, net, encoder, _embed_progress(progress), should_cancel)
    t_embed += time.perf_counter() - t0
    trainer = _Trainer(config, adapter, head, samples, labels, carry, points)
    if encoder is not None:
        trainer.encoder_tail = encoder.tail
        trainer.optimizer.add_param_group({"params": encoder.parameters(), "lr": config.lr_encoder})
        trainer.base_lrs.append(config.lr_encoder)
    validator = _Validator(val, adapter, head, task_classes, prep, config, ranges, store, nesting)

    val_every = config.val_every or max(1, config.iterations // 4)
    losses: list[dict[str, float]] = []
    validations: list[ValidationRecord] = []
    best: tuple[float, int, dict] | None = None
    t_train = t_val = 0.0
    for step in range(1, config.iterations + 1):
        if should_cancel is not None and should_cancel():
            raise Cancelled("training cancelled; nothing was written")
        t0 = time.perf_counter()
        row = trainer.step(step)
        t_train += time.perf_counter() - t0
        losses.append(row)
        if progress is not None:
            progress(TrainEvent("train", step, config.iterations,
                                f"step {step}/{config.iterations}: loss {row['total']:.4f}", loss=row["total"]))
        if val and (step % val_every == 0 or step == config.iterations):
            t0 = time.perf_counter()
            record = validator.run(step, progress)
            t_val += time.perf_counter() - t0
            validations.append(record)
            log.info("step %d: validation mean Dice %.4f %s", step, record.mean_dice,
                     {k: round(v, 4) for k, v in record.dice.items()})
            if best is None or record.mean_dice > best[0]:
                best = (record.mean_dice, step, trainer.snapshot())

    if best is not None:
        best_dice, best_step, state = best
        trainer.restore(state)
        kept = next(v for v in validations if v.iteration == best_step)
        validation = ValidationMetrics(len(val), dict(kept.dice), coarse_dice=dict(kept.coarse_dice))
        coarse_classes = choose_coarse_classes(kept.dice, kept.coarse_dice)
    else:
        best_step, validation, coarse_classes = config.iterations, None, ()
        log.warning("no validation cases: keeping the weights of the last step")

    weights = {"coarse_head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
               **adapter.state_dicts()}
    if encoder is not None:
        weights["image_encoder"] = {k: v.detach().cpu() for k, v in encoder.tail.state_dict().items()}
    notes = (f"supervised; backbone decoder {'fine-tuned' if config.train_decoder else 'as shipped'}; "
             f"kept step {best_step}; train cases: {', '.join(c.case_id for c in train)}; "
             f"validation cases: {', '.join(c.case_id for c in val) or 'none'}; {switch_notes(config)}")
    model = TaskModel(
        backbone=BackboneRef(net.name, net.weights_sha256),
        classes=task_classes,
        preprocessing=prep,
        pcsw=config.pcsw,
        volume_ranges_mm3=ranges,
        training=TrainingInfo.now(config.data_name or Path(config.labeled).name, n_labeled=len(train),
                                  n_unlabeled=0, iterations=config.iterations, seed=config.seed, notes=notes),
        validation=validation,
        weights=weights,  # type: ignore[arg-type]
        nesting=nesting,
        encoder_tuning=encoder.tuning if encoder is not None else None,
        coarse_classes=coarse_classes,
    )
    path = save_task_model(model, config.out)
    seconds = time.perf_counter() - t_start
    return TrainResult(path, model, losses, validations, best_step, [c.case_id for c in train],
                       [c.case_id for c in val], seconds,
                       {"embed": t_embed, "train": t_train, "validate": t_val}, str(device))


def _build_backbone(config: TrainConfig) -> Backbone:
    from ..backbones.registry import build_backbone

    return build_backbone(config.backbone, device=config.device, image_size=config.image_size,
                          checkpoint=config.checkpoint)


def _embed_progress(progress: ProgressCallback | None) -> Callable[[int, int, str], None] | None:
    if progress is None:
        return None
    return lambda done, total, message: progress(TrainEvent("embed", done, total, message))


class _Trainer:
    """One optimiser over the coarse head and the adapter's trainable decoder parts."""

    def __init__(self, config: TrainConfig, adapter: DecoderAdapter, head: torch.nn.Module,
                 cases: Sequence[LabeledCase], labels: Sequence[int], carry_fraction: float,
                 carry_points: bool) -> None:
        self.config = config
        self.carry_points = carry_points
        self.adapter = adapter
        self.head = head
        self.cases = list(cases)
        self.carry_fraction = carry_fraction
        self.rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 0x7EA1]))
        # Label value -> head channel (0 = background); values outside the class table are background.
        top = max(max(labels), max(int(c.labels.max(initial=0)) for c in cases))
        self.lut = np.zeros(top + 2, np.int64)
        for channel, lbl in enumerate(labels, start=1):
            self.lut[lbl] = channel
        self.lut[-1] = -1  # IGNORE (-1) indexes the last entry
        self.slices = [(c, s) for c, case in enumerate(self.cases) for s in range(case.n_slices)]
        self.stacks = [c.labels for c in self.cases]
        self.index = ClassIndex.build(self.stacks, labels)
        #: the image encoder's trained tail (:mod:`.encoder_tuning`), or None
        self.encoder_tail: torch.nn.Module | None = None

        for module in adapter.modules().values():
            module.requires_grad_(False)
        decoder_params = adapter.trainable_parameters() if config.train_decoder else []
        for p in decoder_params:
            p.requires_grad_(True)
        groups = [{"params": list(head.parameters()), "lr": config.lr_head}]
        if decoder_params:
            groups.append({"params": decoder_params, "lr": config.lr_decoder})
        self.base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def step(self, step: int) -> dict[str, float]:
        from ..device import autocast_context

        factor = (1.0 - (step - 1) / self.config.iterations) ** 0.9
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor
        self.head.train()
        self.adapter.train(self.config.train_decoder)
        self.optimizer.zero_grad(set_to_none=True)
        torch.clear_autocast_cache()  # no casts of earlier weights (see semisup_step.training_autocast)
        with autocast_context(self.adapter.device):
            head_loss = self._head_loss()
            decoder_loss, iou = self._decoder_loss() if self.config.train_decoder else (None, float("nan"))
        total = head_loss if decoder_loss is None else head_loss + decoder_loss
        total.backward()
        self.optimizer.step()
        return {"total": total.item(), "head": head_loss.item(),
                "decoder": decoder_loss.item() if decoder_loss is not None else float("nan"), "iou": iou}

    def _head_loss(self) -> torch.Tensor:
        picks = self.rng.choice(len(self.slices), size=min(self.config.head_batch, len(self.slices)), replace=False)
        embs, targets, shapes = [], [], []
        for i in picks:
            c, s = self.slices[int(i)]
            case = self.cases[c]
            embs.append((case, case.session.embedding(s)))
            targets.append(self.lut[case.labels[s].astype(np.int64)])
            shapes.append(case.labels.shape[1:])
        levels = zip(*(self.adapter.coarse_features(e) for _, e in embs))
        logits = self.head([torch.cat(level) for level in levels]).float()
        loss = logits.new_zeros(())
        for n, ((case, emb), target, shape) in enumerate(zip(embs, targets, shapes)):
            grid = self.adapter.to_slice_grid(logits[n:n + 1], emb, tuple(shape))
            t = torch.from_numpy(target).to(grid.device)[None]
            loss = loss + coarse_loss(grid, t)
        return loss / len(embs)

    def _decoder_loss(self) -> tuple[torch.Tensor, float]:
        samples = draw_samples(self.stacks, self.index, self.config.decoder_batch, self.rng, self.config.jitter,
                               carry_fraction=self.carry_fraction, carry_points=self.carry_points,
                               ended_fraction=self.config.ended_fraction,
                               spacings_xy=[c.spacing_xy for c in self.cases])
        total = None
        ious = []
        for sample in samples:
            case = self.cases[sample.case_index]
            out = self.adapter.decode(case.session.embedding(sample.slice_index), case.labels.shape[1:],
                                      sample.box, sample.positive, sample.negative)
            target = torch.from_numpy(sample.target).to(out.logits.device)
            loss, iou = mask_loss(out.logits.float(), target, out.iou.float(),
                                  out.object_score.float() if out.object_score is not None else None)
            ious.append(iou)
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(samples), float(np.mean(ious))

    def snapshot(self) -> dict:
        state = {"coarse_head": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
                 **self.adapter.state_dicts()}
        if self.encoder_tail is not None:
            state["image_encoder"] = {k: v.detach().clone() for k, v in self.encoder_tail.state_dict().items()}
        return state

    def restore(self, state: dict) -> None:
        self.head.load_state_dict(state["coarse_head"])
        if self.encoder_tail is not None:
            self.encoder_tail.load_state_dict(state["image_encoder"])
        self.adapter.load_state_dicts({k: v for k, v in state.items() if k not in ("coarse_head", "image_encoder")})


class _Validator:
    """The full Auto-segment pipeline on held-out cases, with the weights being trained, every
    class from the decoder; and the coarse head's own argmax on the same cases (per-class Dice of
    both: what :func:`sss_lib.class_source.choose_coarse_classes` chooses from)."""

    def __init__(self, cases: Sequence[LabeledCase], adapter: DecoderAdapter, head: torch.nn.Module,
                 classes: tuple[TaskClass, ...], prep: TaskPreprocessing, config: TrainConfig,
                 ranges: dict[int, tuple[float, float]], store: EmbeddingStore,
                 nesting: dict[int, tuple[int, ...]] | None = None) -> None:
        self.cases = list(cases)
        self.nesting = dict(nesting or {})
        self.adapter = adapter
        self.head = head
        self.classes = classes
        self.prep = prep
        self.config = config
        self.ranges = ranges
        self.store = store

    def run(self, step: int, progress: ProgressCallback | None) -> ValidationRecord:
        from ..auto_segment import AutoSegmentSession, TaskRuntime

        t0 = time.perf_counter()
        was_training = self.head.training
        self.head.eval()
        self.adapter.train(False)
        runtime = TaskRuntime(self.adapter.backbone, self.adapter, self.head, self.classes,  # type: ignore[arg-type]
                              self.prep, self.config.pcsw, self.ranges, nesting=self.nesting)
        scores: dict[int, list[float]] = {c.label: [] for c in self.classes}
        coarse_scores: dict[int, list[float]] = {c.label: [] for c in self.classes}
        try:
            for n, case in enumerate(self.cases, start=1):
                session = AutoSegmentSession(case.image, runtime, store=self.store)
                result = session.run()
                gt = case.label.voxels
                for pred, into in ((result.labels.voxels, scores), (session.coarse_labels().voxels, coarse_scores)):
                    for lbl in into:
                        if (gt == lbl).any() or (pred == lbl).any():
                            into[lbl].append(dice_score(pred == lbl, gt == lbl))
                if progress is not None:
                    progress(TrainEvent("validate", n, len(self.cases), f"validated {case.case_id}"))
        finally:
            self.head.train(was_training)
        dice = {lbl: float(np.mean(v)) for lbl, v in scores.items() if v}
        mean = float(np.mean(list(dice.values()))) if dice else 0.0
        coarse = {lbl: float(np.mean(v)) for lbl, v in coarse_scores.items() if v}
        return ValidationRecord(step, dice, mean, time.perf_counter() - t0, coarse)
