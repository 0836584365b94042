"""Stand-ins for Slicer's Qt application, so the panels (SSSSegmentWidget, SSSTrainWidget) run
through their buttons without Slicer. MRML stays real (slicer-core).

The widgets are built from the names and classes in the module's .ui file: each holds the
PythonQt-style properties the panels set (``text``, ``value``, ``enabled``, ``visible``, ...) and
records signal connections; unknown attributes raise, so a misspelt widget call fails in a test.
Combo boxes know their items from the .ui file and emit ``currentIndexChanged(int)``; line edits
emit ``textChanged(QString)`` when their text is set, as Qt does.
"""

from __future__ import annotations

import importlib.util
import os
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class FakeWidget:
    """A widget of the .ui file: PythonQt-style properties, recorded connections."""

    _PROPERTIES = {"text": "", "value": 0, "enabled": True, "visible": True, "toolTip": "", "width": 400,
                   "wordWrap": False, "checked": False, "currentIndex": 0, "minimum": 0, "maximum": 100}

    def __init__(self, cls: str, name: str, choices: list[str] | None = None) -> None:
        self.__dict__.update(self._PROPERTIES, cls=cls, name=name, connections={}, items=[], lines=[], pixmap=None,
                             choices=list(choices or []), signals_blocked=False, current=None)

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        if self.signals_blocked:
            return
        for slot in list(self.connections.get(signal, [])):
            slot(*args)

    def click(self):
        """What a user's click does: nothing on a disabled button, else ``clicked(bool)``."""
        if self.enabled and self.visible:
            self.emit("clicked(bool)", False)

    def setMRMLScene(self, scene):
        pass

    def blockSignals(self, block):
        was, self.__dict__["signals_blocked"] = self.signals_blocked, bool(block)
        return was

    # QComboBox
    def findText(self, text):
        return self.choices.index(text) if text in self.choices else -1

    def setCurrentIndex(self, index):
        changed = index != self.currentIndex
        self.__dict__["currentIndex"] = index
        if changed:
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentText(self):
        return self.choices[self.currentIndex] if 0 <= self.currentIndex < len(self.choices) else ""

    # QProgressBar
    def setRange(self, lo, hi):
        self.__dict__.update(minimum=lo, maximum=hi)

    # QPlainTextEdit
    def appendPlainText(self, text):
        self.lines.append(text)

    def clear(self):
        self.lines.clear()
        self.items.clear()
        self.__dict__["current"] = None

    # QListWidget
    def addItem(self, item):
        self.items.append(item)

    def item(self, row):
        return self.items[row]

    @property
    def count(self):
        return len(self.items)

    def currentItem(self):
        return self.current

    def setCurrentItem(self, item):
        self.__dict__["current"] = item

    def setCurrentRow(self, row):
        self.__dict__["current"] = self.items[row] if 0 <= row < len(self.items) else None

    @property
    def currentRow(self):
        return self.items.index(self.current) if self.current in self.items else -1

    # QLabel
    def setPixmap(self, pixmap):
        self.pixmap = pixmap

    def __setattr__(self, name, value):
        if name not in self.__dict__:
            raise AttributeError(f"{self.cls} {self.name} has no property {name!r}")
        old = self.__dict__[name]
        self.__dict__[name] = value
        if name == "text" and value != old and self.cls == "QLineEdit":
            self.emit("textChanged(QString)", value)


class FakeItem:
    def __init__(self, text=""):
        self._text, self._flags, self._check, self._data = text, 0, None, {}

    @property
    def text(self):  # QListWidgetItem.text() is a method in PythonQt; the panels read it both ways
        return _CallableStr(self._text)

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

    def setIcon(self, icon):
        pass


class _CallableStr(str):
    def __call__(self):
        return str(self)


class FakePixmap:
    def __init__(self, path=None, *size):
        self.path = path if isinstance(path, str) else None

    def isNull(self):
        return self.path is None or not os.path.isfile(self.path)

    def scaledToWidth(self, width, mode=None):
        return self

    def fill(self, color):
        pass


