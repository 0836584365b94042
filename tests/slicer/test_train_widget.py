"""SSSTrain's panel (SSSTrainWidget) driven through its buttons, without the Slicer application.

MRML is real (slicer-core) and so are the training processes (the stand-in trainer of
SSSTrainLib.fake_trainer, started and stopped for real). Qt is not available outside Slicer, so
the widgets are stand-ins built from the names in SSSTrain.ui: each holds the PythonQt-style
properties the panel sets (``text``, ``value``, ``enabled``, ``visible``) and records signal
connections; unknown attributes raise, so a misspelt widget call fails here. What is checked is
the panel's behaviour: which buttons are enabled when, what the status line says, that the log,
progress and curves follow the run, and that a reopened panel finds its run again.
"""

import importlib.util
import os
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "SSSTrain" / "Resources" / "UI" / "SSSTrain.ui"


# A failing test must not leave a stand-in trainer running: tests/slicer/conftest.py.
pytestmark = pytest.mark.usefixtures("no_training_left_behind")


# -- Qt stand-ins ----------------------------------------------------------------------------------------


class FakeWidget:
    """A widget of the .ui file: PythonQt-style properties, recorded connections."""

    _PROPERTIES = {"text": "", "value": 0, "enabled": True, "visible": True, "toolTip": "", "width": 400,
                   "wordWrap": False}

    def __init__(self, cls: str, name: str) -> None:
        self.__dict__.update(self._PROPERTIES, cls=cls, name=name, connections={}, items=[], lines=[], pixmap=None)

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self.connections.get(signal, []):
            slot(*args)

    def setMRMLScene(self, scene):
        pass

    # QPlainTextEdit
    def appendPlainText(self, text):
        self.lines.append(text)

    def clear(self):
        self.lines.clear()
        self.items.clear()

    # QListWidget
    def addItem(self, item):
        self.items.append(item)

    # QLabel
    def setPixmap(self, pixmap):
        self.pixmap = pixmap

    def __setattr__(self, name, value):
        if name not in self.__dict__:
            raise AttributeError(f"{self.cls} {self.name} has no property {name!r}")
        self.__dict__[name] = value


class FakeItem:
    def __init__(self, text=""):
        self.text, self._flags, self._check, self._data = text, 0, None, {}

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = flags

    def setCheckState(self, state):
        self._check = state

    def checkState(self):
        return self._check

    def setData(self, role, value):
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)


class FakePixmap:
    def __init__(self, path=None):
        self.path = path

    def isNull(self):
        return self.path is None or not os.path.isfile(self.path)

    def scaledToWidth(self, width, mode=None):
        return self


class FakeTimer:
    pending = []

    def __init__(self):
        self.active = False

    def setInterval(self, ms):
        pass

    def connect(self, signal, slot):
        self.slot = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    @staticmethod
    def singleShot(ms, fn):
        FakeTimer.pending.append(fn)


def flush():
    while FakeTimer.pending:
        FakeTimer.pending.pop(0)()


def make_qt(clipboard: list, settings: dict):
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QListWidgetItem = FakeItem
    qt.QPixmap = FakePixmap
    qt.Qt = types.SimpleNamespace(ItemIsUserCheckable=16, Checked=2, Unchecked=0, UserRole=32, SmoothTransformation=1)
    qt.QSettings = lambda: types.SimpleNamespace(value=settings.get, setValue=settings.__setitem__)
    qt.QApplication = types.SimpleNamespace(clipboard=lambda: types.SimpleNamespace(setText=clipboard.append))
    return qt


# -- Slicer application stand-ins -------------------------------------------------------------------------


def make_slicer_stubs(slicer):
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)

        def setup(self):
            pass

        def resourcePath(self, name):
            return str(REPO / "SSSTrain" / "Resources" / name)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode("SSSTrain", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("SSSTrain")
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, lo, hi):
            self.lo, self.hi = lo, hi

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)

        class Wrapper:
            """Fields with their defaults, kept on a real scripted-module node whose Modified
            event fires on every change (what observers of the real wrapper see)."""

            def __init__(self, node):
                object.__setattr__(self, "parameterNode", node)
                for name in hints:
                    object.__setattr__(self, name, getattr(cls, name, None))

            def __setattr__(self, name, value):
                object.__setattr__(self, name, value)
                self.parameterNode.Modified()

            def AddObserver(self, *args):
                return self.parameterNode.AddObserver(*args)

            def RemoveObserver(self, *args):
                return self.parameterNode.RemoveObserver(*args)

            def connectGui(self, ui):
                return "tag"

            def disconnectGui(self, tag):
                pass

        Wrapper.hints = hints
        return Wrapper

    pnw.parameterNodeWrapper, pnw.Choice, pnw.WithinRange = parameterNodeWrapper, Choice, WithinRange
    return {"slicer.ScriptedLoadableModule": slm, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw,
            "ctk": types.ModuleType("ctk")}


