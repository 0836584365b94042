"""SSSTrain's logic, free of Qt: check a dataset, build the training command, start the process.

Training itself belongs to sss_lib and runs as ``python -m sss_lib train ...`` in its own process
(:mod:`SSSTrainLib.process`). This version of sss_lib has no ``train`` command yet; until it does,
:meth:`TrainLogic.train_command` raises :class:`TrainingUnavailableError` with that explanation.
"""

import argparse
import dataclasses
from typing import Callable, Dict, List, Optional

from .process import ProcessRun


class TrainingUnavailableError(RuntimeError):
    """The installed sss_lib cannot train (no ``train`` command)."""


class DatasetError(RuntimeError):
    """The dataset folder is unusable; the message says why and what to do."""


@dataclasses.dataclass
class TrainSettings:
    """What the panel collects.

    Attributes:
        dataset: the labeled dataset folder (nnU-Net v2 raw, ACDC, or plain folders).
        unlabeled: an extra folder of unlabeled volumes, or "" for none.
        backbone: the SAM-2.1 (or LiteMedSAM) backbone to fine-tune.
        device: auto, cpu, cuda or mps.
        iterations: training iterations.
        output: the task-model file to write (``.ssstask``).
    """

    dataset: str
    output: str
    unlabeled: str = ""
    backbone: str = "sam2.1_hiera_tiny"
    device: str = "auto"
    iterations: int = 20000


def _given(path: Optional[str]) -> bool:
    return bool(path) and str(path) not in (".", "")


class TrainLogic:
    """Dataset check and training runs; ``python`` is the interpreter for the training process."""

    def __init__(self, python: str, sss_lib_root: Optional[str] = None) -> None:
        self.python = python
        self.sss_lib_root = sss_lib_root

    def check_dataset(self, dataset: str, unlabeled: str = "") -> str:
        """A summary of the dataset (and the unlabeled folder), or :class:`DatasetError`."""
        from sss_lib.datasets import open_dataset
        from sss_lib.errors import SSSError

        if not _given(dataset):
            raise DatasetError("Select the dataset folder first.")
        try:
            lines = [open_dataset(dataset).summary()]
            if _given(unlabeled):
                lines.append(open_dataset(unlabeled, layout="plain").summary())
        except SSSError as e:
            raise DatasetError(str(e)) from None
        return "\n".join(lines)

    @staticmethod
    def sss_lib_commands() -> List[str]:
        """The subcommands of ``python -m sss_lib`` in this sss_lib."""
        from sss_lib.cli import build_parser

        parser = build_parser()
        for action in parser._actions:  # argparse offers no public way to list subcommands
            if isinstance(action, argparse._SubParsersAction):
                return sorted(action.choices)
        return []

    def train_command(self, settings: TrainSettings) -> List[str]:
        """The command line that trains ``settings``' task model."""
        if "train" not in self.sss_lib_commands():
            raise TrainingUnavailableError(
                "Training is not available in this version of sss_lib (it has no 'train' command yet). "
                "Check the dataset here meanwhile; task models arrive with a later version of the extension."
            )
        if not _given(settings.dataset) or not _given(settings.output):
            raise DatasetError("Select the dataset folder and the task-model file to write.")
        args = [self.python, "-m", "sss_lib", "train", settings.dataset, "--output", settings.output,
                "--backbone", settings.backbone, "--device", settings.device,
                "--iterations", str(int(settings.iterations))]
        if _given(settings.unlabeled):
            args += ["--unlabeled", settings.unlabeled]
        return args

    def start_training(
        self, settings: TrainSettings, launcher: Optional[Callable[[List[str], Dict[str, str]], object]] = None
    ) -> ProcessRun:
        env = {"PYTHONUNBUFFERED": "1"}
        if self.sss_lib_root:
            env["PYTHONPATH"] = self.sss_lib_root
        return ProcessRun(self.train_command(settings), env, launcher).start()