class FakeTimer:
    pending = []

    def __init__(self):
        self.active = False
        self.slot = None

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
    qt.QColor = lambda *rgb: rgb
    qt.QIcon = lambda pixmap: pixmap
    qt.Qt = types.SimpleNamespace(ItemIsUserCheckable=16, ItemIsEditable=2, Checked=2, Unchecked=0, UserRole=32,
                                  SmoothTransformation=1)
    qt.QSettings = lambda: types.SimpleNamespace(value=settings.get, setValue=settings.__setitem__)
    qt.QApplication = types.SimpleNamespace(clipboard=lambda: types.SimpleNamespace(setText=clipboard.append))
    return qt


def ui_widgets(path: Path) -> types.SimpleNamespace:
    """One FakeWidget per widget of a .ui file (combo boxes with their items)."""
    root = ET.parse(path).getroot()
    widgets = {}
    for w in root.iter("widget"):
        choices = [i.find("property").findtext("string") for i in w.findall("item")] if w.get("class") == "QComboBox" else []
        widgets[w.get("name")] = FakeWidget(w.get("class"), w.get("name"), choices)
    return types.SimpleNamespace(**widgets)


def make_slicer_stubs(slicer, module: str):
    """``slicer.ScriptedLoadableModule``, ``slicer.i18n``, ``slicer.parameterNodeWrapper`` and ``ctk``
    stand-ins for ``module`` (its Resources folder and parameter node singleton tag)."""
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
            return str(REPO / module / "Resources" / name)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(module, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(module)
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


class NoWaitCursor:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def install_application(monkeypatch, slicer, module: str, recorder) -> types.ModuleType:
    """Put the stand-ins in place for ``module`` and load its file as Slicer does; returns the module.

    ``recorder`` collects what the panel showed: ``errors``, ``confirms`` (answered with
    ``recorder.confirm_answer``), ``selected`` modules, ``clipboard``, and ``settings`` (the
    application settings, a dict).
    """
    import sys

    import slicer.util

    for name, mod in make_slicer_stubs(slicer, module).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "qt", make_qt(recorder.clipboard, recorder.settings))
    monkeypatch.setattr(sys, "path", list(sys.path))

    def confirm(text, **kwargs):
        recorder.confirms.append(text)
        return recorder.confirm_answer

    ui_file = REPO / module / "Resources" / "UI" / f"{module}.ui"
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: FakeWidget("qMRMLWidget", module))
    ui_cache = {}
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui_cache.setdefault(id(widget), ui_widgets(ui_file)))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: recorder.errors.append(text))
    monkeypatch.setattr(slicer.util, "WaitCursor", NoWaitCursor)
    monkeypatch.setattr(slicer.util, "selectModule", recorder.selected.append)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)

    spec = importlib.util.spec_from_file_location(module, REPO / module / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    FakeTimer.pending.clear()
    return mod


def recorder(**extra) -> types.SimpleNamespace:
    return types.SimpleNamespace(errors=[], confirms=[], confirm_answer=True, selected=[], clipboard=[], settings={},
                                 **extra)


class TrainPanel:
    """SSSTrain's widget on stand-ins (``module`` from :func:`install_application`), plus what it
    showed the user (``recorder``). ``poll_until`` drives the widget's timer by hand every
    ``poll_interval`` seconds, for at most ``timeout`` seconds (``poll_timeout`` by default)."""

    def __init__(self, module, recorder, poll_timeout: float = 60.0, poll_interval: float = 0.02):
        self.module = module
        self.recorder = recorder
        self.poll_timeout = poll_timeout
        self.poll_interval = poll_interval
        self.widget = module.SSSTrainWidget()
        self.widget.setup()
        flush()

    @property
    def ui(self):
        return self.widget.ui

    def pn(self):
        return self.widget._parameterNode

    def poll_until(self, predicate, timeout: typing.Optional[float] = None) -> None:
        import time

        deadline = time.monotonic() + (self.poll_timeout if timeout is None else timeout)
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; status: {self.ui.statusLabel.text!r}"
            self.widget._poll()
            flush()
            time.sleep(self.poll_interval)