class Panel:
    """SSSTrain's widget on stand-ins, plus what it showed the user."""

    def __init__(self, module, recorder):
        self.module = module
        self.recorder = recorder
        self.widget = module.SSSTrainWidget()
        self.widget.setup()
        flush()

    @property
    def ui(self):
        return self.widget.ui

    def pn(self):
        return self.widget._parameterNode

    def poll_until(self, predicate, timeout=60.0):
        import time

        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; status: {self.ui.statusLabel.text!r}"
            self.widget._poll()
            flush()
            time.sleep(0.02)


@pytest.fixture
def panel_factory(slicer_core, scene, monkeypatch, tmp_path):
    import slicer.util

    from SSSTrainLib import testing

    clipboard, settings = [], {}
    recorder = types.SimpleNamespace(errors=[], confirms=[], confirm_answer=True, selected=[], clipboard=clipboard,
                                     segment_parameters=types.SimpleNamespace(model="auto", taskModelPath=None))
    for name, mod in make_slicer_stubs(slicer_core).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "qt", make_qt(clipboard, settings))
    monkeypatch.setattr(sys, "path", list(sys.path))

    def ui_widgets(path):
        root = ET.parse(path).getroot()
        return types.SimpleNamespace(**{w.get("name"): FakeWidget(w.get("class"), w.get("name")) for w in root.iter("widget")})

    def confirm(text, **kwargs):
        recorder.confirms.append(text)
        return recorder.confirm_answer

    class NoWaitCursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(slicer.util, "loadUI", lambda path: FakeWidget("qMRMLWidget", "SSSTrain"))
    ui_cache = {}
    monkeypatch.setattr(slicer.util, "childWidgetVariables",
                        lambda widget: ui_cache.setdefault(id(widget), ui_widgets(UI_FILE)))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: recorder.errors.append(text))
    monkeypatch.setattr(slicer.util, "WaitCursor", NoWaitCursor)
    monkeypatch.setattr(slicer.util, "selectModule", recorder.selected.append)
    monkeypatch.setattr(slicer.util, "getModuleLogic",
                        lambda name: types.SimpleNamespace(getParameterNode=lambda: recorder.segment_parameters))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)

    spec = importlib.util.spec_from_file_location("SSSTrain", REPO / "SSSTrain" / "SSSTrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.SSSTrainLogic, "train_logic",
                        classmethod(lambda cls, entry=None: testing.fake_logic(sss_lib_root=str(REPO))))
    FakeTimer.pending.clear()

    def make():
        panel = Panel(module, recorder)
        panel.widget._dependenciesChecked = True  # torch & co. are this venv's
        return panel

    make.module = module
    yield make
    FakeTimer.pending.clear()


