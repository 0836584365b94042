"""What the panel collects, and the training command it stands for (the training run contract).

The command is ``python -m sss_lib train --labeled DATA --run-dir RUN [--unlabeled DIR] ...`` with
every setting spelled out, so the run does what the panel shows whatever the trainer's defaults
are, and "Copy command" gives a line that reproduces the run on a GPU server. Python 3.9 compatible.
"""

import dataclasses
import os
import shlex
from typing import List, Sequence

from . import constants as C
from .errors import SettingsError


@dataclasses.dataclass
class TrainSettings:
    """One training run as the panel describes it.

    Attributes:
        run_dir: the run folder (checkpoints, curves, the task model; see the run contract).
        labeled_source: ``"scene"`` (volume + segmentation pairs, written to ``RUN/dataset``) or
            ``"folder"`` (``labeled_folder``, any layout ``sss_lib.datasets.open_dataset`` reads).
        unlabeled_source: ``"none"``, ``"folder"`` (``unlabeled_folder``: images only) or
            ``"scene"`` (volumes without a segmentation, written to ``RUN/unlabeled``).
        backbone / device / iterations: the model to fine-tune, where, and for how many steps.
        warmup_iterations, lambda_u, confidence, ema_decay: the method's settings
            (SSS_METHOD.md section 4): supervised-only steps at the start, the unsupervised loss
            weight, the pseudo-label confidence threshold, the EMA teacher's decay.
        warmup_plateau: the warm-up goes on while validation improves (``warmup_iterations`` is
            then the fewest supervised-only steps; sss_lib.semisup.warmup).
        dfe / pcsw / consistency: the method's parts, each on or off (ablations).
        seed: seeds every random draw of the run.
        weak_views: weakly augmented views of each labeled case (0: off).
        class_guard / adaptive_thresholds: guards against confident wrong pseudo-labels (a class
            whose validation Dice falls is dropped from the unsupervised loss; class-wise thresholds).
        dfe_to_decoder / memory_path: DFE features to the mask decoder's consistency; SAM-2's
            memory path for pseudo-labels and decoder training (SAM-2 backbones only).
        encoder_blocks / encoder_lora_rank: the image encoder's last blocks trained (or low-rank
            adapters on them, rank > 0); supervised runs only.
    """

    run_dir: str
    labeled_source: str = C.SOURCE_SCENE
    labeled_folder: str = ""
    unlabeled_source: str = C.SOURCE_NONE
    unlabeled_folder: str = ""
    backbone: str = "sam2.1_hiera_tiny"
    device: str = "auto"
    iterations: int = C.DEFAULT_ITERATIONS
    warmup_iterations: int = C.DEFAULT_WARMUP
    warmup_plateau: bool = True
    lambda_u: float = C.DEFAULT_LAMBDA_U
    confidence: float = C.DEFAULT_CONFIDENCE
    ema_decay: float = C.DEFAULT_EMA_DECAY
    dfe: bool = True
    pcsw: bool = True
    consistency: bool = True
    seed: int = C.DEFAULT_SEED
    weak_views: int = 0
    class_guard: bool = True
    adaptive_thresholds: bool = False
    dfe_to_decoder: bool = False
    memory_path: bool = False
    encoder_blocks: int = 0
    encoder_lora_rank: int = 0

    def labeled_path(self) -> str:
        """The dataset folder the trainer reads (``RUN/dataset`` for scene cases)."""
        if self.labeled_source == C.SOURCE_SCENE:
            return os.path.join(self.run_dir, C.SCENE_DATASET_DIR)
        return self.labeled_folder

    def unlabeled_path(self) -> str:
        """The folder of unlabeled images, or "" for none."""
        if self.unlabeled_source == C.SOURCE_SCENE:
            return os.path.join(self.run_dir, C.SCENE_UNLABELED_DIR)
        if self.unlabeled_source == C.SOURCE_FOLDER:
            return self.unlabeled_folder
        return ""


def given(path: str) -> bool:
    """True for a real path; "" and "." (an empty pathlib.Path) mean "not chosen"."""
    return bool(path) and str(path).strip() not in ("", ".")


