"""SSSSegment's panel (SSSSegmentWidget) driven through its buttons on Qt stand-ins
(tests/slicer/panel_stubs.py), with real MRML and the real SSS service on this computer.

The busy state: while a run goes, every widget that could start a second run or change its inputs
is disabled and a second click (one Qt still delivers) starts nothing; every ending (done, cancelled,
failed, an exception before the run) gives the panel back. "Compute on" lives in the application
settings, and the panel's timer advances the run without ever waiting for inference.
"""

import time

import pytest

from panel_stubs import FakeTimer, flush, install_application, recorder as make_recorder

pytestmark = pytest.mark.usefixtures("two_torch_threads")


class Panel:
    def __init__(self, module, recorder):
        self.module = module
        self.recorder = recorder
        self.widget = module.SSSSegmentWidget()
        self.widget.setup()
        self.widget._dependenciesChecked = True  # torch & co. are this venv's
        flush()

    @property
    def ui(self):
        return self.widget.ui

    def busy_widgets_enabled(self):
        return {name: getattr(self.ui, name).enabled for name in self.module.BUSY_WIDGETS}

    def run_timer(self, timeout=300.0, each=None):
        """What the panel's QTimer does until the run ends; ``each()`` runs between ticks."""
        deadline = time.monotonic() + timeout
        ticks = 0
        while self.widget._run is not None:
            assert time.monotonic() < deadline, f"the run did not end; status: {self.ui.statusLabel.text!r}"
            assert self.widget._pollTimer.active, "a run is going but the panel's timer is stopped"
            self.widget._pollRun()
            ticks += 1
            if each is not None and self.widget._run is not None:
                each()
            time.sleep(0.02)
        return ticks


@pytest.fixture
def panel_factory(slicer_core, scene, monkeypatch, local_service_link):
    recorder = make_recorder()
    module = install_application(monkeypatch, slicer_core, "SSSSegment", recorder)

    def make():
        return Panel(module, recorder)

    yield make
    FakeTimer.pending.clear()


@pytest.fixture
def volume_with_box(scene, crop_volume, tumour_box):
    from SSSSegmentLib import geometry, markups
    from SSSSegmentLib.logic import SegmentLogic

    logic = SegmentLogic()
    nodes = logic.add_class(crop_volume, "tumour")
    axis = logic.slice_axis(geometry.sss_volume_from_node(crop_volume), "auto")
    markups.write_box(logic.begin_box(crop_volume, nodes.label), geometry.ijk_to_world_ras(crop_volume), axis, 5, tumour_box)
    return crop_volume


def choose(panel, volume, model="litemedsam"):
    pn = panel.widget._parameterNode
    pn.inputVolume = volume
    pn.model = model
    pn.device = "cpu"  # the device the shared test service runs on (another would restart it)
    panel.widget._refreshClasses()
    flush()


def test_segment_keeps_the_panel_busy_until_done_and_a_second_click_does_nothing(panel_factory, volume_with_box, scene):
    from SSSSegmentLib import constants as C

    panel = panel_factory()
    ui = panel.ui
    choose(panel, volume_with_box)
    idle = panel.busy_widgets_enabled()
    assert [name for name, enabled in idle.items() if not enabled] == ["autoSegmentButton"]  # no task model
    assert not ui.cancelButton.enabled

    ui.segmentButton.click()
    run = panel.widget._run
    assert run is not None and panel.widget._busy.active and panel.widget._pollTimer.active
    assert not any(panel.busy_widgets_enabled().values()), panel.busy_widgets_enabled()
    assert ui.cancelButton.enabled

    def second_clicks():
        # Disabled buttons ignore clicks; a click Qt queued before they were disabled arrives anyway.
        for name in ("segmentButton", "rerunButton", "autoSegmentButton"):
            getattr(ui, name).click()
            getattr(ui, name).emit("clicked(bool)", False)
        assert panel.widget._run is run, "a second click started a second run"
        assert not any(panel.busy_widgets_enabled().values())

    ticks = panel.run_timer(each=second_clicks)
    assert ticks > 1, "the timer advanced the run in one tick: it waited for the service"
    assert not panel.recorder.errors, panel.recorder.errors
    assert ui.statusLabel.text.startswith("Segmented 1 class(es) (1 recomputed)") and "litemedsam on cpu" in ui.statusLabel.text
    assert ui.progressBar.value == 1000
    seg = panel.widget._parameterNode.outputSegmentation
    assert seg is not None and seg.GetAttribute(C.ATTR_MODEL) == "litemedsam"
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1, "one run, one segmentation"
    # Every ending gives the panel back.
    assert not panel.widget._busy.active and not panel.widget._pollTimer.active
    assert panel.busy_widgets_enabled() == idle, panel.busy_widgets_enabled()
    assert not ui.cancelButton.enabled

    # Re-run: through the same session, nothing changed, nothing recomputed.
    ui.rerunButton.click()
    panel.run_timer()
    assert ui.statusLabel.text.startswith("Segmented 1 class(es) (0 recomputed, 1 reused)"), ui.statusLabel.text
    assert panel.busy_widgets_enabled() == idle


