"""Render each module's .ui file to docs/panels/<Module>.png without Slicer (offscreen Qt).

Slicer's own widget classes (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton, ctkPathLineEdit)
are replaced by plain Qt stand-ins of the same name, so the picture shows the real layout, labels,
tooltips and buttons of the .ui file, not Slicer's exact styling. Example content (two classes, a
status line) is filled in so the screenshot shows a panel in use; it is labelled as an example.

Usage: python scripts/render_panels.py [--out docs/panels] [--width 440]
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

        text = Property(str, _get_text, _set_text)

    class qMRMLNodeComboBox(QComboBox):  # noqa: N801
        pass

    class ctkPathLineEdit(QWidget):  # noqa: N801
        def __init__(self, parent=None) -> None:
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.edit = QLineEdit(self)
            self.edit.setPlaceholderText("(no file)")
            button = QToolButton(self)
            button.setText("...")
            layout.addWidget(self.edit)
            layout.addWidget(button)

    return [qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit]


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
    panel.resize(width, panel.height())
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
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import qInstallMessageHandler
    from PySide6.QtWidgets import QApplication

    qInstallMessageHandler(_quiet_known_stand_in_warnings)

    app = QApplication.instance() or QApplication(sys.argv[:1])
    for module in MODULES:
        print(render(module, args.out, args.width))
    del app
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
