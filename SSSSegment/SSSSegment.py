import logging
import os
import pathlib
import sys
import time
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
)

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from SSSSegmentLib import constants as C
from SSSSegmentLib import edit_guard
from SSSSegmentLib.busy import BusyState
from SSSSegmentLib.errors import UserFacingError
from SSSSegmentLib.geometry import matrix_from_vtk
from SSSSegmentLib.inputs import default_input_volume
from SSSSegmentLib.service_link import ComputeOnControls
from SSSSegmentLib.logic import SegmentLogic, labels_to_write, status_text
from SSSSegmentLib.markups import class_visible, find_class, point_is_positive
from SSSSegmentLib.paths import ensure_sss_lib_importable

# This file must import on Slicer 5.6/5.8 (Python 3.9): no "X | None", no match statements, and
# sss_lib (Python 3.10+) is imported only inside functions, after the version check.

# Disabled while the panel is busy (a run, a package install): nothing may start twice, and the run's
# inputs stay as they were when it started. tests/slicer/test_static.py checks each name in the .ui.
BUSY_WIDGETS = [
    "segmentButton", "rerunButton", "autoSegmentButton", "inputVolumeSelector", "modelComboBox",
    "taskModelPathLineEdit", "deviceComboBox", "sliceAxisComboBox", "outputSegmentationSelector",
    "computeOnComboBox", "serverUrlLineEdit", "serverTokenLineEdit", "addClassButton", "removeClassButton",
    "addBoxButton", "addPositivePointButton", "addNegativePointButton", "notOnSliceButton", "clearPromptsButton",
    "showHideButton",
]


#
# SSSSegment
#


class SSSSegment(ScriptedLoadableModule):
    """Promptable SAM-2 segmentation of a volume with boxes and points, or automatic with a task model."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SSS Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Markups", "Segmentations"]
        self.parent.contributors = ["SSS Extension developers (SSS project)"]
        self.parent.helpText = _(
            "Segment a volume with SAM-2.1 or LiteMedSAM from boxes and points placed on a key slice, "
            "propagated through the volume slice by slice. With a task model made by SSS Train, "
            "Auto-segment places the prompts itself. Edited prompts are never overwritten by a re-run, "
            "and a re-run recomputes only the classes whose prompts changed. Needs Slicer 5.10 or newer."
        )
        self.parent.acknowledgementText = _(
            "Based on SAM-2 (Meta AI), LiteMedSAM (Bo Wang lab) and the SSS method of Zhu et al. "
            "(Semi-Supervised SAM-2 with Efficient Prompting for Medical Imaging Segmentation)."
        )
        ensure_sss_lib_importable(os.path.dirname(os.path.abspath(__file__)))


#
# SSSSegmentParameterNode
#


@parameterNodeWrapper
class SSSSegmentParameterNode:
    """The panel's state, saved with the scene.

    inputVolume: the volume to segment.
    model: a backbone name, or the task-model entry (then taskModelPath is used).
    taskModelPath: a task-model file made by SSSTrain.
    device: auto, cpu, cuda or mps.
    sliceAxis: the stack axis (auto = largest spacing).
    outputSegmentation: where results go (created on the first run when empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Choice(C.MODEL_CHOICES)] = "auto"
    taskModelPath: pathlib.Path
    device: Annotated[str, Choice(C.DEVICE_CHOICES)] = "auto"
    sliceAxis: Annotated[str, Choice(C.SLICE_AXIS_CHOICES)] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode


#
# SSSSegmentWidget
#


class SSSSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Inference runs in the SSS service (this computer or a server), never in Slicer's
    process; a QTimer advances the run with short requests (SSSSegmentLib/service_run.py)."""

    POLL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._runFinish = None
        self._runStarted = 0.0
        self._busy = None
        self._computeOn = None
        self._dependenciesChecked = False
        self._updatingClassList = False
        self._pollTimer = None

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SSSSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SSSSegmentLogic()
        self.logic.edit_listeners.append(self._onPromptEdited)
        self._busy = BusyState(self.ui, BUSY_WIDGETS, on_change=self._updateButtons)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._pollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodeRemoved)

        self.ui.addClassButton.connect("clicked(bool)", self.onAddClass)
        self.ui.newClassNameLineEdit.connect("returnPressed()", self.onAddClass)
        self.ui.removeClassButton.connect("clicked(bool)", self.onRemoveClass)
        self.ui.addBoxButton.connect("clicked(bool)", self.onAddBox)
        self.ui.addPositivePointButton.connect("clicked(bool)", lambda *unused: self.onAddPoint(True))
        self.ui.addNegativePointButton.connect("clicked(bool)", lambda *unused: self.onAddPoint(False))
        self.ui.notOnSliceButton.connect("clicked(bool)", self.onNotOnSlice)
        self.ui.showHideButton.connect("toggled(bool)", self.onShowHide)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPrompts)
        self.ui.classListWidget.connect("currentRowChanged(int)", self._updateButtons)
        self.ui.classListWidget.connect("itemChanged(QListWidgetItem*)", self.onClassRenamed)
        self.ui.autoSegmentButton.connect("clicked(bool)", self.onAutoSegment)
        self.ui.segmentButton.connect("clicked(bool)", lambda *unused: self.onSegment(False))
        self.ui.rerunButton.connect("clicked(bool)", self.onRerun)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self._computeOn = ComputeOnControls(self.ui, qt.QSettings)
        self._computeOn.connect()

        self.initializeParameterNode()
        self._computeOn.show()

        if sys.version_info < C.MINIMUM_PYTHON:
            self._showVersionWarning()

    def _showVersionWarning(self) -> None:
        from SSSSegmentLib.dependencies import check_python
        from SSSSegmentLib.errors import NeedsNewerSlicerError

        try:
            check_python(sys.version_info)
        except NeedsNewerSlicerError as e:
            self.ui.versionWarningLabel.text = str(e)
        self.ui.versionWarningLabel.visible = True
        for box in (self.ui.inputsCollapsibleButton, self.ui.promptsCollapsibleButton, self.ui.runCollapsibleButton):
            box.enabled = False

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.watcher.unwatch_all()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._computeOn.show()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneNodeRemoved(self, caller, event) -> None:
        # A class's markups may have been deleted in the Data module: refresh lazily.
        qt.QTimer.singleShot(0, self._refreshClasses)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = default_input_volume(slicer.mrmlScene)  # never a label map or an RGB volume
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SSSSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._refreshClasses()

    # -- helpers -----------------------------------------------------------------------------------
    def _volume(self):
        return self._parameterNode.inputVolume if self._parameterNode else None

    def _selectedLabel(self) -> Optional[int]:
        item = self.ui.classListWidget.currentItem()
        return int(item.data(qt.Qt.UserRole)) if item is not None else None

    def _taskModelPath(self) -> Optional[str]:
        if not self._parameterNode:
            return None
        text = str(self._parameterNode.taskModelPath or "")
        return text if text not in ("", ".") else None

    def _refreshClasses(self) -> None:
        """Rebuild the class list from the scene (the markups are the source of truth)."""
        if self.logic is None:
            return
        volume = self._volume()
        selected = self._selectedLabel()
        self._updatingClassList = True
        try:
            self.ui.classListWidget.clear()
            classes = self.logic.classes(volume)
            for nodes in classes:
                item = qt.QListWidgetItem(self._classItemText(nodes))
                item.setData(qt.Qt.UserRole, nodes.label)
                item.setFlags(item.flags() | qt.Qt.ItemIsEditable)
                pixmap = qt.QPixmap(14, 14)
                pixmap.fill(qt.QColor(*nodes.color))
                item.setIcon(qt.QIcon(pixmap))
                self.ui.classListWidget.addItem(item)
                if nodes.label == selected:
                    self.ui.classListWidget.setCurrentItem(item)
            if self.ui.classListWidget.currentRow < 0 and classes:
                self.ui.classListWidget.setCurrentRow(0)
            if volume is not None:
                self.logic.watch(volume)
        finally:
            self._updatingClassList = False
        self._updateButtons()

    @staticmethod
    def _classItemText(nodes) -> str:
        n_pos = sum(1 for i in range(nodes.points.GetNumberOfControlPoints()) if point_is_positive(nodes.points, i))
        n_neg = nodes.points.GetNumberOfControlPoints() - n_pos
        n_box = len(nodes.defined_boxes())
        n_absent = nodes.absent.GetNumberOfControlPoints() if nodes.absent is not None else 0
        absent = f", absent on {n_absent} slice(s)" if n_absent else ""
        return f"{nodes.name}   [label {nodes.label}, {nodes.source}: {n_box} box, {n_pos} +, {n_neg} -{absent}]"

    def _updateButtons(self, *unused) -> None:
        busy = self._busy is not None and self._busy.active
        hasVolume = self._volume() is not None
        label = self._selectedLabel()
        for button in (self.ui.addBoxButton, self.ui.addPositivePointButton, self.ui.addNegativePointButton,
                       self.ui.notOnSliceButton, self.ui.clearPromptsButton, self.ui.removeClassButton,
                       self.ui.showHideButton):
            button.enabled = hasVolume and label is not None and not busy
        self.ui.addClassButton.enabled = hasVolume and not busy
        hasClasses = self.ui.classListWidget.count > 0
        self.ui.segmentButton.enabled = hasVolume and hasClasses and not busy
        self.ui.rerunButton.enabled = hasVolume and hasClasses and not busy
        isTaskModel = bool(self._parameterNode and self._parameterNode.model == C.TASK_MODEL_CHOICE)
        self.ui.autoSegmentButton.enabled = hasVolume and isTaskModel and self._taskModelPath() is not None and not busy
        self.ui.autoSegmentButton.toolTip = (
            "Make prompts for every class with the task model, then segment."
            if self.ui.autoSegmentButton.enabled
            else "Needs a task model: choose 'task model (file)' as the model and select its file."
        )
        self.ui.cancelButton.enabled = self._run is not None
        nodes = find_class(slicer.mrmlScene, self._volume(), label) if label is not None and hasVolume else None
        if nodes is not None and not busy:
            wasBlocked = self.ui.showHideButton.blockSignals(True)
            self.ui.showHideButton.checked = class_visible(nodes)
            self.ui.showHideButton.blockSignals(wasBlocked)
        if self._busy is not None:
            self._busy.apply()

    def _onPromptEdited(self, label: int) -> None:
        qt.QTimer.singleShot(0, self._refreshClasses)

    # -- classes and prompts -----------------------------------------------------------------------
    def onAddClass(self, *unused) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add the class."), waitCursor=False):
            name = self.ui.newClassNameLineEdit.text.strip() or None
            nodes = self.logic.add_class(self._volume(), name)
            self.ui.newClassNameLineEdit.text = ""
            self._refreshClasses()
            self._selectLabel(nodes.label)

    def _selectLabel(self, label: int) -> None:
        for row in range(self.ui.classListWidget.count):
            if int(self.ui.classListWidget.item(row).data(qt.Qt.UserRole)) == label:
                self.ui.classListWidget.setCurrentRow(row)

    def onRemoveClass(self, *unused) -> None:
        label = self._selectedLabel()
        if label is None:
            return
        if not slicer.util.confirmOkCancelDisplay(_("Delete the selected class and all its prompts?")):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not remove the class."), waitCursor=False):
            self.logic.remove_class(self._volume(), label)
            self._refreshClasses()

    def onClassRenamed(self, item) -> None:
        if self._updatingClassList:
            return
        label = int(item.data(qt.Qt.UserRole))
        name = item.text().split("   [")[0].strip()
        if name:
            self.logic.rename_class(self._volume(), label, name)
        qt.QTimer.singleShot(0, self._refreshClasses)

    def onAddBox(self, *unused) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start placing a box."), waitCursor=False):
            box = self.logic.begin_box(self._volume(), self._selectedLabel())
            self._startPlacing(box, persistent=False)

    def onAddPoint(self, positive: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start placing points."), waitCursor=False):
            points = self.logic.begin_point(self._volume(), self._selectedLabel(), positive)
            self._startPlacing(points, persistent=True)

    def onNotOnSlice(self, *unused) -> None:
        """Mark the selected class absent from the slice the Red view shows, or remove that mark."""
        label, volume = self._selectedLabel(), self._volume()
        if label is None or volume is None or (self._busy is not None and self._busy.active):
            return
        try:
            sliceNode = self._redSliceNode()
            if sliceNode is None:
                raise UserFacingError(_("There is no Red slice view: choose a layout that shows it."))
            index, marked = self.logic.toggle_not_on_slice(
                volume, label, self._parameterNode.sliceAxis, matrix_from_vtk(sliceNode.GetSliceToRAS()))
        except Exception as e:
            known = isinstance(e, UserFacingError)
            message = str(e) if known else _("Could not mark the slice: {error}").format(error=e)
            self.ui.statusLabel.text = message
            slicer.util.errorDisplay(message)
            return
        name = self.logic.class_nodes(volume, label).name
        if marked:
            text = _("Class '{name}' marked absent from slice {index}: propagation will not cross it.")
        else:
            text = _("Removed the 'not on this slice' mark of class '{name}' on slice {index}.")
        self.ui.statusLabel.text = text.format(name=name, index=index)
        self._refreshClasses()

    @staticmethod
    def _redSliceNode():
        """The Red slice view's node (its layout name; in Slicer its ID is vtkMRMLSliceNodeRed), or None."""
        nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceNode")
        for n in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(n)
            if node.GetLayoutName() == "Red":
                return node
        return None

    def _startPlacing(self, node, persistent: bool) -> None:
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(node)
        markupsLogic.StartPlaceMode(persistent)

    def onShowHide(self, visible: bool) -> None:
        label = self._selectedLabel()
        if label is not None:
            self.logic.set_class_visibility(self._volume(), label, visible)

    def onClearPrompts(self, *unused) -> None:
        label = self._selectedLabel()
        if label is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not clear the prompts."), waitCursor=False):
            self.logic.clear_class_prompts(self._volume(), label)
            self._refreshClasses()

    # -- where the work runs ("Compute on") ----------------------------------------------------------
    def _link(self):
        """The service link both panels share, pointed where the settings say."""
        from SSSSegmentLib.service_link import slicer_link

        link = slicer_link(os.path.dirname(os.path.abspath(__file__)))
        link.configure(self._computeOn.settings(), device=self._parameterNode.device)
        return link

    # -- runs --------------------------------------------------------------------------------------
    def _ensureReady(self, local: bool) -> bool:
        """Python version, and on this computer the packages the service needs (installed, if the
        user agrees, on first use). A server needs nothing here beyond sss_lib's torch-free client."""
        from SSSSegmentLib import dependencies

        dependencies.check_python(sys.version_info)
        if self._dependenciesChecked or not local:
            return True
        ok = dependencies.ensure_dependencies_in_slicer()
        if ok:
            try:
                import sss_lib  # noqa: F401
            except ImportError as e:
                raise UserFacingError(
                    f"The sss_lib package of this extension cannot be imported ({e}). Reinstall the SSS extension."
                ) from e
        self._dependenciesChecked = ok
        return ok

    def onSegment(self, rerun: bool = False) -> None:
        self._runSafely("segment", lambda link: self._startRun(link, rerun))

    def onRerun(self, *unused) -> None:
        self._runSafely("re-run", lambda link: self._startRun(link, True))

    def onAutoSegment(self, *unused) -> None:
        self._runSafely("auto-segment", lambda link: self._startAutoRun(link, False))

    def _runSafely(self, what: str, start) -> None:
        """Start a run unless the panel is busy; the busy state ends with the run, or here when
        nothing was started (declined install, bad input, an exception)."""
        if not self._busy.begin(what):
            return  # a click that arrived while busy (queued during an install or an upload)
        started = False
        try:
            link = self._link()
            if not self._ensureReady(link.is_local):
                self.ui.statusLabel.text = _("Missing Python packages were not installed; nothing was run.")
            else:
                started = bool(start(link))
        except Exception as e:
            self._showError(e)
        finally:
            if not started:
                self._busy.end()

    def _startRun(self, link, rerun: bool) -> bool:
        pn = self._parameterNode
        if pn.model == C.TASK_MODEL_CHOICE:
            # With a task model every run goes through PCSW, which keeps the user's edited classes.
            return self._startAutoRun(link, rerun)
        request = self.logic.prepare_run(pn.inputVolume, pn.model, pn.device, pn.sliceAxis, rerun)
        missing = self.logic.weights_to_download(pn.model) if link.is_local else None
        if missing is not None:
            name, url, size = missing
            sizeText = f" ({size / 1e6:.0f} MB)" if size else ""
            if not slicer.util.confirmOkCancelDisplay(
                _("The {name} model weights{size} are not downloaded yet. Download them now?").format(name=name, size=sizeText),
                detailedText=_("From: {url}\nOffline? Download the file elsewhere and put it into the SSS weights folder "
                               "(see 'python -m sss_lib weights list').").format(url=url),
            ):
                self.ui.statusLabel.text = _("Model weights not downloaded; nothing was run.")
                return False
            request.download_weights = True
        segmentationNode = pn.outputSegmentation
        run = self.logic.service_run(link, request, rerun)
        self._launch(run, self._resultWriter(
            request.volume_node_id, segmentationNode,
            lambda outcome, keep: self.logic.finish_run(request, outcome, segmentationNode, keep_edited=keep)))
        return True

    def _startAutoRun(self, link, rerun: bool) -> bool:
        pn = self._parameterNode
        request = self.logic.prepare_auto_run(pn.inputVolume, self._taskModelPath(), pn.device, rerun)
        segmentationNode = pn.outputSegmentation
        run = self.logic.service_auto_run(link, request)
        self._launch(run, self._resultWriter(
            request.volume_node_id, segmentationNode,
            lambda outcome, keep: self.logic.finish_auto_run(request, outcome, segmentationNode, keep_edited=keep)))
        return True

    @staticmethod
    def _resultWriter(volumeNodeId: str, segmentationNode, write):
        """The run's finish: if segments it rewrites were edited since SSS wrote them (Segment
        Editor), ask whether to overwrite them, keep the edited slices, or cancel; then
        ``write(outcome, keep_edited)``. Returns the segmentation node, or None when cancelled
        (nothing written)."""

        def finish(outcome):
            volumeNode = slicer.mrmlScene.GetNodeByID(volumeNodeId)
            answer = edit_guard.OVERWRITE
            if volumeNode is not None and segmentationNode is not None:  # else the write says what is wrong
                answer = edit_guard.ask_how_to_write(
                    slicer.mrmlScene, segmentationNode, volumeNode, labels_to_write(outcome.result))
            if answer == edit_guard.CANCEL:
                return None
            return write(outcome, answer == edit_guard.KEEP_EDITED)

        return finish

    def _launch(self, run, finish) -> None:
        self._run = run
        self._runFinish = finish
        self._runStarted = time.perf_counter()
        self.ui.progressBar.setRange(0, 0)  # busy until the first fraction arrives
        self.ui.statusLabel.text = _("Starting...")
        self._updateButtons()
        self._pollTimer.start()

    def onCancel(self, *unused) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current slice...")

    def _pollRun(self) -> None:
        """One timer tick: at most one short request to the service, then the panel follows."""
        from SSSSegmentLib import service_run as R

        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        try:
            for msg in run.step():
                if msg.kind == R.PROGRESS:
                    if msg.fraction is None:
                        self.ui.progressBar.setRange(0, 0)
                    else:
                        self.ui.progressBar.setRange(0, 1000)
                        self.ui.progressBar.value = int(round(1000 * msg.fraction))
                    if msg.text:
                        self.ui.statusLabel.text = msg.text
                elif msg.kind == R.DONE:
                    self._finishRun(msg.value)
                elif msg.kind == R.CANCELLED:
                    self._resetProgress()
                    self.ui.statusLabel.text = msg.text or _("Cancelled; nothing was changed.")
                elif msg.kind == R.FAILED:
                    self._resetProgress()
                    self._showError(msg.error, msg.text)
        except Exception as e:  # the busy state must end whatever happened
            run.finished = True
            self._showError(e)
        if run.finished:
            self._endRun()

    def _endRun(self) -> None:
        self._pollTimer.stop()
        self._run = None
        self._busy.end()
        self._updateButtons()

    def _resetProgress(self) -> None:
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.value = 0

    def _finishRun(self, outcome) -> None:
        try:
            node = self._runFinish(outcome)
            if node is None:  # the user chose to keep the segmentation as it is
                self._run.discard_session()  # so a Re-run recomputes, and asks, again
                self._resetProgress()
                self.ui.statusLabel.text = _("Result not written: the segmentation keeps your edits.")
                return
            self._parameterNode.outputSegmentation = node
            self._refreshClasses()
            wall = time.perf_counter() - self._runStarted
            where = outcome.device + (f", {outcome.location}" if outcome.location else "")
            self.ui.statusLabel.text = status_text(outcome.result, outcome.backbone_name, where) + (
                f" Total {wall:.1f} s."
            )
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = 1000
        except Exception as e:
            self._run.discard_session()  # the service's session no longer matches the scene
            self._resetProgress()
            self._showError(e)

    def _showError(self, error, message: str = "") -> None:
        """One error, shown in the status line and a dialog. ``message``: the text to show (already
        says what happened); otherwise it is made from ``error``."""
        known = isinstance(error, UserFacingError)
        try:
            from sss_lib.errors import SSSError

            known = known or isinstance(error, SSSError)
        except ImportError:
            pass
        if not message:
            message = str(error) if known else _("Segmentation failed: {error}").format(error=error)
            if not known:
                logging.error("SSS Segment: %r", error)
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message)