def test_cancel_ends_the_busy_state_and_writes_nothing(panel_factory, volume_with_box, scene):
    panel = panel_factory()
    ui = panel.ui
    choose(panel, volume_with_box)
    idle = panel.busy_widgets_enabled()
    ui.segmentButton.click()
    ui.cancelButton.click()
    panel.run_timer()
    assert ui.statusLabel.text.startswith("Cancel"), ui.statusLabel.text
    assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
    assert not panel.widget._busy.active and panel.busy_widgets_enabled() == idle
    assert not panel.recorder.errors


def test_a_refused_server_is_one_error_and_gives_the_panel_back(panel_factory, volume_with_box, scene):
    import socket

    from SSSSegmentLib import service_link

    panel = panel_factory()
    ui = panel.ui
    choose(panel, volume_with_box)
    idle = panel.busy_widgets_enabled()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui.computeOnComboBox.setCurrentIndex(ui.computeOnComboBox.findText("server"))
    assert ui.serverUrlLineEdit.visible and ui.serverTokenLineEdit.visible
    ui.serverUrlLineEdit.text = f"http://127.0.0.1:{port}"
    ui.serverTokenLineEdit.text = "t" * 32
    # Kept in the application settings, where the other panel reads them; never in the scene.
    settings = panel.recorder.settings
    assert settings[service_link.SETTINGS_COMPUTE_ON] == "server"
    assert settings[service_link.SETTINGS_SERVER_TOKEN] == "t" * 32
    for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
        for name in node.GetAttributeNames() or []:
            assert "t" * 32 not in (node.GetAttribute(name) or "")
    try:
        ui.segmentButton.click()
        panel.run_timer(timeout=60)
        assert len(panel.recorder.errors) == 1, panel.recorder.errors
        assert f"127.0.0.1:{port}" in panel.recorder.errors[0] and "Nothing was changed" in panel.recorder.errors[0]
        assert ui.statusLabel.text == panel.recorder.errors[0]
        assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
        assert not panel.widget._busy.active and panel.busy_widgets_enabled() == idle
    finally:
        ui.computeOnComboBox.setCurrentIndex(0)  # back to this computer for the shared link
    assert panel.recorder.settings[service_link.SETTINGS_COMPUTE_ON] == "this computer"
    assert not ui.serverUrlLineEdit.visible

    # A second panel (SSS Train shares the settings) shows what the first stored.
    other = panel_factory()
    assert other.ui.computeOnComboBox.currentText == "this computer"
    assert other.ui.serverUrlLineEdit.text == f"http://127.0.0.1:{port}"


def test_an_error_before_the_run_gives_the_panel_back(panel_factory, crop_volume, scene):
    """No prompts: the logic refuses before anything starts; the busy state ends at once."""
    panel = panel_factory()
    ui = panel.ui
    choose(panel, crop_volume)
    panel.widget.logic.add_class(crop_volume, "empty")
    panel.widget._refreshClasses()
    idle = panel.busy_widgets_enabled()
    ui.segmentButton.click()
    assert panel.widget._run is None
    assert panel.recorder.errors and "No prompts yet" in panel.recorder.errors[-1]
    assert not panel.widget._busy.active and panel.busy_widgets_enabled() == idle


