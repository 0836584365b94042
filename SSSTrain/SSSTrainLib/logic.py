"""SSSTrain's logic, free of Qt: the panel's data check, scene export, start / resume / stop /
re-attach of training runs, "Copy command", and handing the trained model to SSS Segment.

Training belongs to sss_lib and runs as ``python -m sss_lib train ...`` (the training run
contract) in a detached process (:mod:`SSSTrainLib.process`), followed through its files
(:mod:`SSSTrainLib.monitor`). Python 3.9 compatible; sss_lib (3.10+) is imported inside functions.
"""

import dataclasses
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from . import constants as C
from .errors import RunFolderError, SceneDataError, SettingsError
from .export import ExportReport, export_scene_cases
from .monitor import ATTACH_BACKLOG_BYTES, RunMonitor
from .process import FileTail, launch, pid_alive
from .runstate import RunState, read_state
from .scene_cases import SceneCase, find_scene_cases, unpaired_segmentations
from .settings import TrainSettings, check_settings, copy_text, given, train_command

Progress = Callable[[str, Optional[float]], None]

# A run folder without a run-state file (a command-line run) counts as running while its history
# changed this recently.
RECENT_HISTORY_S = 600.0

# Files of a run that "Start over" moves aside (the trainer's, and the panel's own).
RUN_ENTRIES = (C.CONFIG_FILE, C.CHECKPOINT_DIR, C.HISTORY_FILE, C.CURVES_FILE, C.MODEL_FILE, C.PANEL_DIR)


@dataclasses.dataclass
class RunFolderStatus:
    """What a run folder holds.

    Attributes:
        has_run: a run was started there (config, checkpoints or history exist).
        can_resume: ``checkpoints/last.pt`` exists.
        model: ``RUN/model.ssstask`` when it exists, else "".
        running: whether a training process runs there (None: cannot tell, see RunMonitor.alive).
        state: the last launch recorded by a panel, or None.
        last_step: the last "step" record of ``history.jsonl``, or None.
    """

    has_run: bool = False
    can_resume: bool = False
    model: str = ""
    running: Optional[bool] = False
    state: Optional[RunState] = None
    last_step: Any = None


def _tail_records(path: str, backlog: int = 64 * 1024) -> List[Any]:
    """The progress records in the last ``backlog`` bytes of a history file (a long run's history
    is megabytes; the panel needs only its end)."""
    from sss_lib.runs.progress import parse_progress_line

    records = (parse_progress_line(line) for line in FileTail(path, backlog=backlog).read_lines())
    return [r for r in records if r is not None]


