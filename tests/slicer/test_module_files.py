"""Import the module files as Slicer does and run their self-tests, with the *application* parts
stubbed: Qt, CTK, ScriptedLoadableModule, i18n and parameterNodeWrapper are not in slicer-core.

MRML stays real (slicer-core): the stubs only let ``SSSSegment.py`` / ``SSSTrain.py`` import, so the
module, logic and test classes run for real. The stub ``parameterNodeWrapper`` evaluates the class's
annotations with ``typing.get_type_hints`` as the real one does, which is where a Python 3.9-only
mistake in the wrapper would show. Widgets are not exercised here (they need Slicer's Qt).
"""

import importlib.util
import sys
import types
import typing

import pytest

from panel_stubs import REPO, make_slicer_stubs


def _load(module: str):
    spec = importlib.util.spec_from_file_location(module, REPO / module / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def app(slicer_core, scene, monkeypatch):
    # The application's stand-ins of the panel tests (the parameter node singleton tag of SSSSegment
    # serves both modules here); Qt is an empty module: no widget is built.
    for name, mod in make_slicer_stubs(slicer_core, "SSSSegment").items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return slicer_core


def test_segment_module_declares_itself(app):
    mod = _load("SSSSegment")
    parent = types.SimpleNamespace()
    mod.SSSSegment(parent)
    assert parent.title and parent.categories == ["Segmentation"] and parent.contributors
    assert parent.helpText and parent.acknowledgementText and "5.10" in parent.helpText


def test_segment_parameter_node_types(app):
    from SSSSegmentLib import constants as C

    hints = _load("SSSSegment").SSSSegmentParameterNode.hints
    assert hints["inputVolume"] is app.vtkMRMLScalarVolumeNode
    assert hints["outputSegmentation"] is app.vtkMRMLSegmentationNode
    model = typing.get_args(hints["model"])
    assert model[0] is str and model[1].choices == C.MODEL_CHOICES
    import pathlib

    assert hints["taskModelPath"] is pathlib.Path


def test_segment_self_test_runs_the_scenarios(app):
    """SSSSegmentTest.runTest, as slicer.selfTests['SSSSegment'] would call it."""
    mod = _load("SSSSegment")
    test = mod.SSSSegmentTest()
    ran = []
    # The user's path (lung sample, panel, service) runs for real in test_self_tests.py; here: that
    # runTest runs it, and the logic scenarios.
    test.test_panel_segments_lung_sample = lambda: ran.append("panel")
    test.runTest()
    assert ran == ["panel"]
    logic = mod.SSSSegmentLogic()
    assert logic.getParameterNode().parameterNode.GetSingletonTag() == "SSSSegment"


def test_train_module_loads_and_self_tests(app):
    sys.path.insert(0, str(REPO / "SSSTrain"))
    mod = _load("SSSTrain")
    hints = mod.SSSTrainParameterNode.hints
    assert typing.get_args(hints["iterations"])[0] is int and typing.get_args(hints["backbone"])[1].choices == mod.BACKBONES
    parent = types.SimpleNamespace()
    mod.SSSTrain(parent)
    assert parent.title and parent.categories and parent.contributors and parent.acknowledgementText
    test = mod.SSSTrainTest()
    ran = []
    # The real training and Auto-segment run in test_self_tests.py; here: that runTest runs them.
    test.test_train_phantoms_then_auto_segment = lambda: ran.append("train")
    test.runTest()
    assert ran == ["train"]