#
# SSSSegmentLogic
#


class SSSSegmentLogic(ScriptedLoadableModuleLogic, SegmentLogic):
    """GUI-free logic; see SSSSegmentLib/logic.py. Usable from the Python console:

        logic = slicer.util.getModuleLogic("SSSSegment")
        logic.add_class(volume, "tumour")  # then place a box in the "SSS tumour box" ROI
        # through the SSS service, as the panel does (the console waits until it is done):
        from SSSSegmentLib.service_link import slicer_link
        link = slicer_link(os.path.dirname(slicer.modules.sssegment.path))
        segmentation, outcome = logic.segment_through(link, volume, model="litemedsam")
    """

    def __init__(self, backbone_factory=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentLogic.__init__(self, backbone_factory=backbone_factory)
        ensure_sss_lib_importable(os.path.dirname(os.path.abspath(__file__)))

    def getParameterNode(self):
        return SSSSegmentParameterNode(super().getParameterNode())


#
# SSSSegmentTest
#


class SSSSegmentTest(ScriptedLoadableModuleTest):
    """The scenarios of tests/slicer (SSSSegmentLib/testing.py), run inside Slicer: first what a user
    does (the bundled lung sample segmented with LiteMedSAM through this panel's Segment button and
    the SSS service, checked by its Dice), then the geometry and provenance scenarios."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if sys.version_info < C.MINIMUM_PYTHON:
            self.setUp()
            self.test_old_slicer_message()
            return
        for test in (self.test_panel_segments_lung_sample, self.test_prompt_roundtrip, self.test_segment_geometry,
                     self.test_user_edit_survives_rerun):
            self.setUp()
            test()

    def _fixture(self):
        from SSSSegmentLib import testing

        moduleDir = os.path.dirname(os.path.abspath(__file__))
        volume = testing.sample_volume(slicer.mrmlScene, moduleDir)
        testing.make_oblique_with_transform(slicer.mrmlScene, volume)
        logic = SSSSegmentLogic(backbone_factory=lambda model, device: testing.make_box_backbone())
        return testing, logic, volume

    def test_old_slicer_message(self):
        from SSSSegmentLib.dependencies import check_python
        from SSSSegmentLib.errors import NeedsNewerSlicerError

        with self.assertRaises(NeedsNewerSlicerError):
            check_python(sys.version_info)
        self.delayDisplay("This Slicer is older than 5.10: the panel shows the upgrade message.")

    def test_panel_segments_lung_sample(self):
        from SSSSegmentLib import testing

        self.delayDisplay("The lung sample through the panel: a box, Segment, LiteMedSAM in the SSS service")
        widget = slicer.util.getModuleWidget("SSSSegment")
        moduleDir = os.path.dirname(os.path.abspath(__file__))
        result = testing.scenario_panel_segments_lung_sample(
            slicer.mrmlScene, widget, moduleDir, pump=lambda: (slicer.app.processEvents(), time.sleep(0.02)))
        self.delayDisplay("Lung sample passed: 3D Dice {dice:.3f} (at least {least}) in {seconds:.0f} s".format(
            dice=result["dice"], least=testing.LUNG_DICE_MIN, seconds=result["seconds"]))

    def test_prompt_roundtrip(self):
        self.delayDisplay("Prompts -> markups -> prompts, exact in physical space")
        testing, logic, volume = self._fixture()
        worst = testing.scenario_prompt_roundtrip(slicer.mrmlScene, logic, volume)
        self.assertLess(worst, 1e-4)
        self.delayDisplay("Round trip passed")

    def test_segment_geometry(self):
        self.delayDisplay("Segmentation on an oblique, transformed volume")
        testing, logic, volume = self._fixture()
        testing.scenario_segment_geometry(slicer.mrmlScene, logic, volume)
        self.delayDisplay("Geometry passed")

    def test_user_edit_survives_rerun(self):
        self.delayDisplay("A user-edited prompt survives re-runs")
        testing, logic, volume = self._fixture()
        testing.scenario_user_edit_survives_rerun(slicer.mrmlScene, logic, volume)
        self.delayDisplay("Provenance passed")