def test_train_stop_reopen_resume_and_use_the_model(panel_factory, scene, tmp_path):
    from SSSTrainLib import testing

    panel = panel_factory()
    ui = panel.ui
    assert not ui.labeledFolderPathLineEdit.visible and ui.casesListWidget.visible  # labeled cases from the scene
    assert [i.text if isinstance(i, FakeItem) else i for i in ui.casesListWidget.items][0].startswith("(no cases")

    nodes = testing.build_scene(scene)
    flush()
    items = ui.casesListWidget.items
    assert [i.text.split("  <-")[0] for i in items] == ["Case A (CT)", "Case B", "Case C"]
    assert [i.checkState() for i in items] == [2, 2, 0], "Case C was left out in the scene"
    items[1].setCheckState(0)
    ui.casesListWidget.emit("itemChanged(QListWidgetItem*)", items[1])
    assert nodes["seg_b"].GetAttribute("SSSTrain.Excluded") == "1"
    items[1].setCheckState(2)
    ui.casesListWidget.emit("itemChanged(QListWidgetItem*)", items[1])

    panel.pn().unlabeledSource = "scene"
    flush()
    assert len(ui.casesListWidget.items) == 4 and ui.casesListWidget.items[-1].text.endswith("(unlabeled)")

    ui.checkDataButton.emit("clicked(bool)")
    assert "2 labeled case(s); classes 1 liver, 2 tumour" in ui.dataSummaryLabel.text

    run_dir = str(tmp_path / "run")
    panel.pn().runFolder = Path(run_dir)
    panel.pn().iterations = 40
    panel.pn().warmupIterations = 5
    flush()
    assert ui.startButton.enabled and not ui.stopButton.enabled and not ui.resumeButton.enabled
    assert not ui.useModelButton.enabled

    ui.startButton.emit("clicked(bool)")
    assert not panel.recorder.errors, panel.recorder.errors
    assert not ui.startButton.enabled and ui.stopButton.enabled
    panel.poll_until(lambda: ui.statusLabel.text.startswith("Step ") and ui.progressBar.value > 0)
    assert "ETA" in ui.statusLabel.text
    panel.poll_until(lambda: ui.validationLabel.text.startswith("Validation at step"))
    assert ui.curvesLabel.pixmap is not None and ui.curvesLabel.pixmap.path == os.path.join(run_dir, "curves.png")
    assert any(line.startswith("starting: 40 steps") for line in ui.logTextEdit.lines)

    ui.stopButton.emit("clicked(bool)")
    assert ui.stopButton.text == "Kill"
    panel.poll_until(lambda: panel.widget._monitor is None)
    assert ui.statusLabel.text.startswith("Training stopped at step") and "Resume" in ui.statusLabel.text
    assert ui.startButton.enabled and ui.resumeButton.enabled and not ui.stopButton.enabled
    assert ui.stopButton.text == "Stop"

    # Slicer restarted: a new panel on the same scene shows the run folder's state.
    reopened = panel_factory()
    rui = reopened.ui
    assert rui.statusLabel.text.startswith("This folder holds a run, last at step") and "'Resume' continues it." in rui.statusLabel.text
    assert rui.resumeButton.enabled and rui.curvesLabel.pixmap is not None

    rui.resumeButton.emit("clicked(bool)")
    reopened.poll_until(lambda: reopened.widget._monitor is None)
    assert rui.statusLabel.text.startswith("Training finished at step 40"), rui.statusLabel.text
    assert rui.progressBar.value == 1000 and rui.useModelButton.enabled

    rui.useModelButton.emit("clicked(bool)")
    assert reopened.recorder.selected == ["SSSSegment"]
    params = reopened.recorder.segment_parameters
    assert str(params.taskModelPath) == os.path.join(run_dir, "model.ssstask") and params.model == "task model (file)"

    rui.copyCommandButton.emit("clicked(bool)")
    text = reopened.recorder.clipboard[-1]
    assert "python -m sss_lib train --labeled" in text and "torchrun --nproc_per_node 2 -m sss_lib train" in text

    # Start in a used folder asks first; Cancel leaves everything as it was.
    reopened.recorder.confirm_answer = False
    rui.startButton.emit("clicked(bool)")
    assert "earlier run" in reopened.recorder.confirms[-1] and reopened.widget._monitor is None
    assert os.path.isfile(os.path.join(run_dir, "model.ssstask"))


def test_a_reopened_panel_follows_and_stops_a_running_run(panel_factory, scene, tmp_path):
    from SSSTrainLib import testing

    testing.build_scene(scene)
    panel = panel_factory()
    panel.pn().runFolder = Path(tmp_path / "run")
    panel.pn().iterations = 5000
    panel.pn().warmupIterations = 5
    flush()
    panel.ui.startButton.emit("clicked(bool)")
    panel.poll_until(lambda: panel.ui.statusLabel.text.startswith("Step "))
    panel.widget.cleanup()  # the module panel is closed; the run goes on

    reopened = panel_factory()
    ui = reopened.ui
    assert reopened.widget._monitor is not None and not reopened.widget._monitor.owned
    assert ui.statusLabel.text == "Following the run in this folder (started earlier)." or ui.statusLabel.text.startswith("Step ")
    assert ui.stopButton.enabled and not ui.startButton.enabled and not ui.resumeButton.enabled
    reopened.poll_until(lambda: ui.statusLabel.text.startswith("Step "))
    ui.stopButton.emit("clicked(bool)")
    reopened.poll_until(lambda: reopened.widget._monitor is None)
    assert ui.statusLabel.text.startswith("Training stopped at step") and ui.resumeButton.enabled


def test_errors_are_shown_with_what_to_do(panel_factory, scene):
    panel = panel_factory()
    panel.ui.startButton.emit("clicked(bool)")
    assert panel.recorder.errors and "Choose a run folder" in panel.recorder.errors[-1]
    assert panel.ui.statusLabel.text == panel.recorder.errors[-1] and panel.widget._monitor is None


def test_old_slicer_gets_the_upgrade_message(panel_factory, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    panel = panel_factory()
    ui = panel.ui
    assert ui.versionWarningLabel.visible and "5.10" in ui.versionWarningLabel.text
    assert not ui.dataCollapsibleButton.enabled and not ui.trainingCollapsibleButton.enabled and not ui.runCollapsibleButton.enabled


def test_self_test_runs_as_ctest_runs_it(panel_factory):
    """ctest (slicer.testing.runUnitTest) loads SSSTrainTest with unittest: every test_* method on a
    fresh instance, with setUp and tearDown, not through runTest."""
    suite = unittest.TestLoader().loadTestsFromTestCase(panel_factory.module.SSSTrainTest)
    names = sorted(t._testMethodName for t in suite)
    assert names == ["test_class_values", "test_copy_command", "test_export_scene_cases", "test_failure",
                     "test_reattach", "test_start_stop_resume_use_model", "test_status_text"]
    result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(suite)
    assert result.wasSuccessful(), result.failures + result.errors
