import os
import pathlib
import sys
from typing import Annotated, Optional

import qt

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from SSSTrainLib.logic import DatasetError, TrainingUnavailableError, TrainLogic, TrainSettings
from SSSTrainLib import process

# Python 3.9 compatible, like SSSSegment.py: it must load on Slicer 5.6/5.8 and say what it needs.
# sss_lib is imported only inside functions, after the version check.

MINIMUM_PYTHON = (3, 10)
BACKBONES = ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large", "litemedsam"]
DEVICES = ["auto", "cpu", "cuda", "mps"]


#
# SSSTrain
#


class SSSTrain(ScriptedLoadableModule):
    """Semi-supervised training of SSS task models."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SSS Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["SSSSegment"]
        self.parent.contributors = ["SSS Extension developers (SSS project)"]
        self.parent.helpText = _(
            "Train an SSS task model from a few labeled and many unlabeled volumes (semi-supervised SAM-2 "
            "fine-tuning with DFE and PCSW prompts). Training runs in a separate process; the task model then "
            "drives Auto-segment in SSS Segment. Check dataset works now; training needs a version of sss_lib "
            "with a 'train' command."
        )
        self.parent.acknowledgementText = _(
            "Based on SAM-2 (Meta AI) and the SSS method of Zhu et al. (Semi-Supervised SAM-2 with "
            "Efficient Prompting for Medical Imaging Segmentation)."
        )


#
# SSSTrainParameterNode
#


@parameterNodeWrapper
class SSSTrainParameterNode:
    """datasetPath: labeled dataset folder; unlabeledPath: optional extra unlabeled volumes;
    backbone, device, iterations: training settings; outputPath: the task-model file to write."""

    datasetPath: pathlib.Path
    unlabeledPath: pathlib.Path
    backbone: Annotated[str, Choice(BACKBONES)] = "sam2.1_hiera_tiny"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    iterations: Annotated[int, WithinRange(1, 1000000)] = 20000
    outputPath: pathlib.Path


def _pathText(path) -> str:
    text = str(path or "")
    return "" if text == "." else text


#
# SSSTrainWidget
#


class SSSTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 250

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSSTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SSSTrainLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.checkDatasetButton.connect("clicked(bool)", self.onCheckDataset)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.initializeParameterNode()

        status = SSSTrainLogic.statusText(sys.version_info)
        if status:
            self.ui.statusLabel.text = status
            self.ui.dataCollapsibleButton.enabled = False
            self.ui.trainCollapsibleButton.enabled = False

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[SSSTrainParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def _settings(self) -> TrainSettings:
        pn = self._parameterNode
        return TrainSettings(
            dataset=_pathText(pn.datasetPath), output=_pathText(pn.outputPath), unlabeled=_pathText(pn.unlabeledPath),
            backbone=pn.backbone, device=pn.device, iterations=int(pn.iterations),
        )

    def onCheckDataset(self, *unused) -> None:
        settings = self._settings()
        try:
            with slicer.util.WaitCursor():
                summary = self.logic.train_logic().check_dataset(settings.dataset, settings.unlabeled)
            self.ui.statusLabel.text = summary
        except (DatasetError, TrainingUnavailableError) as e:
            self.ui.statusLabel.text = str(e)

    def onTrain(self, *unused) -> None:
        try:
            launcher = lambda args, env: slicer.util.launchConsoleProcess(args, updateEnvironment=env)  # noqa: E731
            self._run = self.logic.train_logic().start_training(self._settings(), launcher)
        except (DatasetError, TrainingUnavailableError) as e:
            self.ui.statusLabel.text = str(e)
            return
        self.ui.logTextEdit.clear()
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = _("Training started.")
        self._setBusy(True)
        self._pollTimer.start()

    def onStop(self, *unused) -> None:
        if self._run is not None:
            self._run.stop()
            self.ui.statusLabel.text = _("Stopping after the current step...")

    def _setBusy(self, busy: bool) -> None:
        self.ui.trainButton.enabled = not busy
        self.ui.checkDatasetButton.enabled = not busy
        self.ui.stopButton.enabled = busy

    def _poll(self) -> None:
        if self._run is None:
            self._pollTimer.stop()
            return
        for msg in self._run.poll():
            if msg.kind == process.LOG:
                self.ui.logTextEdit.appendPlainText(msg.text)
            elif msg.kind == process.PROGRESS:
                if msg.fraction is None:
                    self.ui.progressBar.setRange(0, 0)
                else:
                    self.ui.progressBar.setRange(0, 1000)
                    self.ui.progressBar.value = int(round(1000 * msg.fraction))
                self.ui.statusLabel.text = msg.text
            elif msg.kind == process.FINISHED:
                if msg.stopped:
                    self.ui.statusLabel.text = _("Training stopped.")
                elif msg.returncode == 0:
                    self.ui.statusLabel.text = _("Training finished: {path}").format(path=self._settings().output)
                else:
                    self.ui.statusLabel.text = _("Training failed (exit code {code}); see the log.").format(code=msg.returncode)
        if self._run.finished:
            self._pollTimer.stop()
            self._run = None
            self.ui.progressBar.setRange(0, 1000)
            self._setBusy(False)


#
# SSSTrainLogic
#


class SSSTrainLogic(ScriptedLoadableModuleLogic):
    """Slicer-side wrapper of SSSTrainLib.logic.TrainLogic (the GUI-free part)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SSSTrainParameterNode(super().getParameterNode())

    @staticmethod
    def statusText(versionInfo) -> str:
        """The panel's blocking message on Slicer < 5.10, else ""."""
        if tuple(versionInfo[:2]) < MINIMUM_PYTHON:
            return _(
                "SSS needs 3D Slicer 5.10 or newer (Python 3.10+); this Slicer runs Python {major}.{minor}."
            ).format(major=versionInfo[0], minor=versionInfo[1])
        return ""

    @staticmethod
    def train_logic() -> TrainLogic:
        """A TrainLogic using this Slicer's Python (PythonSlicer) and this extension's sss_lib."""
        from SSSSegmentLib.paths import ensure_sss_lib_importable

        root = ensure_sss_lib_importable(os.path.dirname(os.path.abspath(__file__)))
        return TrainLogic(python=sys.executable, sss_lib_root=root)


#
# SSSTrainTest
#


class SSSTrainTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_status_text()
        if sys.version_info >= MINIMUM_PYTHON:
            self.setUp()
            self.test_training_unavailable_is_explained()

    def test_status_text(self):
        self.assertIn("5.10", SSSTrainLogic.statusText((3, 9, 10)))
        self.assertEqual(SSSTrainLogic.statusText((3, 12, 0)), "")
        self.delayDisplay("Version message test passed")

    def test_training_unavailable_is_explained(self):
        logic = SSSTrainLogic.train_logic()
        if "train" in logic.sss_lib_commands():
            self.delayDisplay("sss_lib has a train command")
            return
        with self.assertRaises(TrainingUnavailableError):
            logic.train_command(TrainSettings(dataset="/data/ds", output="/data/model.ssstask"))
        self.delayDisplay("Training-unavailable test passed")
