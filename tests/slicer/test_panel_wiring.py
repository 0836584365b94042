"""The panels' wiring of library features (Qt stand-ins of panel_stubs.py, real MRML, no service):

* SSS Segment's "Not on this slice" button marks the selected class absent from the slice the Red
  slice view shows (a real vtkMRMLSliceNode), and a second click removes the mark;
* its default input is the first greyscale volume, not a label map added before it;
* SSS Train installs no local packages when "Compute on" is a server.
"""

import sys
import types

import numpy as np
import pytest

from panel_stubs import REPO, FakeTimer, flush, install_application, recorder as make_recorder


@pytest.fixture
def segment_panel(slicer_core, scene, monkeypatch):
    """``make()`` -> a set-up SSSSegmentWidget; ``make.recorder`` holds the errors it showed."""
    recorder = make_recorder()
    module = install_application(monkeypatch, slicer_core, "SSSSegment", recorder)

    def make():
        widget = module.SSSSegmentWidget()
        widget.setup()
        flush()
        return widget

    make.recorder, make.module = recorder, module
    yield make
    FakeTimer.pending.clear()


@pytest.fixture
def red_view(scene):
    """The Red slice view's node, as the Slicer application makes it (removed afterwards: the scene's
    Clear keeps singleton nodes)."""
    import slicer

    node = slicer.vtkMRMLSliceNode()
    node.SetLayoutName("Red")
    node = scene.AddNode(node)
    yield node
    scene.RemoveNode(node)


def show_slice(red, volume, index, tilt_deg=0.0, across="k"):
    """Point the Red view at slice ``index`` along ``volume``'s ``across`` voxel axis: centred on
    the slice's centre, its normal along that axis in world space, tilted by ``tilt_deg`` (as the
    default axial view is tilted against an oblique volume)."""
    from SSSSegmentLib import geometry

    to_world = geometry.ijk_to_world_ras(volume)
    dims = volume.GetImageData().GetDimensions()
    columns = to_world[:3, :3] / np.linalg.norm(to_world[:3, :3], axis=0)
    order = {"k": (0, 1, 2), "i": (1, 2, 0)}[across]
    x, y, normal = (columns[:, a] for a in order)
    t = np.radians(tilt_deg)
    normal, y = np.cos(t) * normal + np.sin(t) * y, np.cos(t) * y - np.sin(t) * normal
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2] = x, y, normal
    centre = np.array([(n - 1) / 2.0 for n in dims])
    centre["ijk".index(across)] = float(index)
    m[:3, 3] = geometry.apply(to_world, centre)
    red.GetSliceToRAS().DeepCopy(geometry.vtk_from_matrix(m))
    red.UpdateMatrices()


def marked_slices(volume, label, across="k"):
    from sss_lib.volume import SliceAxis

    from SSSSegmentLib import geometry, markups

    nodes = markups.find_class(volume.GetScene(), volume, label)
    axis = SliceAxis("ijk".index(across))
    return markups.not_on_slice_slices(nodes, np.linalg.inv(geometry.ijk_to_world_ras(volume)), axis)


def test_not_on_this_slice_marks_the_red_views_slice_and_a_second_click_removes_it(segment_panel, red_view, crop_volume):
    from SSSSegmentLib import constants as C
    from SSSSegmentLib import markups

    widget = segment_panel()
    ui = widget.ui
    widget._parameterNode.inputVolume = crop_volume  # 64 x 64 x 10, thickest along k: slice axis "auto" is k
    assert not ui.notOnSliceButton.enabled, "no class selected yet"
    nodes = widget.logic.add_class(crop_volume, "tumour")
    nodes.set_source(C.SOURCE_AUTO)
    widget._refreshClasses()
    assert ui.notOnSliceButton.enabled
    assert "notOnSliceButton" in segment_panel.module.BUSY_WIDGETS

    show_slice(red_view, crop_volume, 7, tilt_deg=12.0)  # an axial view is not exactly along an oblique volume's k
    ui.notOnSliceButton.click()
    assert not segment_panel.recorder.errors, segment_panel.recorder.errors
    assert marked_slices(crop_volume, nodes.label) == [7]
    assert ui.statusLabel.text == "Class 'tumour' marked absent from slice 7: propagation will not cross it."
    assert markups.find_class(crop_volume.GetScene(), crop_volume, nodes.label).source == C.SOURCE_USER
    assert ui.classListWidget.currentItem().text().endswith("absent on 1 slice(s)]")

    show_slice(red_view, crop_volume, 2)
    ui.notOnSliceButton.click()
    assert marked_slices(crop_volume, nodes.label) == [2, 7]
    show_slice(red_view, crop_volume, 7)
    ui.notOnSliceButton.click()  # the same slice again: the mark goes
    assert marked_slices(crop_volume, nodes.label) == [2]
    assert ui.statusLabel.text == "Removed the 'not on this slice' mark of class 'tumour' on slice 7."
    assert not segment_panel.recorder.errors

    # While a run goes the button is disabled, and a click Qt queued before that does nothing.
    widget._busy.begin("segment")
    assert not ui.notOnSliceButton.enabled
    ui.notOnSliceButton.emit("clicked(bool)", False)
    assert marked_slices(crop_volume, nodes.label) == [2]
    widget._busy.end()
    assert ui.notOnSliceButton.enabled


