"""What a supervised training run is asked to do, and what it reports back (no torch here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..pcsw.config import PcswConfig
from .samples import PromptJitter

if TYPE_CHECKING:
    from ..task_model import TaskModel


@dataclasses.dataclass
class TrainConfig:
    """Settings of :func:`sss_lib.trainer.train_task_model`.

    Data:
        labeled: dataset folder (nnU-Net v2 raw, ACDC or plain; see :func:`sss_lib.datasets.open_dataset`).
        out: the task-model file to write.
        layout: dataset layout, or "auto".
        val_cases: case ids held out for validation; None: the last ``val_fraction`` of the
            labeled cases (at least one when there are two or more; none with one case).
        val_fraction: see ``val_cases``.
        max_cases: use only the first N labeled cases (quick runs); None uses all.
        data_name: how the model describes its data (default: the folder name).

    Model:
        backbone: registry name ("litemedsam", "sam2.1_hiera_tiny", ... or "auto").
        checkpoint: a SAM-2 checkpoint file instead of the cached one.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        image_size: SAM-2 input size (None: the backbone's default).
        modality / window / percentiles / slice_axis: preprocessing (see
            :class:`sss_lib.task_model.TaskPreprocessing`).
        head_width: hidden channels of the coarse head.
        pcsw: PCSW settings stored in the model and used by validation.

    Optimisation:
        iterations: optimiser steps.
        seed: seeds the head's initialisation and every random draw (reproducible on a CPU).
        head_batch: slices per step for the coarse head.
        decoder_batch: prompt samples per step for the mask decoder.
        lr_head / lr_decoder: AdamW learning rates (poly decay, power 0.9, to 0).
        weight_decay: AdamW weight decay.
        carry_fraction: share of decoder samples that are carried-box prompts (2D backbones);
            None: 0.5 for a backbone that propagates by carrying boxes, else 0.
        carry_points: carried prompts hold the previous mask's deep point and hole point too (as
            the backbone carries them); None: what the backbone does.
        ended_fraction: share of carried samples that step past the end of a structure.
        jitter: how prompts are drawn from the labels.
        train_decoder: False trains the coarse head only (the backbone's decoder stays as shipped).
        val_every: validate every N steps (None: four times per run, and at the end).

    Switches (off by default; the SSL protocol's ablation rows say what each does):
        weak_views: weak views (random zoom/crop, flip, small rotation) per labeled training case,
            each embedded once and sampled with the originals (:mod:`.labeled_aug`); each costs one
            embedding per labeled slice. 0: the labeled slices as they are.
        encoder_blocks: train the image encoder's last N blocks too (:mod:`.encoder_tuning`; the
            task model then carries them and inference runs its encoder in torch). 0: frozen.
        encoder_lora_rank: > 0 trains low-rank adapters of this rank on the blocks' linear layers
            instead of the blocks' own weights; ``encoder_lora_alpha`` scales them (alpha / rank).
        lr_encoder: AdamW learning rate of the encoder blocks (or adapters).
    """

    labeled: Path
    out: Path
    layout: Literal["auto", "nnunet", "acdc", "plain"] = "auto"
    val_cases: tuple[str, ...] | None = None
    val_fraction: float = 0.2
    max_cases: int | None = None
    data_name: str | None = None

    backbone: str = "litemedsam"
    checkpoint: Path | None = None
    device: str = "auto"
    image_size: int | None = None
    modality: Literal["auto", "CT", "MR", "other"] = "auto"
    window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    slice_axis: str = "auto"
    head_width: int = 32
    pcsw: PcswConfig = dataclasses.field(default_factory=PcswConfig)

    iterations: int = 300
    seed: int = 0
    head_batch: int = 8
    decoder_batch: int = 4
    lr_head: float = 5e-3
    lr_decoder: float = 1e-4
    weight_decay: float = 0.01
    carry_fraction: float | None = None
    carry_points: bool | None = None
    ended_fraction: float = 0.25
    jitter: PromptJitter = dataclasses.field(default_factory=PromptJitter)
    train_decoder: bool = True
    val_every: int | None = None
    weak_views: int = 0
    encoder_blocks: int = 0
    encoder_lora_rank: int = 0
    encoder_lora_alpha: float = 8.0
    lr_encoder: float = 1e-5

    def __post_init__(self) -> None:
        self.labeled = Path(self.labeled)
        self.out = Path(self.out)
        checks = [
            (self.iterations >= 1, "iterations must be at least 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must lie in [0, 1)"),
            (self.head_batch >= 1 and self.decoder_batch >= 1, "batch sizes must be at least 1"),
            (self.lr_head > 0 and self.lr_decoder > 0, "learning rates must be positive"),
            (self.carry_fraction is None or 0.0 <= self.carry_fraction <= 1.0, "carry_fraction must lie in [0, 1]"),
            (0.0 <= self.ended_fraction <= 1.0, "ended_fraction must lie in [0, 1]"),
            (self.val_every is None or self.val_every >= 1, "val_every must be at least 1"),
            (self.max_cases is None or self.max_cases >= 1, "max_cases must be at least 1"),
            (self.weak_views >= 0, "weak_views must be 0 (off) or more"),
            (self.encoder_blocks >= 0 and self.encoder_lora_rank >= 0, "encoder_blocks and encoder_lora_rank "
             "must be 0 (off) or more"),
            (self.lr_encoder > 0 and self.encoder_lora_alpha > 0, "lr_encoder and encoder_lora_alpha must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")


@dataclasses.dataclass
class ValidationRecord:
    """One validation: step, per-class Dice averaged over the held-out cases, and their mean
    (Auto-segment with every class from the decoder), and the coarse head's own per-class Dice."""

    iteration: int
    dice: dict[int, float]
    mean_dice: float
    seconds: float
    coarse_dice: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model_path: the task-model file written.
        model: the task model (as written).
        losses: per step, ``{"total", "head", "decoder"}`` loss values.
        validations: every validation run, in order.
        best_iteration: the step whose weights were kept (the last step without validation cases).
        train_cases / val_cases: case ids used.
        seconds: wall time; ``timings``: seconds per stage (``embed``, ``train``, ``validate``).
        device: the torch device trained on.
    """

    model_path: Path
    model: "TaskModel"
    losses: list[dict[str, float]]
    validations: list[ValidationRecord]
    best_iteration: int
    train_cases: list[str]
    val_cases: list[str]
    seconds: float
    timings: dict[str, float]
    device: str

    def loss_drop(self, window: int = 10) -> tuple[float, float]:
        """Mean total loss over the first and the last ``window`` steps."""
        totals = [row["total"] for row in self.losses]
        w = max(1, min(window, len(totals) // 2 or 1))
        return float(sum(totals[:w]) / w), float(sum(totals[-w:]) / w)


@dataclasses.dataclass
class TrainEvent:
    """Progress of a training run: ``done`` of ``total`` steps of ``stage``.

    Stages: ``"embed"`` (slices embedded), ``"train"`` (optimiser steps; ``loss`` is the step's
    total loss), ``"validate"`` (validation cases auto-segmented; ``dice`` is set on the last one).
    """

    stage: Literal["embed", "train", "validate"]
    done: int
    total: int
    message: str
    loss: float | None = None
    dice: float | None = None
