"""A training run a user can trust: run folder, checkpoints, resume, stop, progress (the training
contract), around the steps of :mod:`.semisup_step`.

1. Read the labeled cases (bad cases skipped with a warning or stopping the run, by
   ``on_bad_case``), check that their classes agree, hold some out for validation; read the
   unlabeled cases.
2. Embed every slice once (frozen image encoder), and K strong views of every unlabeled slice.
3. Steps: supervised warm-up, then supervised + lambda_u * unsupervised (:mod:`.semisup_step`);
   the warm-up ends where validation stops improving and the unsupervised phase starts from the
   best validated weights (:mod:`sss_lib.semisup.warmup`).
   Every ``checkpoint_every`` steps an atomic ``checkpoints/last.pt`` (model, optimiser, EMA,
   step, epoch, RNG, data order); every ``val_every`` steps the full Auto-segment pipeline on the
   validation cases (``best.pt`` and ``model.ssstask`` follow the best mean Dice).
4. A stop request (signal or stop file) ends the run after the current step, with a checkpoint.

Only rank 0 of a data-parallel run writes files and progress.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone
from ..class_source import choose_coarse_classes
from ..embedding_cache import EmbeddingStore
from ..errors import Cancelled, InputError
from ..pcsw import default_color, measure_class_ranges
from ..rings import measure_nesting
from ..runs.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from ..runs.layout import RunPaths
from ..runs.rng import capture_rng_state, restore_rng_state
from ..semisup.warmup import WarmupPlan
from ..task_model import BackboneRef, TaskClass, TaskModel, TaskPreprocessing, TrainingInfo, ValidationMetrics
from .adapters import adapter_for
from .data import LabeledCase, embed_cases, load_case, split_cases
from .distributed import DistContext
from .encoder_tuning import start_training, tuning_from_config, uninstall_tuned
from .labeled_aug import switch_notes, training_set
from .semisup_config import SemiSupConfig
from .semisup_step import SemiSupStepper, StepContext, coarse_head_of
from .unlabeled import UnlabeledCase, embed_strong_views, find_unlabeled, load_unlabeled

if TYPE_CHECKING:
    from ..datasets import Case
    from ..runs.progress import ProgressReporter
    from ..runs.stop import StopRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunOutcome:
    """How a run ended.

    Attributes:
        status: "done" (all steps) or "stopped" (on request; resumable).
        step: steps done.
        model_path: the task model written (None when stopped before any was written).
        best_step / best_dice: the validation that chose the model (None without validation).
        last: the last step's loss values.
        seconds: wall time; ``timings``: seconds per stage (``load``, ``embed``, ``train``, ``validate``).
        train_cases / val_cases / unlabeled_cases: case ids used.
        warmup_end: the last supervised-only step of a semi-supervised run (None: supervised
            only, or stopped before the warm-up ended); ``warmup_reason`` says why it ended there.
    """

    status: Literal["done", "stopped"]
    step: int
    model_path: Path | None
    best_step: int | None
    best_dice: float | None
    last: dict[str, float]
    seconds: float
    timings: dict[str, float]
    train_cases: list[str]
    val_cases: list[str]
    unlabeled_cases: list[str]
    warmup_end: int | None = None
    warmup_reason: str = ""


def run_training(config: SemiSupConfig, *, resume: bool = False, backbone: Backbone | None = None,
                 reporter: "ProgressReporter | None" = None, stop: "StopRequest | None" = None,
                 dist: DistContext | None = None, console: Callable[[str], None] | None = None,
                 store: EmbeddingStore | None = None, strong_cache: dict[Any, Any] | None = None) -> RunOutcome:
    """Train a task model in ``config.run_dir`` (see the module docstring).

    Args:
        config: the run's settings (on ``resume``, those the run was started with).
        resume: continue from ``checkpoints/last.pt`` exactly.
        backbone: a built backbone (tests); its decoder trains in place and gets its weights back
            at the end. None builds ``config.train.backbone``.
        reporter: progress (None: JSON lines on stdout and a console view on stderr on rank 0).
        stop: polled between steps (None: a :class:`~sss_lib.runs.StopRequest` on the run folder).
        dist: the data-parallel context (None: one process).
        console: receives human-readable lines (embedding progress, warnings); None: the log.
        store / strong_cache: embedding caches shared between runs on the same data (benchmarks
            and ablations; the image encoder is frozen, so embeddings never go stale). None: private.

    Raises:
        InputError: unusable data or settings. WeightsError / DeviceError: backbone or checkpoint.
    """
    from ..runs.progress import ProgressReporter
    from ..runs.stop import StopRequest

    dist = dist or DistContext()
    paths = RunPaths.of(config.run_dir)
    if resume and not paths.last_checkpoint.is_file():
        raise InputError(paths.last_checkpoint, "not found: there is nothing to resume",
                         "Start the run without --resume.")
    if not resume and paths.last_checkpoint.is_file():
        raise InputError(paths.root, "already holds a training run (checkpoints/last.pt)",
                         "Pass --resume to continue it, or choose another --run-dir.")
    if dist.is_main:
        paths.create()
        if not resume:
            config.to_run_config().save(paths.config)
    if reporter is None:
        reporter = ProgressReporter(config.total_steps, json_lines=dist.is_main, console_view=dist.is_main,
                                    history=paths.history if dist.is_main else None)
    stop = stop or StopRequest(paths.root, clear_stale=dist.is_main)
    say = console or (lambda text: log.info("%s", text))
    run = _Run(config, paths, dist, reporter, stop, say, store, strong_cache)
    return run.execute(resume, backbone)


class _Run:
    """The state of one run (one object so that setup, steps and saving share it)."""

    def __init__(self, config: SemiSupConfig, paths: RunPaths, dist: DistContext, reporter: "ProgressReporter",
                 stop: "StopRequest", say: Callable[[str], None], store: EmbeddingStore | None = None,
                 strong_cache: dict[Any, Any] | None = None) -> None:
        self.config = config
        self.paths = paths
        self.dist = dist
        self.reporter = reporter
        self.stop = stop
        self.say = say
        self.store = store
        self.strong_cache = strong_cache
        self.timings = {"load": 0.0, "embed": 0.0, "train": 0.0, "validate": 0.0}
        self.best_dice: float | None = None
        self.best_step: int | None = None
        self.best_coarse_dice: dict[int, float] = {}  # the coarse head's per-class Dice at best_step
        self.nesting: dict[int, tuple[int, ...]] = {}
        self.warmup: WarmupPlan | None = None

    # -- top level ---------------------------------------------------------------------------------
    def execute(self, resume: bool, backbone: Backbone | None) -> RunOutcome:
        t_start = time.perf_counter()
        cfg = self.config
        net = backbone if backbone is not None else _build_backbone(cfg)
        adapter = adapter_for(net)
        original = adapter.state_dicts()
        grad_flags = {id(p): p.requires_grad for m in adapter.modules().values() for p in m.parameters()}
        undo = adapter.prepare_for_task()
        try:
            return self._execute(resume, net, adapter, t_start)
        finally:
            undo()
            uninstall_tuned(net)
            adapter.load_state_dicts(original)
            for m in adapter.modules().values():
                for p in m.parameters():
                    p.requires_grad_(grad_flags[id(p)])
            adapter.train(False)

    def _execute(self, resume: bool, net: Backbone, adapter: Any, t_start: float) -> RunOutcome:
        from ..coarse_head import build_coarse_head

        cfg = self.config
        if cfg.train.encoder_blocks and cfg.semi_supervised:
            raise InputError(cfg.unlabeled, "--encoder-blocks trains with supervised runs only: the unlabeled "
                             "slices' cached views come from the frozen encoder",
                             "Leave out --unlabeled (or use --no-consistency), or --encoder-blocks.")
        t0 = time.perf_counter()
        prep = TaskPreprocessing(cfg.train.modality, tuple(cfg.train.window), tuple(cfg.train.percentiles),  # type: ignore[arg-type]
                                 cfg.train.slice_axis, int(net.image_size))
        dataset, labeled_cases = self._labeled_cases()
        train_ids, val_ids = split_cases(labeled_cases, cfg.train.val_cases, cfg.train.val_fraction)
        unlabeled_cases = self._unlabeled_case_list([c.image_path for c in labeled_cases])
        store = self.store
        if store is None:
            store = EmbeddingStore(max_volumes=len(labeled_cases) + len(unlabeled_cases) + 4)
        try:
            loaded = self._load_all(labeled_cases, lambda c: load_case(c, net, prep.to_preprocessing(),
                                                                       cfg.train.slice_axis, store, dataset.ignore_label))
        except Cancelled:
            self.reporter.stop(0, "stopped while reading the cases, before training started; nothing to save")
            return self._outcome("stopped", 0, None, {}, t_start, [], [], [])
        classes = self._classes(dataset.class_names, loaded)
        by_id = {c.case_id: c for c in loaded}
        train = [by_id[c.case_id] for c in train_ids if c.case_id in by_id]
        val = [by_id[c.case_id] for c in val_ids if c.case_id in by_id]
        if not train:
            raise InputError(cfg.train.labeled, "has no readable labeled case left for training",
                             "Fix the cases reported above, or add labeled cases.")
        unlabeled: list[UnlabeledCase] = []
        try:
            unlabeled = self._load_all(unlabeled_cases, lambda c: load_case_unlabeled(c, net, prep, cfg, store))
            if cfg.semi_supervised and not unlabeled:
                raise InputError(cfg.unlabeled, "has no readable unlabeled case", "Fix or remove the bad cases.")
            self.timings["load"] = time.perf_counter() - t0
            self.say(f"{len(train)} training, {len(val)} validation, {len(unlabeled)} unlabeled case(s); "
                     f"classes {classes}; backbone {net.name} on {adapter.device}")
            t0 = time.perf_counter()
            # With the encoder's blocks training, labeled slices are embedded through its prefix instead.
            self._embed([] if cfg.train.encoder_blocks else train + val, unlabeled, net)
        except Cancelled:
            self.reporter.stop(0, "stopped while reading or embedding, before training started; nothing to save")
            return self._outcome("stopped", 0, None, {}, t_start, train, val, unlabeled)
        self.timings["embed"] = time.perf_counter() - t0

        labels = list(classes)
        ranges = measure_class_ranges([c.label.voxels for c in train], [c.label.spacing for c in train], labels=labels)
        self.nesting = measure_nesting([c.labels for c in train], labels)
        task_classes = tuple(TaskClass(lbl, name, default_color(lbl)) for lbl, name in classes.items())
        feats = adapter.coarse_features(train[0].session.embedding(0))
        modules: dict[str, nn.Module] = {
            "coarse_head": build_coarse_head(feats, len(labels), width=cfg.train.head_width, seed=cfg.train.seed),
        }
        if cfg.semi_supervised and cfg.use_dfe:
            modules["dfe"] = _build_dfe([int(f.shape[1]) for f in feats], cfg.dfe_width, cfg.train.seed,
                                        cfg.dfe_zero_init_gain)
        # Switches: weak views of the labeled cases, the encoder's last blocks (labeled_aug, encoder_tuning).
        encoder = start_training(net, cfg.train)
        if encoder is not None:
            modules["image_encoder"] = encoder.tail
        t0 = time.perf_counter()
        samples = training_set(train, cfg.train, net, encoder)
        self.timings["embed"] += time.perf_counter() - t0
        modules.update(adapter.modules())
        student = nn.ModuleDict(modules).to(adapter.device)
        carry = cfg.train.carry_fraction
        if carry is None:
            carry = 0.5 if adapter.carries_boxes else 0.0
        points = cfg.train.carry_points if cfg.train.carry_points is not None else adapter.carries_points
        for name, value in (("--labeled-batch", cfg.train.head_batch), ("--decoder-batch", cfg.train.decoder_batch),
                            ("--unlabeled-batch", cfg.unlabeled_batch)):
            self.dist.check_divisible(name, value)
        odd_share = (cfg.unlabeled_batch // self.dist.world) % 2
        if cfg.semi_supervised and self.dist.distributed and cfg.cutmix_p > 0 and odd_share:
            self._warn(f"each process gets an odd share of --unlabeled-batch {cfg.unlabeled_batch}: CutMix partners "
                       f"that fall on another process are skipped, so the run differs from one process; use a "
                       f"multiple of {2 * self.dist.world}")
        ctx = StepContext(cfg, adapter, samples, unlabeled if cfg.semi_supervised else [], labels, ranges, carry, points,
                          self.dist)
        stepper = SemiSupStepper(ctx, student, self._warmup_plan(bool(val)))
        self.warmup = stepper.warmup
        if cfg.semi_supervised and cfg.class_guard:
            if self.dist.distributed:
                self._warn("--class-guard works in one process only (validation runs on rank 0): turned off")
            elif not val:
                self._warn("--class-guard needs validation cases: without them no class can be checked")

        from .loop import _Validator

        validator = _Validator(val, adapter, coarse_head_of(student), task_classes, prep, cfg.train, ranges, store,
                               self.nesting)
        names = {lbl: name for lbl, name in classes.items()}
        start = 0
        if resume:
            start = self._restore(stepper)
        self.reporter.start(start, self._epoch(stepper, start))

        last: dict[str, float] = {}
        step = start
        for step in range(start + 1, cfg.total_steps + 1):
            if self.dist.any(self.stop.requested, "cpu"):
                step -= 1
                self._save(stepper, step)
                why = self.stop.reason or "requested by another process"
                self.reporter.stop(step, f"stopped after step {step} ({why}); resume to continue")
                model = self._write_model(net, stepper, task_classes, prep, ranges, train, val, unlabeled, step)
                return self._outcome("stopped", step, model, last, t_start, train, val, unlabeled)
            t0 = time.perf_counter()
            row = stepper.step(step)
            self.timings["train"] += time.perf_counter() - t0
            row = self.dist.mean(row)
            last = row
            losses = {k: row[k] for k in ("total", "sup", "head", "decoder", "unsup") if k in row}
            self.reporter.step(step, losses, lr=row.get("lr"), mask_ratio=row.get("mask_ratio"),
                               epoch=self._epoch(stepper, step))
            validated = False
            plan = stepper.warmup
            # The guard takes its baselines at the warm-up's last step; an open warm-up ends by its latest.
            plan_check = (stepper.guard is not None and step == plan.end) or plan.must_validate(step)
            if val and (step % cfg.val_every == 0 or step == cfg.total_steps or plan_check):
                validated = True
                if self.dist.is_main:
                    improved = self._validate(validator, stepper, step, names)
                    if cfg.semi_supervised and plan.observe(step, improved):
                        self._end_warmup(stepper, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or validated:
                self._save(stepper, step)
        model = self._write_model(net, stepper, task_classes, prep, ranges, train, val, unlabeled, step)
        self.reporter.done(step, f"done: {step} steps" + (f"; task model {model}" if model else ""))
        return self._outcome("done", step, model, last, t_start, train, val, unlabeled)

    # -- data --------------------------------------------------------------------------------------
    def _labeled_cases(self) -> tuple[Any, list["Case"]]:
        from ..datasets import open_dataset

        t = self.config.train
        dataset = open_dataset(t.labeled, layout=t.layout, include_unlabeled=False)
        labeled = dataset.labeled[: t.max_cases] if t.max_cases else dataset.labeled
        if not labeled:
            raise InputError(t.labeled, "has no labeled cases",
                             "Training needs at least one case with a label map (labelsTr/, labels/ or _gt files).")
        return dataset, labeled

    def _unlabeled_case_list(self, labeled_images: list[Path]) -> list["Case"]:
        cfg = self.config
        if not cfg.semi_supervised:
            if cfg.unlabeled is not None and not cfg.consistency:
                self.say("--no-consistency: the unlabeled cases are not used (supervised only)")
            return []
        return find_unlabeled(cfg.unlabeled, exclude=labeled_images)  # type: ignore[arg-type]

    def _load_all(self, cases: list["Case"], load: Callable[["Case"], Any]) -> list[Any]:
        """Load each case; a bad one is skipped with a warning or stops the run (``on_bad_case``)."""
        out = []
        for case in cases:
            if self.stop.requested:
                raise Cancelled("stopped while reading cases")
            try:
                out.append(load(case))
            except (InputError, OSError, RuntimeError, ValueError) as err:
                if self.config.on_bad_case == "stop":
                    if isinstance(err, InputError):
                        raise
                    raise InputError(case.image_path, f"cannot be read ({type(err).__name__}: {err})",
                                     "Fix or remove the case, or pass --on-bad-case skip.") from err
                self._warn(f"skipping case {case.case_id}: {err}")
        return out

    def _classes(self, declared: dict[int, str], cases: list[LabeledCase]) -> dict[int, str]:
        """The class table; label values outside a declared table, or (undeclared) cases whose
        classes disagree, are bad input."""
        found = {c.case_id: sorted(int(v) for v in np.unique(c.labels) if v > 0) for c in cases}
        if declared:
            bad = {cid: [v for v in vals if v not in declared] for cid, vals in found.items()}
            bad = {cid: vals for cid, vals in bad.items() if vals}
            if bad:
                listing = "; ".join(f"{cid}: {vals}" for cid, vals in bad.items())
                raise InputError(self.config.train.labeled,
                                 f"label maps hold values the dataset does not declare ({listing}); declared: "
                                 f"{', '.join(f'{k} {v}' for k, v in sorted(declared.items()))}",
                                 "Fix those label maps, or declare the classes (dataset.json / classes.json).")
            return dict(sorted(declared.items()))
        sets = {tuple(v) for v in found.values()}
        if len(sets) > 1:
            listing = "; ".join(f"{cid}: {vals}" for cid, vals in found.items())
            raise InputError(self.config.train.labeled,
                             f"the labeled cases disagree about their classes ({listing})",
                             "Declare the class table in classes.json (a declared class may be absent from some "
                             "cases), or fix the label maps.")
        values = sorted({v for vals in found.values() for v in vals})
        if not values:
            raise InputError(self.config.train.labeled, "the label maps hold no foreground", "Label at least one structure.")
        return {v: f"class {v}" for v in values}

    def _embed(self, labeled: list[LabeledCase], unlabeled: list[UnlabeledCase], net: Backbone) -> None:
        cfg = self.config
        total = sum(c.n_slices for c in labeled) + sum(u.n_slices for u in unlabeled) * (1 + cfg.strong_views)
        done = [0]
        t0 = time.perf_counter()
        every = max(1, total // 10)

        def tick(what: str) -> None:
            done[0] += 1
            if done[0] % every == 0 or done[0] == total:
                rate = done[0] / max(1e-9, time.perf_counter() - t0)
                self.say(f"embedding: {done[0]}/{total} slices ({rate:.2f}/s) - {what}")

        cancel = lambda: self.stop.requested  # noqa: E731
        embed_cases(labeled, lambda d, t, m: tick(m), cancel)
        for u in unlabeled:
            for s in range(u.n_slices):
                if cancel():
                    raise Cancelled("stopped while embedding")
                u.session.embedding(s)
                tick(f"{u.case_id} slice {s + 1}")
        if unlabeled:
            strong = cfg.strong.build()
            seed = cfg.train.seed if cfg.strong_view_seed is None else cfg.strong_view_seed
            embed_strong_views(unlabeled, net, cfg.strong_views, strong, seed,
                               lambda d, t, m: tick(m), cancel, cache=self.strong_cache)

    # -- checkpoints, validation, model --------------------------------------------------------------
    def _epoch(self, stepper: SemiSupStepper, step: int) -> int:
        if stepper.teacher is not None and stepper.order.slices:
            return stepper.order.epoch
        return step * self.config.train.head_batch // max(1, len(stepper.slices))

    def _payload(self, stepper: SemiSupStepper, step: int) -> dict[str, Any]:
        return checkpoint_payload(
            model={k: v.detach().cpu().clone() for k, v in stepper.student.state_dict().items()},
            step=step, epoch=self._epoch(stepper, step), config=self.config.to_run_config().to_dict(),
            optimizer=stepper.optimizer.state_dict(),
            ema=stepper.teacher.state_dict() if stepper.teacher is not None else None,
            rng=capture_rng_state(stepper.generators), data=stepper.order.state_dict(),
            extra={"best_dice": self.best_dice, "best_step": self.best_step, "best_coarse_dice": self.best_coarse_dice,
                   "guard": stepper.guard_state(),
                   "warmup": stepper.warmup.state_dict(),
                   "thresholds": stepper.thresholds.state_dict() if stepper.thresholds is not None else None},
        )

    def _save(self, stepper: SemiSupStepper, step: int) -> None:
        if not self.dist.is_main:
            return
        path = save_checkpoint(self.paths.last_checkpoint, self._payload(stepper, step))
        self.reporter.checkpoint(step, path)

    def _restore(self, stepper: SemiSupStepper) -> int:
        state = load_checkpoint(self.paths.last_checkpoint, map_location=stepper.device)
        try:
            stepper.student.load_state_dict(state["model"])
            stepper.optimizer.load_state_dict(state["optimizer"])
            if stepper.teacher is not None:
                stepper.teacher.load_state_dict(state["ema"])
            restore_rng_state(state["rng"], stepper.generators)
            stepper.order.load_state_dict(state["data"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            from ..errors import WeightsError

            raise WeightsError(f"{self.paths.last_checkpoint}: the checkpoint does not fit this run ({err}). "
                               "Resume with the settings the run was started with, or start a new run.") from err
        extra = state.get("extra") or {}
        stepper.load_guard_state(extra.get("guard"))
        stepper.load_warmup_state(extra.get("warmup"))
        if stepper.thresholds is not None and extra.get("thresholds"):
            stepper.thresholds.load_state_dict(extra["thresholds"])
        self.best_dice = extra.get("best_dice")
        self.best_step = extra.get("best_step")
        self.best_coarse_dice = {int(k): float(v) for k, v in (extra.get("best_coarse_dice") or {}).items()}
        step = int(state["step"])
        self.say(f"resuming after step {step} of {self.config.total_steps}")
        return step

    def _warmup_plan(self, has_validation: bool) -> WarmupPlan:
        """The warm-up of this run (:mod:`sss_lib.semisup.warmup`): until the validation plateau
        where it can be seen, else fixed."""
        cfg = self.config
        plateau = cfg.semi_supervised and cfg.warmup_until_plateau
        if plateau and (self.dist.distributed or not has_validation):
            why = "several processes" if self.dist.distributed else "no validation cases"
            self.say(f"warm-up: a fixed {cfg.warmup} steps ({why}: the validation plateau cannot be watched)")
            plateau = False
        return WarmupPlan(cfg.warmup, cfg.max_warmup, cfg.val_every, until_plateau=plateau)

    def _end_warmup(self, stepper: SemiSupStepper, step: int) -> None:
        """The warm-up just ended at ``step``: restart from the best validated weights."""
        best = None
        if self.best_step is not None and self.best_step != step and self.paths.best_checkpoint.is_file():
            best = load_checkpoint(self.paths.best_checkpoint, map_location=stepper.device)["model"]
        stepper.end_warmup(best)
        restart = f"; consistency starts from the weights of step {self.best_step}" if best is not None else ""
        self.say(f"warm-up ended after step {step}: {stepper.warmup.reason}{restart}")

    def _validate(self, validator: Any, stepper: SemiSupStepper, step: int, names: dict[int, str]) -> bool:
        """Validate, keep the best checkpoint, feed the guard; True when this is the best so far."""
        from ..runs.curves import plot_curves

        t0 = time.perf_counter()
        record = validator.run(step, None)
        self.timings["validate"] += time.perf_counter() - t0
        dice = {names.get(k, str(k)): v for k, v in record.dice.items()}
        improved = self.best_dice is None or record.mean_dice > self.best_dice
        note = f"mean {record.mean_dice:.4f}" + (" (best so far)" if improved else "")
        if improved:
            self.best_dice, self.best_step, self.best_coarse_dice = record.mean_dice, step, dict(record.coarse_dice)
        guarded = self._guard(stepper, step, record.dice, names)
        self.reporter.val(step, dice, note + (f"; {guarded}" if guarded else ""))
        if improved:
            save_checkpoint(self.paths.best_checkpoint, self._payload(stepper, step))
        try:
            plot_curves(self.paths.history, self.paths.curves, title=f"{self.paths.root.name}")
        except Exception as err:  # a plot must never end a run
            self._warn(f"could not draw {self.paths.curves}: {err}")
        return improved

    def _guard(self, stepper: SemiSupStepper, step: int, dice: dict[int, float], names: dict[int, str]) -> str:
        """Feed the guard one validation; when it drops a class, reset the teacher to the best
        validated weights (:mod:`sss_lib.semisup.guard`). Returns what it did ("" if nothing)."""
        if stepper.guard is None:
            return ""
        decision = stepper.guard.observe(step, dice)
        if not decision.dropped:
            return ""
        text = decision.describe(names)
        if stepper.teacher is not None and self.best_step is not None and self.best_step != step \
                and self.paths.best_checkpoint.is_file():
            best = load_checkpoint(self.paths.best_checkpoint, map_location=stepper.device)
            stepper.teacher.module.load_state_dict(best["model"])
            text += f"; teacher reset to step {self.best_step}"
        self._warn(text)
        return text

    def _write_model(self, net: Backbone, stepper: SemiSupStepper, classes: tuple[TaskClass, ...],
                     prep: TaskPreprocessing, ranges: dict[int, tuple[float, float]], train: list[LabeledCase],
                     val: list[LabeledCase], unlabeled: list[UnlabeledCase], step: int) -> Path | None:
        """The task model from the best validated weights (the current ones without validation)."""
        from ..runs.curves import plot_curves
        from ..task_model import save_task_model

        if not self.dist.is_main or step == 0:
            return None
        cfg = self.config
        state = {k: v.detach().cpu() for k, v in stepper.student.state_dict().items()}
        kept = step
        validation = None
        coarse_classes: tuple[int, ...] = ()
        if self.best_step is not None and self.paths.best_checkpoint.is_file():
            state = load_checkpoint(self.paths.best_checkpoint)["model"]
            kept = self.best_step
            rows = [r for r in _read_val(self.paths.history) if r.step == kept]
            if rows:
                by_name = {c.name: c.label for c in classes}
                validation = ValidationMetrics(len(val), {by_name[k]: float(v) for k, v in rows[-1].val_dice.items()
                                                          if k in by_name and v is not None},
                                               coarse_dice=dict(self.best_coarse_dice))
                coarse_classes = choose_coarse_classes(validation.dice, validation.coarse_dice)
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            comp, _, name = key.partition(".")
            weights.setdefault(comp, {})[name] = value
        mode = ("semi-supervised" if cfg.semi_supervised else "supervised") + \
               ("" if not cfg.semi_supervised else f" (DFE {'on' if cfg.use_dfe else 'off'}, "
                                                   f"PCSW {'on' if cfg.use_pcsw else 'off'})")
        notes = (f"{mode}; kept step {kept} of {step}; train cases: {', '.join(c.case_id for c in train)}; "
                 f"validation cases: {', '.join(c.case_id for c in val) or 'none'}; "
                 f"unlabeled cases: {len(unlabeled)}; {switch_notes(cfg.train)}")
        model = TaskModel(
            backbone=BackboneRef(net.name, net.weights_sha256), classes=classes, preprocessing=prep, pcsw=cfg.train.pcsw,
            volume_ranges_mm3=ranges,
            training=TrainingInfo.now(cfg.train.data_name or Path(cfg.train.labeled).name, n_labeled=len(train),
                                      n_unlabeled=len(unlabeled), iterations=step, seed=cfg.train.seed, notes=notes),
            validation=validation, weights=weights, nesting=self.nesting,  # type: ignore[arg-type]
            encoder_tuning=tuning_from_config(cfg.train), coarse_classes=coarse_classes,
        )
        path = save_task_model(model, self.paths.root / "model.ssstask")
        if cfg.copy_to is not None:
            _copy_atomic(path, cfg.copy_to)
        try:
            plot_curves(self.paths.history, self.paths.curves, title=f"{self.paths.root.name}")
        except Exception as err:  # a plot must never end a run
            self._warn(f"could not draw {self.paths.curves}: {err}")
        return path

    def _warn(self, text: str) -> None:
        log.warning("%s", text)

    def _outcome(self, status: Literal["done", "stopped"], step: int, model: Path | None, last: dict[str, float],
                 t_start: float, train: list, val: list, unlabeled: list) -> RunOutcome:
        plan = self.warmup if self.config.semi_supervised and self.warmup is not None else None
        ended = plan is not None and plan.end is not None and plan.end <= step
        return RunOutcome(status, step, model, self.best_step, self.best_dice, last, time.perf_counter() - t_start,
                          dict(self.timings), [c.case_id for c in train], [c.case_id for c in val],
                          [u.case_id for u in unlabeled], plan.end if ended else None,
                          plan.reason if ended else "")


def load_case_unlabeled(case: "Case", net: Backbone, prep: TaskPreprocessing, cfg: SemiSupConfig,
                        store: EmbeddingStore) -> UnlabeledCase:
    return load_unlabeled(case, net, prep.to_preprocessing(), cfg.train.slice_axis, store)


def _build_backbone(cfg: SemiSupConfig) -> Backbone:
    from ..backbones.registry import SAM2_NAMES, build_backbone

    t = cfg.train
    if cfg.random_init:
        if t.backbone not in SAM2_NAMES:
            raise InputError(None, f"--random-init needs a SAM-2.1 backbone, not {t.backbone!r}",
                             "Pass e.g. --backbone sam2.1_hiera_tiny.")
        from ..backbones.sam2_backbone import build_sam2_backbone

        return build_sam2_backbone(t.backbone, image_size=t.image_size, random_init=True, device=t.device)
    return build_backbone(t.backbone, device=t.device, image_size=t.image_size, checkpoint=t.checkpoint)


def _build_dfe(channels: list[int], width: int | None, seed: int, zero_init_gain: bool = False) -> nn.Module:
    from ..semisup import DFE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 17)
        return DFE(channels, width, zero_init_gain=zero_init_gain)


def _read_val(history: Path) -> list[Any]:
    from ..runs.history import read_history

    return [r for r in read_history(history) if r.event == "val"]


def _copy_atomic(src: Path, dst: Path) -> None:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)