class TrainLogic:
    """Everything the panel does, without Qt.

    Args:
        python: the interpreter for the training process (in Slicer: PythonSlicer).
        sss_lib_root: the folder holding ``sss_lib``, put on the process's PYTHONPATH.
        entry: the command before ``train`` (default ``[python, "-m", "sss_lib"]``; tests pass a
            stand-in trainer script that follows the run contract).
        base_env: the environment the process starts from (in Slicer: the startup environment,
            which does not see later changes to ``os.environ``).
        extra_env: variables set for the process (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, python: str, sss_lib_root: Optional[str] = None, entry: Optional[Sequence[str]] = None,
                 base_env: Optional[Mapping[str, str]] = None, extra_env: Optional[Mapping[str, str]] = None) -> None:
        self.python = python
        self.sss_lib_root = sss_lib_root
        self._entry = list(entry) if entry else None
        self.base_env = dict(base_env) if base_env is not None else None
        self.extra_env: Dict[str, str] = dict(extra_env or {})

    # -- data -------------------------------------------------------------------------------------

    def entry(self) -> List[str]:
        return list(self._entry) if self._entry else [self.python, "-m", "sss_lib"]

    @staticmethod
    def scene_cases(scene: Any) -> Tuple[List[SceneCase], List[SceneCase]]:
        """The scene's labeled and unlabeled cases (see :func:`find_scene_cases`)."""
        return find_scene_cases(scene)

    def check_data(self, settings: TrainSettings, scene: Any) -> str:
        """A summary of the data the run would use, or a :class:`TrainUserError` saying what is wrong."""
        from sss_lib.datasets import open_dataset
        from sss_lib.errors import SSSError

        from .scene_cases import class_table

        lines = []
        labeled, unlabeled = find_scene_cases(scene)
        if settings.labeled_source == C.SOURCE_SCENE:
            included = [c for c in labeled if c.included]
            if not included:
                raise SceneDataError(self._no_scene_cases_text(scene))
            classes = class_table(included)
            lines.append(f"Scene: {len(included)} labeled case(s); classes "
                         + ", ".join(f"{v} {n}" for v, n in sorted(classes.items())))
        else:
            if not given(settings.labeled_folder):
                raise SettingsError("Choose the labeled data folder.")
            try:
                lines.append(open_dataset(settings.labeled_folder).summary())
            except SSSError as e:
                raise SettingsError(str(e)) from None
        if settings.unlabeled_source == C.SOURCE_SCENE:
            lines.append(f"Scene: {sum(c.included for c in unlabeled)} unlabeled volume(s)")
        elif settings.unlabeled_source == C.SOURCE_FOLDER:
            if not given(settings.unlabeled_folder):
                raise SettingsError("Choose the folder of unlabeled volumes.")
            try:
                lines.append(open_dataset(settings.unlabeled_folder, layout="plain").summary())
            except SSSError as e:
                raise SettingsError(str(e)) from None
        return "\n".join(lines)

    @staticmethod
    def _no_scene_cases_text(scene: Any) -> str:
        unpaired = unpaired_segmentations(scene)
        hint = (f" These segmentations have no reference volume: {', '.join(unpaired)}; open each in the Segment Editor "
                "and pick its source volume." if unpaired else "")
        return ("No labeled case in the scene is selected: load volumes, segment them (SSS Segment or the Segment "
                "Editor) and tick them in the case list, or take the labeled cases from a data folder." + hint)

    def prepare_data(self, settings: TrainSettings, scene: Any, progress: Optional[Progress] = None) -> Optional[ExportReport]:
        """Write the scene cases the settings ask for into the run folder (None when none are asked for)."""
        want_labeled = settings.labeled_source == C.SOURCE_SCENE
        want_unlabeled = settings.unlabeled_source == C.SOURCE_SCENE
        if not (want_labeled or want_unlabeled):
            return None
        labeled, unlabeled = find_scene_cases(scene)
        if want_labeled and not any(c.included for c in labeled):
            raise SceneDataError(self._no_scene_cases_text(scene))
        if want_unlabeled and not any(c.included for c in unlabeled):
            raise SceneDataError("No unlabeled volume in the scene is selected: load some, tick them in the case list, "
                                 "or set 'Unlabeled cases' to none or a folder.")
        return export_scene_cases(labeled if want_labeled else [], unlabeled if want_unlabeled else [],
                                  settings.run_dir, progress)

    # -- runs -------------------------------------------------------------------------------------

    def env_update(self) -> Dict[str, str]:
        env = dict(self.extra_env)
        if self.sss_lib_root:
            base = self.base_env if self.base_env is not None else os.environ
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.sss_lib_root, base.get("PYTHONPATH", "")) if p)
        return env

    @staticmethod
    def run_status(run_dir: str) -> RunFolderStatus:
        """What ``run_dir`` holds and whether a process trains there."""
        if not given(run_dir) or not os.path.isdir(run_dir):
            return RunFolderStatus()
        join = lambda name: os.path.join(run_dir, name)  # noqa: E731
        state = read_state(run_dir)
        running: Optional[bool] = False
        if state is not None:
            running = pid_alive(state.pid, state.started) if state.on_this_host() else None
        steps = [r for r in _tail_records(join(C.HISTORY_FILE)) if r.event == "step"]
        return RunFolderStatus(
            has_run=any(os.path.exists(join(n)) for n in (C.CONFIG_FILE, C.CHECKPOINT_DIR, C.HISTORY_FILE)),
            can_resume=os.path.isfile(join(C.LAST_CHECKPOINT)),
            model=join(C.MODEL_FILE) if os.path.isfile(join(C.MODEL_FILE)) else "",
            running=running, state=state, last_step=steps[-1] if steps else None,
        )

    def archive_previous_run(self, run_dir: str) -> str:
        """Move an earlier run's files to ``RUN/previous/<time>/`` (for "Start" in a used folder); returns that folder."""
        if self.run_status(run_dir).running:
            raise RunFolderError("A training process still runs in this folder: stop it first.")
        target = os.path.join(run_dir, C.PREVIOUS_DIR, time.strftime("%Y%m%d-%H%M%S"))
        moved = False
        for name in RUN_ENTRIES:
            source = os.path.join(run_dir, name)
            if os.path.exists(source):
                os.makedirs(target, exist_ok=True)
                shutil.move(source, os.path.join(target, name))
                moved = True
        return target if moved else ""

    def start(self, settings: TrainSettings, scene: Any, progress: Optional[Progress] = None) -> RunMonitor:
        """Write the scene cases, then start a new run; returns its monitor.

        Raises:
            TrainUserError: a setting, the scene data or the run folder is not usable.
        """
        check_settings(settings)
        status = self.run_status(settings.run_dir)
        if status.running:
            raise RunFolderError("A training process already runs in this run folder: follow it, stop it, "
                                 "or choose another folder.")
        if status.has_run:
            raise RunFolderError("This run folder holds an earlier run: Resume it, or start over "
                                 "(its files move to previous/), or choose another folder.")
        self._check_writable(settings.run_dir)
        self.prepare_data(settings, scene, progress)
        return self._launch(train_command(settings, self.entry()), settings.run_dir, resumed=False)

    def resume(self, run_dir: str, settings: Optional[TrainSettings] = None) -> RunMonitor:
        """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` (``--resume``).

        The command is the last launch's (from the run-state file, with this Slicer's interpreter),
        so the run goes on with its own data and settings; without a state file (a run started
        from the command line) it is built from ``settings``.
        """
        status = self.run_status(run_dir)
        if status.running:
            raise RunFolderError("This run is still going; there is nothing to resume.")
        if not status.can_resume:
            raise RunFolderError(f"There is no checkpoint to resume from in {run_dir} (checkpoints/last.pt): press Start.")
        if status.state is not None and "train" in status.state.command:
            args = status.state.command[status.state.command.index("train"):]
            command = self.entry() + [a for a in args if a != "--resume"] + ["--resume"]
        elif settings is not None:
            command = train_command(dataclasses.replace(settings, run_dir=run_dir), self.entry(), resume=True)
        else:
            raise RunFolderError("This run was not started from Slicer; fill in its settings in the panel, then Resume.")
        return self._launch(command, run_dir, resumed=True)

    def _launch(self, command: List[str], run_dir: str, resumed: bool) -> RunMonitor:
        process, state = launch(command, run_dir, self.env_update(), self.base_env, resumed=resumed)
        return RunMonitor(run_dir, process=process, state=state, backlog=0)

    @staticmethod
    def _check_writable(run_dir: str) -> None:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"Cannot create the run folder {run_dir} ({e.strerror or e}); choose another.") from None
        if not os.access(run_dir, os.W_OK):
            raise RunFolderError(f"The run folder {run_dir} is not writable; choose another.")

    def attach(self, run_dir: str, recent_s: float = RECENT_HISTORY_S) -> Optional[RunMonitor]:
        """A monitor of the run going on in ``run_dir``, or None when none is.

        Going on: a process recorded in the run-state file is alive on this computer; or the state
        file names another computer (a shared folder; followed until the run's final report); or
        there is no state file (a run started on the command line) and ``history.jsonl`` changed
        within ``recent_s`` seconds.
        """
        status = self.run_status(run_dir)
        if status.running is False and status.state is None:
            history = os.path.join(run_dir, C.HISTORY_FILE) if given(run_dir) else ""
            try:
                recent = time.time() - os.stat(history).st_mtime < recent_s
            except OSError:
                recent = False
            if not recent:
                return None
        elif status.running is False:
            return None
        return RunMonitor(run_dir, state=status.state, backlog=ATTACH_BACKLOG_BYTES)

    # -- results ----------------------------------------------------------------------------------

    def copy_command(self, settings: TrainSettings, scene: Any, gpus: int = C.DEFAULT_GPUS,
                     progress: Optional[Progress] = None) -> str:
        """The run as command lines for a GPU server (plain and torchrun); scene cases are written
        to the run folder first, so the lines name data that exists."""
        check_settings(settings)
        self._check_writable(settings.run_dir)
        self.prepare_data(settings, scene, progress)
        return copy_text(settings, gpus)

    @staticmethod
    def model_path(run_dir: str) -> str:
        """``RUN/model.ssstask``, or :class:`RunFolderError` when the run has not written it yet."""
        path = os.path.join(run_dir, C.MODEL_FILE) if given(run_dir) else ""
        if not path or not os.path.isfile(path):
            raise RunFolderError("This run has no task model yet: the trainer writes model.ssstask at its "
                                 "validations and when it finishes.")
        return path

    def hand_over_model(self, run_dir: str, segment_parameters: Any, task_model_choice: str) -> str:
        """Point SSS Segment at this run's task model: its parameter node's ``model`` becomes the
        task-model entry and ``taskModelPath`` the file. Returns the file."""
        import pathlib

        path = self.model_path(run_dir)
        segment_parameters.taskModelPath = pathlib.Path(path)
        segment_parameters.model = task_model_choice
        return path