def test_a_declined_install_gives_the_panel_back(panel_factory, volume_with_box, monkeypatch):
    panel = panel_factory()
    choose(panel, volume_with_box)
    idle = panel.busy_widgets_enabled()
    panel.widget._dependenciesChecked = False
    from SSSSegmentLib import dependencies

    monkeypatch.setattr(dependencies, "ensure_dependencies_in_slicer", lambda: False)  # the user said no
    panel.ui.segmentButton.click()
    assert panel.widget._run is None and "nothing was run" in panel.ui.statusLabel.text
    assert not panel.widget._busy.active and panel.busy_widgets_enabled() == idle


def test_install_clicks_while_installing_do_nothing(panel_factory, volume_with_box, monkeypatch):
    """Installing packages pumps Qt events: a Segment click delivered then must not start a second install."""
    panel = panel_factory()
    choose(panel, volume_with_box)
    idle = panel.busy_widgets_enabled()
    panel.widget._dependenciesChecked = False
    from SSSSegmentLib import dependencies

    installs = []

    def install():
        installs.append(dict(panel.busy_widgets_enabled()))
        panel.ui.segmentButton.emit("clicked(bool)", False)  # queued click, delivered during the install
        return False

    monkeypatch.setattr(dependencies, "ensure_dependencies_in_slicer", install)
    panel.ui.segmentButton.click()
    assert len(installs) == 1, f"{len(installs)} installs"
    assert not any(installs[0].values()), "the panel was not busy while installing"
    assert not panel.widget._busy.active and panel.busy_widgets_enabled() == idle


def test_edited_segments_are_asked_about_and_cancel_writes_nothing(panel_factory, volume_with_box, scene, monkeypatch):
    """A result about to overwrite a segment painted since SSS wrote it: the panel asks
    (edit_guard.ask_how_to_write; the dialog is stood in for). Cancel leaves the segmentation as it
    is; "keep edited slices" keeps the painted slice and writes the rest."""
    import numpy as np
    from test_segment_edits import paint

    from SSSSegmentLib import edit_guard, segmentation

    panel = panel_factory()
    ui = panel.ui
    choose(panel, volume_with_box)
    ui.segmentButton.click()
    panel.run_timer()
    seg = panel.widget._parameterNode.outputSegmentation
    sid = segmentation.segment_id(1)
    first = segmentation.read_segment_mask(scene, seg, volume_with_box, sid)
    assert first[5].any()
    painted = paint(scene, seg, volume_with_box, 1, lambda mask: mask.__setitem__((5, slice(0, 4), slice(0, 4)), 1))

    asked, answers = [], [edit_guard.CANCEL, edit_guard.KEEP_EDITED]
    real_find = edit_guard.find_edits

    def ask_how_to_write(scene_, segmentation_node, volume_node, labels=None, ask=None):
        asked.append((segmentation_node, volume_node, list(labels)))
        assert real_find(scene_, segmentation_node, volume_node, labels), "asked although nothing was edited"
        return answers.pop(0)

    monkeypatch.setattr(edit_guard, "ask_how_to_write", ask_how_to_write)
    ui.segmentButton.click()
    panel.run_timer()
    assert asked == [(seg, volume_with_box, [1])]
    assert ui.statusLabel.text == "Result not written: the segmentation keeps your edits."
    assert not panel.recorder.errors and not panel.widget._busy.active
    assert np.array_equal(segmentation.read_segment_mask(scene, seg, volume_with_box, sid), painted)
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1

    ui.rerunButton.click()  # the cancelled result's session was dropped: the re-run recomputes and asks again
    panel.run_timer()
    assert len(asked) == 2 and ui.statusLabel.text.startswith("Segmented 1 class(es) (1 recomputed)"), ui.statusLabel.text
    now = segmentation.read_segment_mask(scene, seg, volume_with_box, sid)
    assert np.array_equal(now[5], painted[5]), "the painted slice was overwritten"
    others = [k for k in range(now.shape[0]) if k != 5]
    assert np.array_equal(now[others], first[others])
