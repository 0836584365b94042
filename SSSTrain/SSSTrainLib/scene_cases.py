"""Find the training cases of a scene: labeled (a volume and a segmentation made on it) and
unlabeled (a volume that no segmentation was made on), and the class table their segments define.

A segmentation pairs with the volume that is its reference geometry (what the Segment Editor and
SSS Segment set). A case can be left out with its checkbox in the panel, which sets the
:data:`~SSSTrainLib.constants.ATTR_EXCLUDED` attribute on the case's node (segmentation for a
labeled case, volume for an unlabeled one), so the choice is saved with the scene.

MRML only (no Qt, no sss_lib): runs in Slicer and on slicer-core. Python 3.9 compatible.
"""

import dataclasses
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import constants as C
from .errors import SceneDataError

# The segment tag SSS Segment writes: the class label a segment holds (SSSSegmentLib.constants).
SEGMENT_LABEL_TAG = "SSS.LabelValue"
REFERENCE_ROLE = "referenceImageGeometryRef"  # vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()


@dataclasses.dataclass
class SceneCase:
    """One case of the scene.

    Attributes:
        volume: the image (``vtkMRMLScalarVolumeNode``).
        segmentation: its labels (``vtkMRMLSegmentationNode``), None for an unlabeled case.
        case_id: a file-name-safe id, unique among the cases listed together.
    """

    volume: Any
    segmentation: Optional[Any] = None
    case_id: str = ""

    @property
    def labeled(self) -> bool:
        return self.segmentation is not None

    @property
    def node(self) -> Any:
        """The node whose attribute says whether the case is included."""
        return self.segmentation if self.segmentation is not None else self.volume

    @property
    def included(self) -> bool:
        return is_included(self.node)

    def describe(self) -> str:
        """The case as the panel lists it."""
        if self.segmentation is None:
            return f"{self.volume.GetName()}   (unlabeled)"
        names = segment_names(self.segmentation)
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} segments)" if len(names) > 4 else "")
        return f"{self.volume.GetName()}  <-  {self.segmentation.GetName()}   ({shown})"


def is_included(node: Any) -> bool:
    return node.GetAttribute(C.ATTR_EXCLUDED) != "1"


def set_included(node: Any, included: bool) -> None:
    """Include or leave out the case whose node is ``node`` (saved with the scene)."""
    node.SetAttribute(C.ATTR_EXCLUDED, "0" if included else "1")


def segment_names(segmentation_node: Any) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def _is_plain_scalar_volume(node: Any) -> bool:
    # Label maps, vector and diffusion volumes derive from vtkMRMLScalarVolumeNode: not images here.
    return node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode" and not node.GetHideFromEditors()


def _nodes(scene: Any, class_name: str) -> List[Any]:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]


def reference_volume(segmentation_node: Any) -> Optional[Any]:
    """The volume ``segmentation_node`` was made on (its reference geometry), or None."""
    node = segmentation_node.GetNodeReference(REFERENCE_ROLE)
    return node if _is_plain_scalar_volume(node) else None


def case_id_from_name(name: str) -> str:
    """A file-name-safe id: letters, digits and single dashes (``"Lung CT #1"`` -> ``"Lung-CT-1"``)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "case"


def assign_case_ids(cases: Sequence[SceneCase]) -> None:
    """Give each case a unique id from its volume's name (``-2``, ``-3``, ... for repeats)."""
    used = set()
    for case in cases:
        base = case_id_from_name(case.volume.GetName())
        case_id, n = base, 1
        while case_id.lower() in used:  # case-insensitive file systems
            n += 1
            case_id = f"{base}-{n}"
        used.add(case_id.lower())
        case.case_id = case_id


def find_scene_cases(scene: Any) -> Tuple[List[SceneCase], List[SceneCase]]:
    """The scene's labeled and unlabeled cases, in the order their nodes were added.

    Labeled: every segmentation with at least one segment whose reference geometry is a scalar
    volume. Unlabeled: every other scalar volume (label maps and hidden nodes are not images).
    Excluded cases are listed too (``included`` False); ids are unique over both lists.
    """
    labeled = []
    used_volumes = set()
    for seg in _nodes(scene, "vtkMRMLSegmentationNode"):
        if seg.GetHideFromEditors() or seg.GetSegmentation().GetNumberOfSegments() == 0:
            continue
        volume = reference_volume(seg)
        if volume is None:
            continue
        labeled.append(SceneCase(volume, seg))
        used_volumes.add(volume.GetID())
    unlabeled = [
        SceneCase(v) for v in _nodes(scene, "vtkMRMLScalarVolumeNode")
        if _is_plain_scalar_volume(v) and v.GetID() not in used_volumes
    ]
    assign_case_ids(labeled + unlabeled)
    return labeled, unlabeled


def unpaired_segmentations(scene: Any) -> List[str]:
    """Names of segmentations with segments but no reference volume (they cannot be used)."""
    return [
        seg.GetName() for seg in _nodes(scene, "vtkMRMLSegmentationNode")
        if not seg.GetHideFromEditors() and seg.GetSegmentation().GetNumberOfSegments() > 0 and reference_volume(seg) is None
    ]


def class_table(cases: Sequence[SceneCase]) -> Dict[int, str]:
    """Label value -> class name over the segments of ``cases`` (background, 0, not included).

    A class is a segment name (the same name in several cases is one class). Values are the
    class labels SSS Segment tagged its segments with when every class has exactly one such tag
    and no two classes share a value, so a task model keeps the labels the user already sees;
    otherwise 1, 2, ... in the order the names first appear.

    Raises:
        SceneDataError: no segments, or a segment named "background" (nnU-Net reserves 0 for it).
    """
    names: List[str] = []
    tags: Dict[str, set] = {}
    for case in cases:
        segmentation = case.segmentation.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            name = segment.GetName().strip() or segmentation.GetNthSegmentID(n)
            if name.lower() == "background":
                raise SceneDataError(
                    f"Segmentation '{case.segmentation.GetName()}' has a segment named '{segment.GetName()}': "
                    "label 0 is the background of every training case. Rename or delete that segment."
                )
            if name not in tags:
                names.append(name)
                tags[name] = set()
            tag = _segment_label_tag(segment)
            tags[name].add(tag)
    if not names:
        raise SceneDataError("The selected cases have no segments: segment at least one class in each labeled case.")
    tagged = {name: next(iter(t)) for name, t in tags.items() if len(t) == 1 and None not in t}
    values = list(tagged.values())
    if len(tagged) == len(names) and len(set(values)) == len(values) and all(v > 0 for v in values):
        return {tagged[name]: name for name in sorted(names, key=lambda n: tagged[n])}
    return {i + 1: name for i, name in enumerate(names)}


def _segment_label_tag(segment: Any) -> Optional[int]:
    import vtk

    value = vtk.mutable("")
    if not segment.GetTag(SEGMENT_LABEL_TAG, value):
        return None
    try:
        return int(str(value))
    except ValueError:
        return None
