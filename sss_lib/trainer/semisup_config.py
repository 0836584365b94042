"""What a training run (supervised or semi-supervised) is asked to do (no torch here).

:class:`SemiSupConfig` wraps the supervised trainer's :class:`~sss_lib.trainer.config.TrainConfig`
(data, model, optimisation) and adds the semi-supervised settings of SSS_METHOD.md section 4 and
the run-folder settings of the training contract. It round-trips through plain JSON
(:meth:`SemiSupConfig.to_dict` / :meth:`SemiSupConfig.from_dict`), stored as the ``extra`` of the
run's :class:`sss_lib.runs.RunConfig`, so ``--resume`` rebuilds exactly the run that was started.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from ..pcsw.config import PcswConfig
from .config import TrainConfig
from .samples import PromptJitter

if typing.TYPE_CHECKING:
    from ..runs.config import RunConfig

SCHEMA = "sss.semisup-config/4"
#: Schema 1 (before decoder agreement, DFE's gain from 0 and its tenth learning rate became the
#: defaults): what its missing or None settings meant, so that ``--resume`` continues such a run as
#: it was started.
_SCHEMA_1 = "sss.semisup-config/1"
#: Schema 2: before the class guard existed (such runs continue without it).
_SCHEMA_2 = "sss.semisup-config/2"
#: Schema 3: before the warm-up could end at the validation plateau (such runs keep a fixed one).
_SCHEMA_3 = "sss.semisup-config/3"


@dataclasses.dataclass(frozen=True)
class StrongViewSettings:
    """The strong (intensity) augmentation, :class:`sss_lib.semisup.StrongAugment`'s fields.

    A torch-free copy so that a run's config can be read and checked without torch (the CLI and the
    Slicer module do); tests/test_semisup_train.py keeps its fields and defaults equal to
    StrongAugment's.
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: tuple[float, float] = (0.7, 1.5)
    grey_p: float = 0.2
    posterize_bits: tuple[int, int] = (3, 6)
    solarize_threshold: tuple[float, float] = (0.6, 0.95)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def build(self) -> Any:
        """The :class:`sss_lib.semisup.StrongAugment` with these settings (imports torch)."""
        from ..semisup import StrongAugment

        return StrongAugment(**dataclasses.asdict(self))


