"""Render each module's .ui file to docs/panels/<Module>.png without Slicer (offscreen Qt).

Slicer's own widget classes (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton, ctkPathLineEdit)
are replaced by plain Qt stand-ins of the same name, so the picture shows the real layout, labels,
tooltips and buttons of the .ui file, not Slicer's exact styling. Example content (two classes, a
status line; for SSSTrain a run in progress with its curves) is filled in so the screenshot shows a
panel in use; it is labelled as an example. Collapsed sections (SSSTrain's Advanced) are drawn
open, so the picture shows every setting.

Usage: python scripts/render_panels.py [--out docs/panels] [--width 440] [--module SSSTrain]
Needs PySide6 (pip install PySide6-Essentials).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ("SSSSegment", "SSSTrain")

# What the stand-in node selectors show, by their first node type.
NODE_EXAMPLES = {"vtkMRMLScalarVolumeNode": "lung1_crop_image", "vtkMRMLSegmentationNode": None}
EXAMPLE_CLASSES = [
    ("tumour   [label 1, user: 1 box, 1 +, 1 -]", (230, 80, 60)),
    ("vessel   [label 2, auto: 0 box, 2 +, 0 -]", (60, 160, 230)),
]
EXAMPLE_STATUS = "Example: Segmented 2 class(es) (1 recomputed, 1 reused) in 3.4 s with sam2.1_hiera_tiny on cpu. Total 3.6 s."


def stand_in_classes():
    """Qt classes named like Slicer's, for QUiLoader.registerCustomWidget."""
    from PySide6.QtCore import Property
    from PySide6.QtWidgets import QComboBox, QGroupBox, QHBoxLayout, QLineEdit, QToolButton, QWidget

    class qMRMLWidget(QWidget):  # noqa: N801 - must carry the Slicer class name
        pass

    class ctkCollapsibleButton(QGroupBox):  # noqa: N801
        def _get_text(self) -> str:
            return self.title()

        def _set_text(self, value: str) -> None:
            self.setTitle("\u25bc " + value)

        def _get_collapsed(self) -> bool:
            return False

        def _set_collapsed(self, value: bool) -> None:
            pass  # drawn open: the picture shows what the section holds

        text = Property(str, _get_text, _set_text)
        collapsed = Property(bool, _get_collapsed, _set_collapsed)

    class qMRMLNodeComboBox(QComboBox):  # noqa: N801
        pass

    class ctkPathLineEdit(QWidget):  # noqa: N801
        def __init__(self, parent=None) -> None:
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.edit = QLineEdit(self)
            self.edit.setObjectName("pathEdit")
            self.edit.setPlaceholderText("(no file)")
            button = QToolButton(self)
            button.setText("...")
            layout.addWidget(self.edit)
            layout.addWidget(button)

    return [qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit]


EXAMPLE_TRAIN_CASES = [
    ("lung1  <-  lung1 SSS segmentation   (tumour)", True),
    ("lung2  <-  lung2 segmentation   (tumour)", True),
    ("lung3  <-  lung3 segmentation   (tumour)", False),
    ("lung4   (unlabeled)", True),
    ("lung5   (unlabeled)", True),
]
EXAMPLE_TRAIN_STATUS = "Example: Step 3120/10000  |  loss 0.2841  |  trusted pixels 71%  |  ETA 1 h 12 min"
EXAMPLE_TRAIN_VALIDATION = "Validation at step 3000: Dice tumour 0.8120"
EXAMPLE_TRAIN_LOG = [
    "starting: 10000 steps",
    "step 2500/10000 total 0.3125 sup 0.2210 unsup 0.0915 mask 0.66 lr 8.10e-05 eta 1h26m",
    "validation at step 3000: Dice tumour 0.8120",
    "checkpoint at step 3000: /data/runs/lung/checkpoints/last.pt",
]


def example_curves(path: Path) -> Path:
    """Curves of a made-up run, drawn by sss_lib's own plot (what the trainer writes to curves.png)."""
    import math

    from sss_lib.runs.curves import plot_curves
    from sss_lib.runs.progress import ProgressRecord

    records = []
    for step in range(50, 3121, 50):
        sup = 0.55 * math.exp(-step / 900) + 0.18
        warm = step <= 2000  # the panel's warm-up: supervised only
        unsup = None if warm else 0.12 * (1 - math.exp(-(step - 2000) / 400))
        records.append(ProgressRecord("step", step, 10000, losses={"total": sup + (unsup or 0.0), "sup": sup,
                                                                   "unsup": unsup},
                                      mask_ratio=None if warm else min(0.72, 0.45 + (step - 2000) / 4000)))
        if step % 500 == 0:
            records.append(ProgressRecord("val", step, 10000, val_dice={"tumour": 0.84 - 0.5 * math.exp(-step / 800)}))
    return plot_curves(records, path, title="Example run")


