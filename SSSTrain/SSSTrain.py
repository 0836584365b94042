import logging
import os
import pathlib
import shutil
import sys
from typing import Annotated, Optional

import qt
import vtk

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

from SSSTrainLib import constants as C

# This file must import on Slicer 5.6/5.8 (Python 3.9): no "X | None", no match statements, and
# sss_lib (Python 3.10+) is imported only inside functions, after the version check.

MINIMUM_PYTHON = (3, 10)
# Mirrors sss_lib.backbones.registry.BACKBONE_NAMES without "auto" (training needs a definite
# backbone); tests/slicer/test_static.py checks it against the registry and the .ui file.
BACKBONES = ["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large", "litemedsam"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
SETTINGS_LAST_RUN = "SSSTrain/lastRunFolder"  # QSettings: a restarted Slicer finds the last run
# Disabled while a step of the panel runs (an export, an upload, a package install, a data check): a
# second click never starts a second one, so an export never deletes a folder another export writes.
# tests/slicer/test_static.py checks each name in the .ui.
BUSY_WIDGETS = [
    "startButton", "resumeButton", "copyCommandButton", "checkDataButton", "useModelButton", "refreshCasesButton",
    "runFolderPathLineEdit", "labeledSourceComboBox", "labeledFolderPathLineEdit", "unlabeledSourceComboBox",
    "unlabeledFolderPathLineEdit", "casesListWidget", "computeOnComboBox", "serverUrlLineEdit", "serverTokenLineEdit",
]


def _inSlicerApplication() -> bool:
    """True inside the Slicer application; False with only MRML (slicer-core: tests, PythonSlicer)."""
    return callable(getattr(getattr(slicer, "app", None), "startupEnvironment", None))


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
            "Train an SSS task model from a few labeled and many unlabeled volumes: semi-supervised SAM-2 "
            "fine-tuning with DFE and PCSW prompts. Labeled cases are the scene's volumes with their segmentations "
            "(or a dataset folder); training runs in a separate process that goes on when Slicer closes, and the "
            "panel follows it again when reopened. 'Use this model' hands the result to SSS Segment for "
            "Auto-segment. Needs Slicer 5.10 or newer."
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
    """The panel's state, saved with the scene (SSSTrainLib.settings.TrainSettings says what each means).

    labeledSource / labeledFolder: scene pairs, or a dataset folder.
    unlabeledSource / unlabeledFolder: none, a folder of volumes, or the scene's unpaired volumes.
    backbone, device, iterations, runFolder: the run.
    warmupIterations ... encoderLoraRank: the method's settings and switches (the Advanced section).
    gpus: the GPU count of Copy command's torchrun line.
    """

    labeledSource: Annotated[str, Choice(C.LABELED_SOURCES)] = C.SOURCE_SCENE
    labeledFolder: pathlib.Path
    unlabeledSource: Annotated[str, Choice(C.UNLABELED_SOURCES)] = C.SOURCE_NONE
    unlabeledFolder: pathlib.Path
    backbone: Annotated[str, Choice(BACKBONES)] = "sam2.1_hiera_tiny"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    iterations: Annotated[int, WithinRange(1, 10000000)] = C.DEFAULT_ITERATIONS
    runFolder: pathlib.Path
    warmupIterations: Annotated[int, WithinRange(0, 10000000)] = C.DEFAULT_WARMUP
    useWarmupPlateau: bool = True
    lambdaU: Annotated[float, WithinRange(0.0, 100.0)] = C.DEFAULT_LAMBDA_U
    confidence: Annotated[float, WithinRange(0.0, 1.0)] = C.DEFAULT_CONFIDENCE
    emaDecay: Annotated[float, WithinRange(0.0, 0.99999)] = C.DEFAULT_EMA_DECAY
    useDfe: bool = True
    usePcsw: bool = True
    useConsistency: bool = True
    seed: Annotated[int, WithinRange(0, 2147483647)] = C.DEFAULT_SEED
    weakViews: Annotated[int, WithinRange(0, 16)] = 0
    useClassGuard: bool = True
    useAdaptiveThresholds: bool = False
    useDfeToDecoder: bool = False
    useMemoryPath: bool = False
    encoderBlocks: Annotated[int, WithinRange(0, 24)] = 0
    encoderLoraRank: Annotated[int, WithinRange(0, 64)] = 0
    gpus: Annotated[int, WithinRange(1, 64)] = C.DEFAULT_GPUS


def _pathText(path) -> str:
    text = str(path or "")
    return "" if text == "." else text


#
# SSSTrainWidget
#


class SSSTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Training runs in its own process on this computer (a QTimer follows its files,
    SSSTrainLib.monitor) or as a job of an SSS server (the QTimer polls it, SSSTrainLib.remote)."""

    POLL_MS = 500

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._monitor = None
        self._pollTimer = None
        self._runFolderShown = None
        self._folderStatus = None
        self._updatingCases = False
        self._dependenciesChecked = False
        self._curvesPixmap = None
        self._casesShownFor = None
        self._casesRefreshPending = False
        self._busy = None
        self._computeOn = None

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSSTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SSSTrainLogic()
        from SSSSegmentLib.busy import BusyState
        from SSSSegmentLib.service_link import ComputeOnControls

        self._busy = BusyState(self.ui, BUSY_WIDGETS, on_change=self._updateButtons)
        self._computeOn = ComputeOnControls(self.ui, qt.QSettings)
        self._computeOn.connect()
        self._computeOn.show()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._onSceneNodesChanged)

        self.ui.refreshCasesButton.connect("clicked(bool)", self._refreshCases)
        self.ui.casesListWidget.connect("itemChanged(QListWidgetItem*)", self._onCaseToggled)
        self.ui.checkDataButton.connect("clicked(bool)", self.onCheckData)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.useModelButton.connect("clicked(bool)", self.onUseModel)
        self.ui.copyCommandButton.connect("clicked(bool)", self.onCopyCommand)

        self.initializeParameterNode()

        if sys.version_info < MINIMUM_PYTHON:
            self.ui.versionWarningLabel.text = SSSTrainLogic.statusText(sys.version_info)
            self.ui.versionWarningLabel.visible = True
            for box in (self.ui.dataCollapsibleButton, self.ui.trainingCollapsibleButton, self.ui.runCollapsibleButton):
                box.enabled = False
            return
        self._restoreLastRunFolder()
        self._onRunFolderChanged()

    def cleanup(self) -> None:
        # A run goes on without the panel (it is a separate process); the next panel finds it again.
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._computeOn.show()
        self._refreshCases()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def _onSceneNodesChanged(self, caller, event) -> None:
        # A scene load adds many nodes: refresh once, after the events.
        if not self._casesRefreshPending:
            self._casesRefreshPending = True
            qt.QTimer.singleShot(0, self._refreshCases)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[SSSTrainParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        fromFolder = pn.labeledSource == C.SOURCE_FOLDER
        for w in (self.ui.labeledFolderLabel, self.ui.labeledFolderPathLineEdit):
            w.visible = fromFolder
        unlabeledFolder = pn.unlabeledSource == C.SOURCE_FOLDER
        for w in (self.ui.unlabeledFolderLabel, self.ui.unlabeledFolderPathLineEdit):
            w.visible = unlabeledFolder
        sceneCases = pn.labeledSource == C.SOURCE_SCENE or pn.unlabeledSource == C.SOURCE_SCENE
        for w in (self.ui.casesLabel, self.ui.casesListWidget, self.ui.refreshCasesButton):
            w.visible = sceneCases
        if _pathText(pn.runFolder) != self._runFolderShown:
            qt.QTimer.singleShot(0, self._onRunFolderChanged)
        sources = (pn.labeledSource, pn.unlabeledSource)
        if sources != self._casesShownFor:
            self._casesShownFor = sources
            qt.QTimer.singleShot(0, self._refreshCases)
        self._updateButtons()

    # -- helpers -----------------------------------------------------------------------------------
    def _runFolder(self) -> str:
        return _pathText(self._parameterNode.runFolder) if self._parameterNode else ""

    def _settings(self):
        from SSSTrainLib.settings import TrainSettings

        pn = self._parameterNode
        return TrainSettings(
            run_dir=_pathText(pn.runFolder),
            labeled_source=pn.labeledSource, labeled_folder=_pathText(pn.labeledFolder),
            unlabeled_source=pn.unlabeledSource, unlabeled_folder=_pathText(pn.unlabeledFolder),
            backbone=pn.backbone, device=pn.device, iterations=int(pn.iterations),
            warmup_iterations=int(pn.warmupIterations), warmup_plateau=bool(pn.useWarmupPlateau),
            lambda_u=float(pn.lambdaU), confidence=float(pn.confidence),
            ema_decay=float(pn.emaDecay), dfe=bool(pn.useDfe), pcsw=bool(pn.usePcsw),
            consistency=bool(pn.useConsistency), seed=int(pn.seed), weak_views=int(pn.weakViews),
            class_guard=bool(pn.useClassGuard), adaptive_thresholds=bool(pn.useAdaptiveThresholds),
            dfe_to_decoder=bool(pn.useDfeToDecoder), memory_path=bool(pn.useMemoryPath),
            encoder_blocks=int(pn.encoderBlocks), encoder_lora_rank=int(pn.encoderLoraRank),
        )

    def _showError(self, error, title: str) -> None:
        from SSSTrainLib.errors import TrainUserError

        from SSSSegmentLib.errors import UserFacingError

        known = isinstance(error, (TrainUserError, UserFacingError))
        try:
            from sss_lib.errors import SSSError

            known = known or isinstance(error, SSSError)
        except ImportError:
            pass
        message = str(error) if known else "{title}: {error}".format(title=title, error=error)
        self.ui.statusLabel.text = message
        if not known:
            logging.exception(title)
        slicer.util.errorDisplay(message, windowTitle=title)

    def _ensureReady(self, local: bool = True) -> bool:
        """Python version and, to train on this computer, packages (torch, sam2, ...), checked and
        installed on first use, as in SSS Segment. A server job needs none of them here."""
        from SSSSegmentLib import dependencies

        dependencies.check_python(sys.version_info)
        if self._dependenciesChecked or not local:
            return True
        ok = dependencies.ensure_dependencies_in_slicer()
        self._dependenciesChecked = ok
        if not ok:
            self.ui.statusLabel.text = _("Missing Python packages were not installed; nothing was started.")
        return ok

    def _progress(self, text: str, fraction: Optional[float]) -> None:
        self.ui.statusLabel.text = text
        if fraction is not None:
            self.ui.progressBar.value = int(round(1000 * fraction))
        slicer.app.processEvents()

    # -- scene cases -------------------------------------------------------------------------------
    def _refreshCases(self, *unused) -> None:
        self._casesRefreshPending = False
        if self.logic is None or self._parameterNode is None:
            return
        pn = self._parameterNode
        if C.SOURCE_SCENE not in (pn.labeledSource, pn.unlabeledSource):
            return
        labeled, unlabeled = self.logic.train_logic_class().scene_cases(slicer.mrmlScene)
        shown = (labeled if pn.labeledSource == C.SOURCE_SCENE else []) + (
            unlabeled if pn.unlabeledSource == C.SOURCE_SCENE else [])
        self._updatingCases = True
        try:
            self.ui.casesListWidget.clear()
            for case in shown:
                item = qt.QListWidgetItem(case.describe())
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if case.included else qt.Qt.Unchecked)
                item.setData(qt.Qt.UserRole, case.node.GetID())
                self.ui.casesListWidget.addItem(item)
            if not shown:
                self.ui.casesListWidget.addItem(_("(no cases in the scene: load volumes and segment them)"))
        finally:
            self._updatingCases = False

    def _onCaseToggled(self, item) -> None:
        if self._updatingCases:
            return
        from SSSTrainLib.scene_cases import set_included

        nodeId = item.data(qt.Qt.UserRole)
        node = slicer.mrmlScene.GetNodeByID(nodeId) if nodeId else None
        if node is not None:
            set_included(node, item.checkState() == qt.Qt.Checked)

    def onCheckData(self, *unused) -> None:
        with self._busy.hold("check data") as started:
            if not started:
                return
            try:
                with slicer.util.WaitCursor():
                    summary = self.logic.train_logic().check_data(self._settings(), slicer.mrmlScene)
                self.ui.dataSummaryLabel.text = summary
            except Exception as e:
                self.ui.dataSummaryLabel.text = str(e)

    # -- runs --------------------------------------------------------------------------------------
    def _link(self):
        """The service link SSS Segment shares (its settings say this computer or a server)."""
        from SSSSegmentLib.service_link import slicer_link

        link = slicer_link(os.path.dirname(os.path.abspath(__file__)))
        link.configure(self._computeOn.settings())
        return link

    def _serverClient(self, link=None):
        """The server's client when "Compute on" is a server, else None (training runs here)."""
        link = link if link is not None else self._link()
        return None if link.is_local else link.poll()

    def onStart(self, *unused) -> None:
        with self._busy.hold("start") as started:
            if started:
                self._start()

    def _start(self) -> None:
        try:
            link = self._link()
            if not self._ensureReady(local=link.is_local):  # "Compute on: server" installs nothing here
                return
            client = self._serverClient(link)
            logic = self.logic.train_logic()
            settings = self._settings()
            status = self._runFolderStatus(settings.run_dir)
            if status.has_run and not status.running:
                if not slicer.util.confirmOkCancelDisplay(
                    _("The run folder holds an earlier run. Start over? Its files move to the folder 'previous' "
                      "inside the run folder. (Press Cancel, then Resume, to continue that run instead.)")
                ):
                    return
                logic.archive_previous_run(settings.run_dir)
            self._clearRunDisplay()
            if client is not None:
                from SSSTrainLib import remote

                with slicer.util.WaitCursor():
                    monitor = remote.submit(logic, settings, slicer.mrmlScene, client, progress=self._progress)
                self._follow(monitor)
                self.ui.statusLabel.text = _("Training job {job} submitted to {url}.").format(
                    job=monitor.job.job_id, url=client.url)
                return
            with slicer.util.WaitCursor():
                monitor = logic.start(settings, slicer.mrmlScene, progress=self._progress)
            self._follow(monitor)
            self.ui.statusLabel.text = _("Training started (process {pid}).").format(pid=monitor.pid)
        except Exception as e:
            self._showError(e, _("Could not start training"))

    def onResume(self, *unused) -> None:
        with self._busy.hold("resume") as started:
            if started:
                self._resume()

    def _resume(self) -> None:
        from SSSTrainLib import remote

        try:
            job = remote.read_job(self._runFolder())
            if job is not None:
                client = self._jobClient(job)
                monitor = remote.resume(job, client)
                self._follow(monitor)
                self.ui.statusLabel.text = _("Resuming job {job} on {url}.").format(job=job.job_id, url=job.url)
                return
            if not self._ensureReady():
                return
            monitor = self.logic.train_logic().resume(self._runFolder(), self._settings())
            self._follow(monitor)
            self.ui.statusLabel.text = _("Resuming (process {pid}).").format(pid=monitor.pid)
        except Exception as e:
            self._showError(e, _("Could not resume training"))

    def _jobClient(self, job):
        """The client of the server ``job`` runs on; the panel must point at that server."""
        from SSSTrainLib.errors import RunFolderError

        client = self._serverClient()
        if client is None or client.url.rstrip("/") != job.url.rstrip("/"):
            raise RunFolderError(
                "This run is a job on the SSS server {url}: set 'Compute on' to server with that address "
                "(and its token) to follow, stop or resume it.".format(url=job.url))
        return client

    def _runFolderStatus(self, runFolder: str):
        """What the run folder holds: a local run (files, process) or a server job (asked there)."""
        from SSSTrainLib import remote
        from SSSTrainLib.logic import RunFolderStatus

        job = remote.read_job(runFolder)
        if job is None:
            return self.logic.train_logic().run_status(runFolder)
        model = os.path.join(runFolder, C.MODEL_FILE)
        status = RunFolderStatus(has_run=True, model=model if os.path.isfile(model) else "", running=None)
        try:
            record = remote.job_status(job, self._jobClient(job))
        except Exception as e:
            logging.warning("SSS Train: cannot ask the server about job %s: %s", job.job_id, e)
            return status
        state = str(record.get("state", ""))
        status.running = state in remote.JOB_ACTIVE_STATES
        status.can_resume = state in ("stopped", "interrupted")
        return status

    def onStop(self, *unused) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        if not monitor.stop_requested:
            monitor.stop()
            self.ui.statusLabel.text = _("Stopping at the next clean point; a checkpoint is written first...")
            self.ui.stopButton.text = _("Kill")
            self.ui.stopButton.toolTip = _("End the training process now, without a checkpoint.")
            return
        if monitor.pid is None or monitor.alive() is not True:
            self.ui.statusLabel.text = _("The training cannot be killed from this computer (a server job, or a process "
                                         "elsewhere); it stops at its next clean point.")
            return
        if slicer.util.confirmOkCancelDisplay(
            _("Kill the training process now? Progress since its last checkpoint is lost.")
        ):
            from SSSTrainLib.process import kill_process_tree

            kill_process_tree(monitor.pid)

    def _follow(self, monitor) -> None:
        self._monitor = monitor
        self._runFolderShown = monitor.run_dir
        qt.QSettings().setValue(SETTINGS_LAST_RUN, monitor.run_dir)
        self.ui.stopButton.text = _("Stop")
        self.ui.stopButton.toolTip = _("Ask the run to stop at its next clean point, with a checkpoint.")
        self._updateButtons()
        self._pollTimer.start()
        self._poll()

    def _detach(self) -> None:
        """Stop following (the run itself goes on)."""
        self._pollTimer.stop()
        self._monitor = None

    def _clearRunDisplay(self) -> None:
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.validationLabel.text = ""
        self._curvesPixmap = None
        self.ui.curvesLabel.setPixmap(qt.QPixmap())
        self.ui.curvesLabel.wordWrap = True
        self.ui.curvesLabel.text = _("Loss and validation-Dice curves appear here after the first validation.")

    def _restoreLastRunFolder(self) -> None:
        if self._parameterNode is None or self._runFolder():
            return
        last = qt.QSettings().value(SETTINGS_LAST_RUN)
        if last and os.path.isdir(str(last)):
            self._parameterNode.runFolder = pathlib.Path(str(last))

    def _onRunFolderChanged(self) -> None:
        """Show what the chosen run folder holds, and follow its run if one is going."""
        if self.logic is None or sys.version_info < MINIMUM_PYTHON:
            return
        runFolder = self._runFolder()
        if self._monitor is not None and self._monitor.run_dir == runFolder:
            return
        if self._monitor is not None:
            self._detach()
        self._runFolderShown = runFolder
        self._clearRunDisplay()
        try:
            self._folderStatus = self._runFolderStatus(runFolder)
            monitor = self._attach(runFolder) if runFolder else None
        except Exception as e:
            logging.warning("SSS Train: cannot read the run folder %s: %s", runFolder, e)
            self._folderStatus, monitor = None, None
        if monitor is not None:
            self._follow(monitor)
            self.ui.statusLabel.text = _("Following the run in this folder (started earlier).")
            return
        self._showFolderStatus()
        self._updateButtons()

    def _attach(self, runFolder: str):
        """A monitor of the run going on in ``runFolder`` (a local process or a server job), or None."""
        from SSSTrainLib import remote

        job = remote.read_job(runFolder)
        if job is None:
            return self.logic.train_logic().attach(runFolder)
        if not (self._folderStatus is not None and self._folderStatus.running):
            return None
        client = self._jobClient(job)
        return remote.RemoteJobMonitor(job, lambda: client, backlog=remote.ATTACH_LINES)

    def _showFolderStatus(self) -> None:
        from SSSTrainLib import monitor as M

        status = self._folderStatus
        if status is None or not status.has_run:
            self.ui.statusLabel.text = _("Choose the training data and a run folder, then Start.")
            return
        if status.last_step is not None:
            self.ui.progressBar.value = int(round(1000 * (M.fraction(status.last_step) or 0.0)))
            text = _("This folder holds a run, last at step {step} of {total}.").format(
                step=status.last_step.step, total=status.last_step.total_steps)
        else:
            text = _("This folder holds a run.")
        if status.model:
            text += " " + _("Its task model is ready: 'Use this model'.")
        if status.can_resume:
            text += " " + _("'Resume' continues it.")
        from SSSTrainLib import remote

        job = remote.read_job(self._runFolder())
        if job is not None:
            text += " " + _("It is job {job} on the SSS server {url}.").format(job=job.job_id, url=job.url)
        self.ui.statusLabel.text = text
        self._loadCurves(os.path.join(self._runFolder(), C.CURVES_FILE))

    def _poll(self) -> None:
        from SSSTrainLib import monitor as M

        monitor = self._monitor
        if monitor is None:
            self._pollTimer.stop()
            return
        for msg in monitor.poll():
            if msg.kind == M.LOG:
                self.ui.logTextEdit.appendPlainText(msg.text)
            elif msg.kind == M.EVENT:
                record = msg.record
                fraction = M.fraction(record)
                if fraction is not None and record.event in ("start", "step", "done"):
                    self.ui.progressBar.value = int(round(1000 * fraction))
                if record.event == "val":
                    self.ui.validationLabel.text = M.describe(record)
                elif record.event != "checkpoint" and not (monitor.stop_requested and record.event == "step"):
                    self.ui.statusLabel.text = M.describe(record)
            elif msg.kind == M.FINISHED:
                self.ui.statusLabel.text = msg.text
                if msg.outcome == M.DONE:
                    self.ui.progressBar.value = 1000
        curves = monitor.curves_update()
        if curves:
            self._loadCurves(curves)
        if monitor.finished:
            self._detach()
            self._folderStatus = self._runFolderStatus(monitor.run_dir)
            self.ui.stopButton.text = _("Stop")
        self._updateButtons()

    def _loadCurves(self, path: str) -> None:
        if not os.path.isfile(path):
            return
        pixmap = qt.QPixmap(path)
        if pixmap.isNull():
            return
        self._curvesPixmap = pixmap
        width = max(200, self.ui.curvesLabel.width)
        self.ui.curvesLabel.wordWrap = False  # a word-wrapped label sizes itself by its text, not its picture
        self.ui.curvesLabel.setPixmap(pixmap.scaledToWidth(width, qt.Qt.SmoothTransformation))

    def _updateButtons(self) -> None:
        running = self._monitor is not None
        runFolder = self._runFolder()
        status = self._folderStatus
        self.ui.startButton.enabled = not running
        self.ui.stopButton.enabled = running
        self.ui.resumeButton.enabled = not running and status is not None and status.can_resume
        self.ui.useModelButton.enabled = bool(runFolder) and os.path.isfile(os.path.join(runFolder, C.MODEL_FILE))
        if self._busy is not None:
            self._busy.apply()

    # -- results -----------------------------------------------------------------------------------
    def onUseModel(self, *unused) -> None:
        with self._busy.hold("use model") as started:
            if started:
                self._useModel()

    def _useModel(self) -> None:
        try:
            from SSSSegmentLib import constants as SC

            segmentParameters = slicer.util.getModuleLogic("SSSSegment").getParameterNode()
            path = self.logic.train_logic().hand_over_model(self._runFolder(), segmentParameters, SC.TASK_MODEL_CHOICE)
            slicer.util.selectModule("SSSSegment")
            logging.info("SSS Train: SSS Segment now uses the task model %s", path)
        except Exception as e:
            self._showError(e, _("Could not hand the model to SSS Segment"))

    def onCopyCommand(self, *unused) -> None:
        with self._busy.hold("export") as started:
            if started:
                self._copyCommand()

    def _copyCommand(self) -> None:
        try:
            with slicer.util.WaitCursor():
                text = self.logic.train_logic().copy_command(
                    self._settings(), slicer.mrmlScene, int(self._parameterNode.gpus), progress=self._progress)
            qt.QApplication.clipboard().setText(text)
            self.ui.logTextEdit.appendPlainText(text)
            self.ui.statusLabel.text = _("The training command lines are on the clipboard (and in the log below).")
        except Exception as e:
            self._showError(e, _("Could not make the command"))


#
# SSSTrainLogic
#


class SSSTrainLogic(ScriptedLoadableModuleLogic):
    """Slicer-side wrapper of SSSTrainLib.logic.TrainLogic (the GUI-free part). From the Python console:

        logic = slicer.util.getModuleLogic("SSSTrain").train_logic()
        settings = TrainSettings(run_dir="/data/runs/liver")  # from SSSTrainLib.settings
        monitor = logic.start(settings, slicer.mrmlScene)      # then monitor.poll(), monitor.stop()
    """

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
    def python() -> str:
        """The interpreter for training: PythonSlicer inside Slicer, this interpreter elsewhere."""
        if _inSlicerApplication():
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    @staticmethod
    def train_logic_class():
        from SSSTrainLib.logic import TrainLogic

        return TrainLogic

    @classmethod
    def train_logic(cls, entry=None):
        """A TrainLogic using this Slicer's Python and this extension's sss_lib."""
        from SSSSegmentLib.paths import ensure_sss_lib_importable

        root = ensure_sss_lib_importable(os.path.dirname(os.path.abspath(__file__)))
        baseEnv = slicer.util.startupEnvironment() if _inSlicerApplication() else None
        return cls.train_logic_class()(python=cls.python(), sss_lib_root=root, entry=entry, base_env=baseEnv)


#
# SSSTrainTest
#


class SSSTrainTest(ScriptedLoadableModuleTest):
    """The scenarios of tests/slicer (SSSTrainLib/testing.py), run inside Slicer with real MRML and
    real processes: first what a user does (a short real training on tiny phantoms, its model handed
    to SSS Segment, Auto-segment with it through the SSS service), then the run-control scenarios
    (a stand-in trainer that follows the run contract)."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self._tempFolders = []

    def tearDown(self):
        for folder in getattr(self, "_tempFolders", []):
            shutil.rmtree(folder, ignore_errors=True)
        self._tempFolders = []

    def runTest(self):
        self.setUp()
        self.test_status_text()
        if sys.version_info < MINIMUM_PYTHON:
            return
        for test in (self.test_train_phantoms_then_auto_segment, self.test_export_scene_cases, self.test_class_values,
                     self.test_start_stop_resume_use_model,
                     self.test_reattach, self.test_failure, self.test_copy_command):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    def _logic(self):
        from SSSTrainLib import testing

        logic = SSSTrainLogic.train_logic(entry=[SSSTrainLogic.python(), testing.FAKE_TRAINER])
        logic.extra_env[testing.STEP_ENV] = "0.03"
        return logic

    def _runDir(self) -> str:
        import tempfile

        folder = tempfile.mkdtemp(prefix="SSSTrainTest-")
        self._tempFolders.append(folder)
        return os.path.join(folder, "run")

    def test_status_text(self):
        self.assertIn("5.10", SSSTrainLogic.statusText((3, 9, 10)))
        self.assertEqual(SSSTrainLogic.statusText((3, 12, 0)), "")
        self.delayDisplay("Version message test passed")

    def test_export_scene_cases(self):
        from SSSTrainLib import testing

        self.delayDisplay("Scene cases -> nnU-Net v2 raw dataset")
        testing.scenario_export_scene_cases(slicer.mrmlScene, self._logic(), self._runDir())
        self.delayDisplay("Export passed")

    def test_class_values(self):
        from SSSTrainLib import testing

        testing.scenario_class_values_follow_sss_tags(slicer.mrmlScene)
        self.delayDisplay("Class table passed")

    def _segmentParameters(self):
        if _inSlicerApplication() and hasattr(slicer.modules, "ssssegment"):
            return slicer.util.getModuleLogic("SSSSegment").getParameterNode()
        import types

        return types.SimpleNamespace(model="auto", taskModelPath=None)  # SSS Segment not loaded

    def _segmentLogic(self):
        if _inSlicerApplication() and hasattr(slicer.modules, "ssssegment"):
            return slicer.util.getModuleLogic("SSSSegment")
        from SSSSegmentLib.logic import SegmentLogic

        return SegmentLogic()  # what SSSSegmentLogic adds to it is Slicer's module plumbing

    def test_train_phantoms_then_auto_segment(self):
        from SSSSegmentLib import constants as SC
        from SSSSegmentLib.service_link import ComputeSettings, slicer_link
        from SSSTrainLib import testing

        self.delayDisplay("A short training on tiny phantoms, then Auto-segment with its model in SSS Segment")
        link = slicer_link(os.path.dirname(os.path.abspath(__file__)))
        link.configure(ComputeSettings())  # the SSS service on this computer, on SSS Segment's device
        result = testing.scenario_train_phantoms_then_auto_segment(
            slicer.mrmlScene, SSSTrainLogic.train_logic(), self._runDir(), self._segmentLogic(),
            self._segmentParameters(), SC.TASK_MODEL_CHOICE, link)
        self.delayDisplay("Training and Auto-segment passed: trained in {train:.0f} s, segmented in {seg:.0f} s "
                          "(classes segmented {done}, absent {absent})".format(
                              train=result["train_seconds"], seg=result["segment_seconds"], done=result["segmented"],
                              absent=result["absent"]))

    def test_start_stop_resume_use_model(self):
        from SSSSegmentLib import constants as SC
        from SSSTrainLib import testing

        self.delayDisplay("Start, stop, resume, use the model")
        testing.scenario_train_stop_resume(slicer.mrmlScene, self._logic(), self._runDir(), self._segmentParameters(),
                                           SC.TASK_MODEL_CHOICE)
        self.delayDisplay("Run control passed")

    def test_reattach(self):
        from SSSTrainLib import testing

        self.delayDisplay("A reopened panel finds the run still going")
        testing.scenario_reattach(slicer.mrmlScene, self._logic, self._runDir())
        self.delayDisplay("Re-attach passed")

    def test_failure(self):
        from SSSTrainLib import testing

        runDir = self._runDir()
        testing.scenario_failure_is_reported(self._logic(), runDir, os.path.join(os.path.dirname(runDir), "no such data"))
        self.delayDisplay("Failure report passed")

    def test_copy_command(self):
        from SSSTrainLib import testing

        testing.scenario_copy_command(slicer.mrmlScene, self._logic(), self._runDir())
        self.delayDisplay("Copy command passed")
