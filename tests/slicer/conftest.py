"""Real MRML without the Slicer application (the `slicer-core` wheel), set up once per session.

Does what the Slicer application does at start-up (SLICER_API.md section 7): a scene in
``slicer.mrmlScene``, the segmentation conversion rules, and real segmentations/volumes logics under
``slicer.modules``. Each test gets an empty scene. ``SSSSegment/`` and ``SSSTrain/`` are put on
``sys.path`` so the modules' GUI-free packages ``SSSSegmentLib`` and ``SSSTrainLib`` import as they
do inside Slicer.
"""

import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SEGMENT_MODULE_DIR = REPO / "SSSSegment"

for _module_dir in (SEGMENT_MODULE_DIR, REPO / "SSSTrain"):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


@pytest.fixture(scope="session")
def slicer_core():
    """The ``slicer`` package with a scene and module logics, as inside the application."""
    import slicer  # slicer-core (pyproject test extra); the PyPI "slicer" package is unrelated
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.fail("the installed 'slicer' package is not slicer-core (the PyPI 'slicer' package is unrelated)")
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in _RULES:
        factory.RegisterConverterRule(getattr(slicer, rule)())
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
        volumes=types.SimpleNamespace(logic=lambda: volumes),
    )
    return slicer


@pytest.fixture
def scene(slicer_core):
    """``slicer.mrmlScene``, emptied before each test."""
    slicer_core.mrmlScene.Clear(0)
    return slicer_core.mrmlScene


# A 64 x 64 x 10 crop of the real lung CT around its tumour ([k, j, i] slices; tumour at k 32-34),
# and a box around the tumour on the crop's slice 5 (k = 33), XYXY pixels.
LUNG_CROP = (slice(28, 38), slice(64, 128), slice(64, 128))
LUNG_TUMOUR_BOX = (18.0, 17.0, 45.0, 46.0)


@pytest.fixture
def tumour_box():
    return LUNG_TUMOUR_BOX


@pytest.fixture
def crop_volume(scene, data_file):
    """The lung crop as its own volume node (same physical grid as the original voxels), made
    oblique and put under a rotating, shifting parent transform."""
    import numpy as np
    import slicer.util
    import vtk

    from SSSSegmentLib import geometry, testing

    full = testing.load_volume_file(scene, str(data_file("lung1_crop_image.nrrd")), "lung1_full")
    m = vtk.vtkMatrix4x4()
    full.GetIJKToRASMatrix(m)
    shift = np.eye(4)
    shift[:3, 3] = [LUNG_CROP[2].start, LUNG_CROP[1].start, LUNG_CROP[0].start]
    voxels = np.array(slicer.util.arrayFromVolume(full)[LUNG_CROP])
    crop = slicer.util.addVolumeFromArray(voxels, ijkToRAS=geometry.matrix_from_vtk(m) @ shift, name="lung1_tumour_crop")
    scene.RemoveNode(full)
    testing.make_oblique_with_transform(scene, crop)
    return crop


@pytest.fixture
def no_training_left_behind(tmp_path):
    """A failing test must not leave a stand-in trainer running: end every run started under tmp_path."""
    yield
    from SSSTrainLib.process import kill_process_tree, pid_alive
    from SSSTrainLib.runstate import read_state

    for state_file in tmp_path.rglob("run_state.json"):
        state = read_state(str(state_file.parent.parent))
        if state is not None and pid_alive(state.pid, state.started):
            kill_process_tree(state.pid)


@pytest.fixture(scope="session")
def local_service_link():
    """The SSS service on this computer as both panels reach it: the shared ServiceLink started
    ``python -m sss_lib serve`` (CPU, two threads) as a subprocess; stopped after the session."""
    import os

    from SSSSegmentLib import service_link

    service_link.forget_shared_link()
    link = service_link.shared_link(sys.executable, str(REPO), dict(os.environ, OMP_NUM_THREADS="2"))
    link.configure(service_link.ComputeSettings(), device="cpu")
    link.wait(timeout=300)
    yield link
    service_link.forget_shared_link()