@dataclasses.dataclass
class SemiSupConfig:
    """Settings of one training run (see the module docstring).

    Run:
        train: the supervised settings; ``train.iterations`` is the run's total steps,
            ``train.head_batch`` the labeled slices per step, ``train.out`` the task model
            written in the run folder.
        run_dir: the run folder (:class:`sss_lib.runs.RunPaths`).
        copy_to: also copy the final task model there (``--out``); None: only the run folder.
        checkpoint_every: steps between checkpoints (``checkpoints/last.pt``).
        on_bad_case: an unreadable or inconsistent case is skipped with a warning, or stops the run.
        random_init: build an untrained SAM-2 backbone (tests and GPU checks only).

    Semi-supervised (each defaults to SSS_METHOD.md section 4):
        unlabeled: folder of unlabeled volumes (or an nnU-Net folder, whose imagesTs are used);
            None: supervised only.
        consistency: False trains supervised only (the ``--no-consistency`` ablation).
        use_dfe: False feeds the strong views' features to the student as they are (``--no-dfe``).
        use_pcsw: False prompts the teacher with each slice's coarse box only (``--no-pcsw``).
        warmup_iterations: supervised-only steps first (None: 20% of the run); with
            ``warmup_until_plateau``, the fewest.
        warmup_until_plateau: **(ours)** the warm-up goes on while validation improves, up to
            ``max_warmup_fraction`` of the run, and the unsupervised phase starts from the best
            validated weights (:mod:`sss_lib.semisup.warmup`, which gives the measurement behind it).
            Needs validation cases and one process; without them the warm-up is fixed.
        max_warmup_fraction: the longest warm-up with ``warmup_until_plateau``, as a share of the run.
        rampup_iterations: after the warm-up, lambda_u ramps up (sigmoid) over this many steps
            (None: 20% of the run).
        lambda_u: weight of the unsupervised loss once ramped up.
        confidence: a pseudo-label pixel is trusted when the teacher's probability is >= this.
        untrusted_floor: **(ours)** a pixel is not trusted where the teacher's coarse head gives
            a class at least this probability but the class has no prompt there
            (:mod:`sss_lib.trainer.slice_prompts`); None: ``1 - confidence``.
        ema_decay: the EMA teacher's decay.
        unlabeled_batch: unlabeled slices per step (global, over all processes).
        strong_views: **(ours)** strong views cached per unlabeled slice (K >= 1). The image
            encoder is frozen, so each strong view is drawn once (seeded) and embedded once; every
            step picks two of the K. See :mod:`sss_lib.trainer.unlabeled`.
        strong_view_seed: seed of the strong views (None: ``train.seed``). Runs that differ only
            in their training seed can share one set of cached strong views this way.
        cutmix_p: probability of CutMix on the second strong view.
        teacher_points: **(ours)** the teacher's prompts (and so the student's decoder
            consistency) carry PCSW's points; None: where the backbone's shipped decoder was trained
            with points (SAM-2), not for LiteMedSAM, whose decoder was trained on boxes alone. Measured
            with a LiteMedSAM model trained on 3 labeled phantoms (9 unlabeled cases, confidence 0.95):
            the share of each structure's pixels that the pseudo-label covers at >= 99.3% precision is
            RV 0.63 / Myo 0.25 / LV 0.39 with points and 0.84 / 0.37 / 0.80 with boxes alone.
        decoder_agreement: **(ours)** the mask decoder's consistency uses only the trusted pixels where
            the teacher's coarse head (its argmax on the weak view) agrees with the pseudo-label. Two
            predictors trained on the same labels that agree are rarely both wrong; where the decoder
            alone is confident, its own pseudo-label would teach it its own mistakes. The coarse
            head's consistency keeps every trusted pixel, so the decoder still teaches the head where
            they disagree. Measured on the phantom benchmark (3 labeled, seeds 0 and 1, mean test
            Dice): full SSS 0.848 -> 0.883, consistency without DFE 0.917 -> 0.917; the cause it
            addresses: without it full SSS's decoder (seed 0) segments the Myo from ground-truth
            boxes at 0.72 Dice against 0.86 supervised-only, leaking into the LV cavity.
        dfe_width: DFE's common width D (None: the widest feature scale, as in the paper).
        dfe_zero_init_gain: **(ours)** scale DFE's enhancement by a learned gain that starts at 0,
            so that the head starts on the backbone's own features (see :class:`sss_lib.semisup.DFE`);
            False: the formula of SSS_METHOD.md section 3 as it stands.
        lr_dfe: DFE's learning rate (None: a tenth of ``train.lr_head``, :attr:`dfe_lr`).
            **(ours)** Measured on the phantom benchmark (3 labeled, training seeds 0 and 1, decoder
            agreement on; mean test Dice): the DFE as specified, learning at the head's rate, 0.883
            (coarse-head Myo 0.81 against 0.86 without DFE); at a tenth of it 0.901; with the gain from 0
            as well 0.917, where consistency without DFE scores 0.917. A randomly initialised
            enhancement added to a frozen foundation model's features, learning as fast as the head
            from a few labeled cases, costs the thin structures more than it gives.
        unsup_head_weight / unsup_decoder_weight: weights of the coarse head's and the mask
            decoder's consistency terms inside the unsupervised loss.
        unsup_decoder_classes: at most this many prompted classes per unlabeled slice enter the
            decoder's consistency each step (drawn at random; None: all). Each is one decode
            with gradients, the costliest part of a step on a CPU.
        class_guard: **(ours)** the guard against confirmation bias of :mod:`sss_lib.semisup.guard`:
            per-class validation Dice at the end of the warm-up is each class's baseline; a class
            that falls more than ``guard_margin`` below it is dropped from the unsupervised loss
            (where the teacher or the frozen warm-up model gives it), and the teacher is reset to
            the best validated weights. Needs validation cases; one process only (with several it
            is turned off, with a warning).
        guard_margin: see ``class_guard``.
        adaptive_thresholds: **(ours)** class-wise adaptive confidence thresholds
            (:mod:`sss_lib.semisup.thresholds`, FreeMatch style): each class's threshold is
            ``confidence`` scaled by the teacher's per-class confidence EMA (the surest class keeps
            ``confidence``), never below ``adaptive_floor``, so that a class the teacher is rarely
            sure of (a thin ring) keeps pixels in the consistency loss instead of being erased.
            Beside ``class_guard``, not instead of it. With several processes each keeps its own levels.
        adaptive_floor: the lowest class threshold with ``adaptive_thresholds`` (at most ``confidence``).
        dfe_to_decoder: the mask decoder's consistency decodes the strong view's DFE-enhanced
            features (SSS_METHOD.md section 3, last line), so DFE also learns through the decoder;
            False (default): DFE reaches the coarse head only and the decoder reads the strong view's
            own features. **(ours)** Labeled slices, the teacher and inference still decode the
            backbone's own features.
        memory_path: SAM-2 backbones only: the teacher's pseudo-label of a slice is SAM-2's memory
            propagation from PCSW's key slice (what Auto-segment gives there), and the decoder's
            consistency decodes the slice's memory-conditioned features
            (:mod:`sss_lib.trainer.sam2_memory`), as do half of the labeled decoder samples off their
            class's key slice (also in supervised-only runs); False (default): every decode is a
            memory-free key-slice decode from the slice's own prompt. Needs PCSW.
        strong: the strong augmentation's settings.
    """

    train: TrainConfig
    run_dir: Path
    copy_to: Path | None = None
    checkpoint_every: int = 50
    on_bad_case: Literal["skip", "stop"] = "stop"
    random_init: bool = False

    unlabeled: Path | None = None
    consistency: bool = True
    use_dfe: bool = True
    use_pcsw: bool = True
    warmup_iterations: int | None = None
    warmup_until_plateau: bool = True
    max_warmup_fraction: float = 0.5
    rampup_iterations: int | None = None
    lambda_u: float = 1.0
    confidence: float = 0.95
    untrusted_floor: float | None = None
    ema_decay: float = 0.99
    unlabeled_batch: int = 4
    strong_views: int = 2
    strong_view_seed: int | None = None
    cutmix_p: float = 0.5
    teacher_points: bool | None = None
    decoder_agreement: bool = True
    dfe_width: int | None = None
    dfe_zero_init_gain: bool = True
    lr_dfe: float | None = None
    unsup_head_weight: float = 1.0
    unsup_decoder_weight: float = 1.0
    unsup_decoder_classes: int | None = None
    class_guard: bool = True
    guard_margin: float = 0.05
    adaptive_thresholds: bool = False
    adaptive_floor: float = 0.5
    dfe_to_decoder: bool = False
    memory_path: bool = False
    strong: StrongViewSettings = dataclasses.field(default_factory=StrongViewSettings)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.copy_to = Path(self.copy_to) if self.copy_to is not None else None
        self.unlabeled = Path(self.unlabeled) if self.unlabeled is not None else None
        checks = [
            (self.checkpoint_every >= 1, "checkpoint_every must be at least 1"),
            (self.on_bad_case in ("skip", "stop"), "on_bad_case must be 'skip' or 'stop'"),
            (self.warmup_iterations is None or self.warmup_iterations >= 0, "warmup_iterations must be >= 0"),
            (self.rampup_iterations is None or self.rampup_iterations >= 0, "rampup_iterations must be >= 0"),
            (0.0 <= self.max_warmup_fraction <= 1.0, "max_warmup_fraction must lie in [0, 1]"),
            (self.lambda_u >= 0, "lambda_u must be >= 0"),
            (0.0 <= self.confidence <= 1.0, "confidence must lie in [0, 1]"),
            (self.untrusted_floor is None or 0.0 < self.untrusted_floor <= 1.0, "untrusted_floor must lie in (0, 1]"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must lie in [0, 1)"),
            (self.unlabeled_batch >= 1, "unlabeled_batch must be at least 1"),
            (self.strong_views >= 1, "strong_views must be at least 1"),
            (0.0 <= self.cutmix_p <= 1.0, "cutmix_p must lie in [0, 1]"),
            (self.dfe_width is None or self.dfe_width >= 1, "dfe_width must be at least 1"),
            (self.lr_dfe is None or self.lr_dfe > 0, "lr_dfe must be positive"),
            (self.unsup_head_weight >= 0 and self.unsup_decoder_weight >= 0, "unsupervised weights must be >= 0"),
            (self.unsup_decoder_classes is None or self.unsup_decoder_classes >= 0,
             "unsup_decoder_classes must be >= 0"),
            (0.0 <= self.guard_margin <= 1.0, "guard_margin must lie in [0, 1]"),
            (0.0 <= self.adaptive_floor <= 1.0, "adaptive_floor must lie in [0, 1]"),
            (not (self.memory_path and not self.use_pcsw), "memory_path needs PCSW's key slices (drop --no-pcsw)"),
        ]
        for ok, problem in checks:
            if not ok:
                raise InputError(None, f"training settings: {problem}", "Fix the value and start the run again.")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def semi_supervised(self) -> bool:
        """True when the run uses unlabeled data (a folder is given and consistency is on)."""
        return self.consistency and self.unlabeled is not None

    @property
    def total_steps(self) -> int:
        return int(self.train.iterations)

    @property
    def warmup(self) -> int:
        n = self.warmup_iterations
        return int(round(0.2 * self.total_steps)) if n is None else int(n)

    @property
    def max_warmup(self) -> int:
        """The longest warm-up with ``warmup_until_plateau`` (never shorter than :attr:`warmup`)."""
        return max(self.warmup, int(round(self.max_warmup_fraction * self.total_steps)))

    @property
    def rampup(self) -> int:
        n = self.rampup_iterations
        return int(round(0.2 * self.total_steps)) if n is None else int(n)

    @property
    def floor(self) -> float:
        """The coarse probability from which a class without a prompt makes a pixel untrusted."""
        if self.untrusted_floor is not None:
            return float(self.untrusted_floor)
        return max(1.0 - self.confidence, 1e-3)

    @property
    def dfe_lr(self) -> float:
        """DFE's learning rate (see ``lr_dfe``)."""
        return float(self.lr_dfe) if self.lr_dfe is not None else 0.1 * float(self.train.lr_head)

    @property
    def val_every(self) -> int:
        return int(self.train.val_every or max(1, self.total_steps // 4))

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (paths as strings, tuples as lists), with a ``schema`` key."""
        return {"schema": SCHEMA, **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: object = None) -> "SemiSupConfig":
        """Rebuild from :meth:`to_dict`'s form.

        Raises:
            InputError: another schema, or settings this version does not know.
        """
        body = dict(data)
        schema = body.pop("schema", SCHEMA)
        if schema in (_SCHEMA_1, _SCHEMA_2, _SCHEMA_3):
            body.setdefault("warmup_until_plateau", False)
        if schema in (_SCHEMA_1, _SCHEMA_2):
            body.setdefault("class_guard", False)
        if schema == _SCHEMA_1:
            body.setdefault("decoder_agreement", False)
            body.setdefault("dfe_zero_init_gain", False)
            if body.get("lr_dfe") is None:
                body["lr_dfe"] = float(body.get("train", {}).get("lr_head", TrainConfig.lr_head))
        elif schema not in (SCHEMA, _SCHEMA_2, _SCHEMA_3):
            raise InputError(source, f"training settings have schema {schema!r}, this version reads {SCHEMA!r}",
                             "Resume with the SSS version that started the run, or start a new run.")
        try:
            train = dict(body.pop("train"))
            train["pcsw"] = PcswConfig(**train.get("pcsw", {}))
            train["jitter"] = PromptJitter(**train.get("jitter", {}))
            for key in ("window", "percentiles"):
                if key in train:
                    train[key] = tuple(train[key])
            if train.get("val_cases") is not None:
                train["val_cases"] = tuple(train["val_cases"])
            strong = {k: tuple(v) if isinstance(v, list) else v for k, v in body.pop("strong", {}).items()}
            return cls(train=TrainConfig(**train), strong=StrongViewSettings(**strong), **body)
        except (TypeError, KeyError, ValueError) as exc:
            raise InputError(source, f"training settings cannot be read ({exc})",
                             "Start a new run folder, or resume with the SSS version that started it.") from exc

    def to_run_config(self) -> "RunConfig":
        """The run folder's :class:`~sss_lib.runs.RunConfig`, with this config as its ``extra``."""
        from ..runs.config import RunConfig

        t = self.train
        return RunConfig(
            run_dir=str(self.run_dir), total_steps=self.total_steps, seed=t.seed, warmup_steps=self.warmup,
            rampup_steps=self.rampup, lambda_u=self.lambda_u, confidence_threshold=self.confidence,
            ema_decay=self.ema_decay, labeled_batch=t.head_batch, unlabeled_batch=self.unlabeled_batch,
            lr=t.lr_decoder, weight_decay=t.weight_decay, poly_power=0.9, cutmix_p=self.cutmix_p,
            dfe_width=self.dfe_width, val_every=self.val_every, checkpoint_every=self.checkpoint_every,
            extra={"trainer": self.to_dict()},
        )

    @classmethod
    def from_run_config(cls, run: "RunConfig", source: object = None) -> "SemiSupConfig":
        """The config a run folder was started with (see :meth:`to_run_config`)."""
        body = run.extra.get("trainer")
        if not isinstance(body, dict):
            raise InputError(source, "the run configuration holds no trainer settings",
                             "This run folder was not written by `sss_lib train`; start a new run.")
        return cls.from_dict(body, source)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
