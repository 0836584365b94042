"""Names and defaults shared by the SSSTrain panel, its logic and its saved scenes and run folders.

Python 3.9 compatible (see SSSTrain.py). Values stored in scenes or run folders (attribute names,
file names) must keep their spelling: add new names rather than renaming old ones.
"""

from typing import List

# Where the labeled and the unlabeled cases come from (the panel's combo boxes show these words).
SOURCE_SCENE = "scene"
SOURCE_FOLDER = "folder"
SOURCE_NONE = "none"
LABELED_SOURCES: List[str] = [SOURCE_SCENE, SOURCE_FOLDER]
UNLABELED_SOURCES: List[str] = [SOURCE_NONE, SOURCE_FOLDER, SOURCE_SCENE]

# Defaults of the method's settings (sss_lib.runs.RunConfig and the training run contract).
DEFAULT_ITERATIONS = 10000
DEFAULT_WARMUP = 2000  # 20% of the iterations, sss_lib's default share
DEFAULT_LAMBDA_U = 1.0
DEFAULT_CONFIDENCE = 0.95
DEFAULT_EMA_DECAY = 0.99
DEFAULT_SEED = 0
DEFAULT_GPUS = 2  # the torchrun variant of "Copy command"

# A volume node with this attribute set to "1" is left out of training (the case list's checkbox).
ATTR_EXCLUDED = "SSSTrain.Excluded"

# Inside the run folder (the trainer owns config.json, checkpoints/, history.jsonl, curves.png,
# model.ssstask and STOP; the panel owns these).
SCENE_DATASET_DIR = "dataset"  # labeled scene cases as an nnU-Net v2 raw dataset
SCENE_UNLABELED_DIR = "unlabeled"  # unlabeled scene volumes, one image file each
PANEL_DIR = "slicer"  # files of the Slicer panel
STATE_FILE = "run_state.json"  # the process this panel started: pid, command, host, times
STDOUT_FILE = "stdout.jsonl"  # the trainer's stdout: progress records, one JSON object a line
CONSOLE_FILE = "console.log"  # the trainer's stderr: its readable console view
PREVIOUS_DIR = "previous"  # "Start" in a folder with a finished run moves that run here

# Files of the trainer (the run-folder contract; sss_lib.runs.layout.RunPaths).
MODEL_FILE = "model.ssstask"
CURVES_FILE = "curves.png"
HISTORY_FILE = "history.jsonl"
CONFIG_FILE = "config.json"
STOP_FILE = "STOP"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "checkpoints/last.pt"

STOP_FILE_ENV = "SSS_STOP_FILE"  # sss_lib.runs.stop.STOP_FILE_ENV