def test_not_on_this_slice_refusals_are_shown(segment_panel, red_view, crop_volume, tumour_box):
    from SSSSegmentLib import geometry, markups

    widget = segment_panel()
    ui = widget.ui
    errors = segment_panel.recorder.errors
    widget._parameterNode.inputVolume = crop_volume
    nodes = widget.logic.add_class(crop_volume, "tumour")
    widget._refreshClasses()
    axis = widget.logic.slice_axis(geometry.sss_volume_from_node(crop_volume), "auto")
    markups.write_box(widget.logic.begin_box(crop_volume, nodes.label), geometry.ijk_to_world_ras(crop_volume), axis, 5,
                      tumour_box)

    show_slice(red_view, crop_volume, 5)
    ui.notOnSliceButton.click()
    assert len(errors) == 1 and "has a box or points on slice 5" in errors[0], errors
    assert ui.statusLabel.text == errors[0]

    show_slice(red_view, crop_volume, 10, across="i")  # a sagittal view: its centre says nothing about k
    ui.notOnSliceButton.click()
    assert len(errors) == 2 and "across the volume's i axis" in errors[1] and "slice axis is k" in errors[1], errors

    widget._parameterNode.sliceAxis = "i"  # ...unless the run slices along i too
    ui.notOnSliceButton.click()
    assert len(errors) == 2, errors
    assert ui.statusLabel.text == "Class 'tumour' marked absent from slice 10: propagation will not cross it."
    assert marked_slices(crop_volume, nodes.label, across="i") == [10]

    red_view.GetScene().RemoveNode(red_view)
    ui.notOnSliceButton.click()
    assert len(errors) == 3 and "no Red slice view" in errors[2]
    marks = markups.find_class(crop_volume.GetScene(), crop_volume, nodes.label).absent
    assert marks.GetNumberOfControlPoints() == 1, "a refused click made a mark"


def test_default_input_is_the_first_greyscale_volume(segment_panel, scene):
    import slicer.util

    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label, np.zeros((4, 5, 6), dtype=np.uint8))
    ct = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), dtype=np.int16), name="CT")
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is label
    widget = segment_panel()
    assert widget._parameterNode.inputVolume is ct


@pytest.fixture
def train_panel(slicer_core, scene, monkeypatch):
    """``make(compute_settings)`` -> a set-up SSSTrainWidget whose dependency check is recorded."""
    import slicer.util

    from SSSSegmentLib import dependencies, service_link
    from SSSTrainLib import testing

    recorder = make_recorder(segment_parameters=types.SimpleNamespace(model="auto", taskModelPath=None), installs=[])
    module = install_application(monkeypatch, slicer_core, "SSSTrain", recorder)
    monkeypatch.setattr(slicer.util, "getModuleLogic",
                        lambda name: types.SimpleNamespace(getParameterNode=lambda: recorder.segment_parameters))
    monkeypatch.setattr(module.SSSTrainLogic, "train_logic",
                        classmethod(lambda cls, entry=None: testing.fake_logic(sss_lib_root=str(REPO))))

    def refuse_local(*args):
        raise AssertionError("the test started a local service")

    # A link of its own, which never starts a service (the session's shared link stays as it is).
    monkeypatch.setitem(service_link._SHARED, "link", service_link.ServiceLink(sys.executable, str(REPO),
                                                                                local_factory=refuse_local))
    monkeypatch.setattr(dependencies, "ensure_dependencies_in_slicer",
                        lambda *args, **kwargs: recorder.installs.append((args, kwargs)) or False)  # the user says no

    def make(settings):
        service_link.write_settings(types.SimpleNamespace(setValue=recorder.settings.__setitem__), settings)
        widget = module.SSSTrainWidget()
        widget.setup()
        flush()
        return widget

    make.recorder = recorder
    yield make
    FakeTimer.pending.clear()


def test_train_on_a_server_checks_no_local_packages(train_panel, tmp_path):
    import socket

    from SSSSegmentLib import service_link

    recorder = train_panel.recorder
    here = train_panel(service_link.ComputeSettings())
    here._parameterNode.runFolder = tmp_path / "run"
    here.ui.startButton.click()
    assert len(recorder.installs) == 1, "training on this computer checks its packages"
    assert here.ui.statusLabel.text == "Missing Python packages were not installed; nothing was started."

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = train_panel(service_link.ComputeSettings(service_link.SERVER, f"http://127.0.0.1:{port}", "t" * 32))
    assert server.ui.computeOnComboBox.currentText == "server"
    server._parameterNode.runFolder = tmp_path / "run"
    server.ui.startButton.click()
    assert len(recorder.installs) == 1, "a server job asked to install packages on this computer"
    assert recorder.errors and f"127.0.0.1:{port}" in recorder.errors[-1], recorder.errors  # it went to the server
    assert not server._busy.active