def check_settings(settings: TrainSettings) -> None:
    """Raise :class:`SettingsError` saying what to fix before the run can start."""
    if not given(settings.run_dir):
        raise SettingsError("Choose a run folder (Training > Run folder): checkpoints, curves and the task model go there.")
    if settings.labeled_source not in C.LABELED_SOURCES:
        raise SettingsError(f"Unknown source of labeled cases {settings.labeled_source!r}; use one of {C.LABELED_SOURCES}.")
    if settings.unlabeled_source not in C.UNLABELED_SOURCES:
        raise SettingsError(f"Unknown source of unlabeled cases {settings.unlabeled_source!r}; use one of {C.UNLABELED_SOURCES}.")
    if settings.labeled_source == C.SOURCE_FOLDER and not given(settings.labeled_folder):
        raise SettingsError("Choose the labeled data folder, or take the labeled cases from the scene.")
    if settings.unlabeled_source == C.SOURCE_FOLDER and not given(settings.unlabeled_folder):
        raise SettingsError("Choose the folder of unlabeled volumes, or set 'Unlabeled cases' to none.")
    if settings.iterations < 1:
        raise SettingsError("Iterations must be at least 1.")
    if not 0.0 <= settings.confidence <= 1.0:
        raise SettingsError("The confidence threshold must lie between 0 and 1.")
    if not 0.0 <= settings.ema_decay < 1.0:
        raise SettingsError("The EMA decay must be at least 0 and below 1.")
    if settings.lambda_u < 0 or settings.warmup_iterations < 0:
        raise SettingsError("lambda_u and the warm-up iterations must not be negative.")
    if settings.weak_views < 0 or settings.encoder_blocks < 0 or settings.encoder_lora_rank < 0:
        raise SettingsError("Weak views, encoder blocks and the LoRA rank must be 0 (off) or more.")
    if settings.encoder_blocks and given(settings.unlabeled_path()) and settings.consistency:
        raise SettingsError("Training the image encoder's blocks works with supervised runs only: set 'Unlabeled "
                            "cases' to none (or turn Consistency off), or set 'Encoder blocks trained' to 0.")
    if settings.encoder_lora_rank and not settings.encoder_blocks:
        raise SettingsError("A LoRA rank needs encoder blocks to adapt: set 'Encoder blocks trained' to 1 or more, "
                            "or the LoRA rank to 0.")
    if settings.memory_path and not settings.backbone.startswith("sam2"):
        raise SettingsError(f"The memory path needs a SAM-2 backbone ({settings.backbone} has no memory): choose a "
                            "sam2.1 backbone or turn 'Memory path' off.")
    if settings.memory_path and not settings.pcsw:
        raise SettingsError("The memory path propagates from PCSW's key slices: turn PCSW on, or 'Memory path' off.")
    if settings.warmup_iterations >= settings.iterations:
        raise SettingsError(
            f"The warm-up iterations ({settings.warmup_iterations}) must be fewer than the iterations "
            f"({settings.iterations}): unlabeled cases only count after the warm-up (about 20% of the run is usual)."
        )


def _number(value: float) -> str:
    return repr(float(value))


def train_arguments(settings: TrainSettings, resume: bool = False) -> List[str]:
    """The arguments after ``python -m sss_lib`` (starting with ``train``), every setting spelled out."""
    args = ["train", "--labeled", settings.labeled_path(), "--run-dir", settings.run_dir]
    if given(settings.unlabeled_path()):
        args += ["--unlabeled", settings.unlabeled_path()]
    args += [
        "--backbone", settings.backbone,
        "--device", settings.device,
        "--iterations", str(int(settings.iterations)),
        "--seed", str(int(settings.seed)),
        "--warmup-iterations", str(int(settings.warmup_iterations)),
        "--lambda-u", _number(settings.lambda_u),
        "--confidence", _number(settings.confidence),
        "--ema-decay", _number(settings.ema_decay),
        "--warmup-until-plateau" if settings.warmup_plateau else "--no-warmup-until-plateau",
    ]
    if not settings.dfe:
        args.append("--no-dfe")
    if not settings.pcsw:
        args.append("--no-pcsw")
    if not settings.consistency:
        args.append("--no-consistency")
    args.append("--class-guard" if settings.class_guard else "--no-class-guard")
    if settings.adaptive_thresholds:
        args.append("--adaptive-thresholds")
    if settings.dfe_to_decoder:
        args.append("--dfe-to-decoder")
    if settings.memory_path:
        args.append("--memory-path")
    args += ["--weak-views", str(int(settings.weak_views)), "--encoder-blocks", str(int(settings.encoder_blocks))]
    if settings.encoder_blocks:
        args += ["--encoder-lora-rank", str(int(settings.encoder_lora_rank))]
    if resume:
        args.append("--resume")
    return args


def train_command(settings: TrainSettings, entry: Sequence[str], resume: bool = False) -> List[str]:
    """``entry`` (e.g. ``[PythonSlicer, "-m", "sss_lib"]``) followed by :func:`train_arguments`."""
    return list(entry) + train_arguments(settings, resume)


def copy_text(settings: TrainSettings, gpus: int = C.DEFAULT_GPUS, resume: bool = False) -> str:
    """The run as shell lines for a GPU server: plain ``python`` and data-parallel ``torchrun``.

    POSIX shell quoting (GPU servers run Linux). The paths are this computer's: the comment says to
    copy the data (and, to resume, the run folder) and adjust them.
    """
    args = " ".join(shlex.quote(a) for a in train_arguments(settings, resume))
    gpus = max(1, int(gpus))
    return "\n".join([
        "# SSS training run, from 3D Slicer's SSS Train panel. On another computer, copy the data folders"
        + (" and the run folder" if resume else "") + " and adjust the paths.",
        f"python -m sss_lib {args}",
        f"# data-parallel on {gpus} GPU(s) of one machine (only rank 0 writes the run folder):",
        f"torchrun --nproc_per_node {gpus} -m sss_lib {args}",
        "",
    ])