def fill_example(panel, module: str) -> None:
    """Put example content into the stand-ins so the picture shows a panel in use."""
    from PySide6.QtGui import QColor, QIcon, QPixmap
    from PySide6.QtWidgets import QComboBox, QLabel, QListWidget, QListWidgetItem

    for combo in panel.findChildren(QComboBox):
        if type(combo).__name__ != "qMRMLNodeComboBox":
            continue
        types = combo.property("nodeTypes") or []
        example = NODE_EXAMPLES.get(types[0] if types else "", None)
        combo.addItem(example if example else (combo.property("noneDisplay") or "None"))
    if module == "SSSSegment":
        classes = panel.findChild(QListWidget, "classListWidget")
        for text, rgb in EXAMPLE_CLASSES:
            pixmap = QPixmap(14, 14)
            pixmap.fill(QColor(*rgb))
            classes.addItem(QListWidgetItem(QIcon(pixmap), text))
        classes.setCurrentRow(0)
        panel.findChild(QLabel, "statusLabel").setText(EXAMPLE_STATUS)
    if module == "SSSTrain":
        fill_train_example(panel)


def fill_train_example(panel) -> None:
    import tempfile

    from PySide6.QtCore import Qt
    from PySide6.QtGui import QPixmap
    from PySide6.QtWidgets import (QComboBox, QLabel, QLineEdit, QListWidget, QListWidgetItem, QPlainTextEdit,
                                   QProgressBar, QPushButton, QWidget)

    panel.findChild(QComboBox, "unlabeledSourceComboBox").setCurrentText("scene")
    for name in ("labeledFolderLabel", "labeledFolderPathLineEdit", "unlabeledFolderLabel", "unlabeledFolderPathLineEdit"):
        panel.findChild(QWidget, name).setVisible(False)  # the panel hides folder rows for scene sources
    cases = panel.findChild(QListWidget, "casesListWidget")
    for text, checked in EXAMPLE_TRAIN_CASES:
        item = QListWidgetItem(text)
        item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
        item.setCheckState(Qt.Checked if checked else Qt.Unchecked)
        cases.addItem(item)
    panel.findChild(QLabel, "dataSummaryLabel").setText("Scene: 2 labeled case(s); classes 1 tumour\nScene: 2 unlabeled volume(s)")
    panel.findChild(QWidget, "runFolderPathLineEdit").findChild(QLineEdit, "pathEdit").setText("/data/runs/lung")
    panel.findChild(QProgressBar, "progressBar").setValue(312)
    panel.findChild(QLabel, "statusLabel").setText(EXAMPLE_TRAIN_STATUS)
    panel.findChild(QLabel, "validationLabel").setText(EXAMPLE_TRAIN_VALIDATION)
    for name, enabled in (("startButton", False), ("stopButton", True), ("resumeButton", False), ("useModelButton", True)):
        panel.findChild(QPushButton, name).setEnabled(enabled)
    log = panel.findChild(QPlainTextEdit, "logTextEdit")
    log.setPlainText("\n".join(EXAMPLE_TRAIN_LOG))
    log.setMaximumHeight(90)
    with tempfile.TemporaryDirectory() as tmp:
        pixmap = QPixmap(str(example_curves(Path(tmp) / "curves.png")))
    curves = panel.findChild(QLabel, "curvesLabel")
    curves.setWordWrap(False)  # a word-wrapped label sizes itself by its (empty) text, not its picture
    curves.setPixmap(pixmap.scaledToWidth(360, Qt.SmoothTransformation))
    curves.setMinimumHeight(curves.pixmap().height())
    log.setMinimumHeight(90)


def render(module: str, out_dir: Path, width: int) -> Path:
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader

    loader = QUiLoader()
    for cls in stand_in_classes():
        loader.registerCustomWidget(cls)
    ui_path = REPO / module / "Resources" / "UI" / f"{module}.ui"
    f = QFile(str(ui_path))
    if not f.open(QFile.ReadOnly):
        raise SystemExit(f"cannot open {ui_path}")
    panel = loader.load(f)
    f.close()
    if panel is None:
        raise SystemExit(f"Qt could not load {ui_path}: {loader.errorString()}")
    fill_example(panel, module)
    panel.resize(width, panel.sizeHint().height())
    panel.adjustSize()
    layout = panel.layout()
    height = max(panel.height(), layout.totalHeightForWidth(width) if layout.hasHeightForWidth() else 0)
    panel.resize(width, height)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{module}.png"
    if not panel.grab().save(str(path)):
        raise SystemExit(f"could not write {path}")
    return path


# The stand-ins lack Slicer's scene signal and ctk's enum types; Qt says so for every .ui file.
_KNOWN = ("mrmlSceneChanged", "(sender name:", "(receiver name:", "property filters could not be read")


def _quiet_known_stand_in_warnings(mode, context, message: str) -> None:
    if not any(k in message for k in _KNOWN):
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "panels")
    parser.add_argument("--width", type=int, default=440)
    parser.add_argument("--module", choices=MODULES, action="append",
                        help="render only this module's panel (repeatable; default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    qInstallMessageHandler(_quiet_known_stand_in_warnings)

    app = QApplication.instance() or QApplication(sys.argv[:1])
    for module in args.module or MODULES:
        print(render(module, args.out, args.width))
    del app
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
