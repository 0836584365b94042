"""Auto-segment (SSS_METHOD.md section 5): a task model segments a volume with no prompts given.

volume -> preprocess and embed every slice (cached by the engine) -> coarse head -> PCSW prompts
-> the engine (the backbone running the task model's fine-tuned prompt encoder and mask decoder)
-> label volume on the input's grid, plus the prompts that produced it.

Three steps are **ours** (see :class:`TaskRuntime`): on a 2D backbone without memory (LiteMedSAM)
every slice of the structure PCSW prompted gets an *anchor* prompt made the PCSW way, instead of
carrying one key slice's box through the stack; a *presence gate* removes an automatically
prompted class from the slices where the coarse head does not see it; and a *ring rule*
(:mod:`sss_lib.rings`) rebuilds, from the coarse head, a ring class (the myocardium) on the slices
where the boxes filled it or its inner class (the LV cavity) covered it. A fourth: the classes the
task model names as *coarse classes* (chosen on validation, :mod:`sss_lib.class_source`) are taken
from the coarse head's own argmax while they are automatically prompted; their prompts are still
written, and editing them hands the class back to the decoder.

Edits: the prompts JSON written by a run can be edited and passed back. A class whose prompts are
marked ``"source": "user"``, or differ from what PCSW makes, is the user's: it is kept as given
(and marked ``"user"``); the other classes get PCSW's prompts again; a class that PCSW prompts
but the edited file leaves out was deleted by the user and is not segmented. Within one
:class:`AutoSegmentSession`, a re-run recomputes only the classes whose prompts changed, from the
cached embeddings and coarse probabilities.

This module imports torch only inside functions (through :mod:`sss_lib.coarse_head` and
:mod:`sss_lib.trainer.adapters`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .embedding_cache import EmbeddingStore
from .engine import EngineEvent, SegmentationSession
from .errors import Cancelled, InputError
from .pcsw import PcswConfig, PcswResult, pcsw_prompt_set
from .prompts import ClassPrompts, PromptSet
from .task_model import (
    RANDOM_INIT,
    TaskClass,
    TaskModel,
    TaskModelError,
    TaskPreprocessing,
    load_task_model,
)
from .volume import Volume, axis_from_name

if TYPE_CHECKING:
    from .backbones.base import Backbone
    from .coarse_head import CoarseHead
    from .trainer.adapters import DecoderAdapter

log = logging.getLogger(__name__)

Progress = Callable[[EngineEvent], None]


@dataclasses.dataclass
class TaskRuntime:
    """A task model ready to run: backbone with the task's decoder weights, coarse head, settings.

    Attributes:
        backbone: the backbone, carrying the task model's prompt encoder and mask decoder weights.
        adapter: the backbone's :class:`~sss_lib.trainer.adapters.DecoderAdapter` (feature geometry).
        head: the coarse head (eval mode, on the backbone's device).
        classes: the task's classes in label order (the head's channel order).
        preprocessing: intensity rule, slice axis and input size.
        pcsw: PCSW settings.
        volume_ranges_mm3: label -> ``(min, max)`` physical volume for PCSW's range check.
        presence_fraction: the coarse-head presence gate (**ours**; None turns it off): on a slice
            where an automatically prompted class's propagated mask has ``A`` pixels but the coarse
            head finds fewer than ``presence_fraction * A`` pixels of it (probability > PCSW's
            threshold), the class is removed from that slice. A 2D backbone carried past the end
            of a structure keeps outlining something in its box; the coarse head, trained on
            every slice, knows where the structure is absent (+0.005 mean Dice on the benchmark's
            phantoms, from the RV's last slices). User-prompted classes are not gated.
        anchors: **(ours)** besides PCSW's key-slice prompt, give each automatically prompted class
            a prompt (made the PCSW way: box, deepest point, negatives) on every other slice of the
            3D component PCSW prompted. None: on for backbones that propagate by carrying a box
            (2D models without memory, LiteMedSAM), off for SAM-2, whose memory propagates. A
            carried box drifts (the myocardium fills in, the RV runs on past its end): on the
            benchmark's held-out phantoms one model scored mean Dice 0.77 propagating from the key
            slice and 0.90 with anchors (benchmarks/bench_task_model.py: 0.95).
        prompt_points: **(ours)** whether automatic prompts carry PCSW's points (and a 2D backbone
            carries points from slice to slice); False: boxes alone. None: only where the backbone's
            shipped decoder was trained with points (SAM-2), not LiteMedSAM, whose decoder was trained
            on boxes alone and answers a point inside the left ventricle with an unrelated mask. On
            the SSL benchmark's phantoms (64 px, LiteMedSAM models fine-tuned on 3 labeled cases)
            boxes alone scored 0.90 -> 0.92, 0.89 -> 0.92 and 0.78 -> 0.88 mean Dice. The user's own
            prompts keep their points.
        nesting: ``{outer: (inner, ...)}`` from the task model (:attr:`TaskModel.nesting`).
        ring_rule: **(ours)** apply :func:`sss_lib.rings.apply_ring_rule` to the automatically
            prompted classes of ``nesting``; False: the propagated masks as they are.
        coarse_classes: **(ours)** the classes taken from the coarse head's argmax instead of the
            prompted decoder (:mod:`sss_lib.class_source`), when automatically prompted; from the
            task model (:attr:`TaskModel.coarse_classes`, chosen on validation). ``()``: every
            class from the decoder.
    """

    backbone: "Backbone"
    adapter: "DecoderAdapter"
    head: "CoarseHead"
    classes: tuple[TaskClass, ...]
    preprocessing: TaskPreprocessing
    pcsw: PcswConfig
    volume_ranges_mm3: dict[int, tuple[float, float]]
    presence_fraction: float | None = 0.1
    anchors: bool | None = None
    prompt_points: bool | None = None
    nesting: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    ring_rule: bool = True
    coarse_classes: tuple[int, ...] = ()

    @classmethod
    def from_task_model(cls, model: TaskModel, *, device: str = "auto", backbone: "Backbone | None" = None,
                        source: object = "") -> "TaskRuntime":
        """Build the backbone the model names (or use ``backbone``, whose decoder weights and
        propagation settings are replaced by the model's) and load the model's weights.

        Raises:
            TaskModelError: the backbone's weights differ from those the model was trained on, or
            the model's weights do not fit the backbone. WeightsError / DeviceError: as
            :func:`sss_lib.backbones.registry.build_backbone`.
        """
        from .coarse_head import CoarseHead
        from .trainer.adapters import adapter_for

        net = backbone if backbone is not None else build_task_backbone(model, device=device, source=source)
        check_backbone(model, net, source)
        adapter = adapter_for(net)
        try:
            adapter.load_state_dicts({c: model.weights[c] for c in ("prompt_encoder", "mask_decoder")})
            from .trainer.encoder_tuning import apply_task_encoder  # tuned encoder blocks, or the backbone's own

            apply_task_encoder(net, model.encoder_tuning, model.weights.get("image_encoder"))
            head = CoarseHead.from_state_dict(model.weights["coarse_head"])
            if "dfe" in model.weights:
                from .semisup.dfe import DFE, DfeCoarseHead

                head = DfeCoarseHead(head, DFE.from_state_dict(model.weights["dfe"], head.in_channels))
        except (KeyError, RuntimeError, ValueError) as err:
            raise TaskModelError(source, f"its weights do not fit the {net.name} backbone ({err})",
                                 "Retrain the task model with this version of SSS.") from None
        if head.num_classes != len(model.classes):
            raise TaskModelError(source, f"the coarse head predicts {head.num_classes} classes but the class "
                                 f"table has {len(model.classes)}", "Re-export the task model from SSSTrain.")
        adapter.train(False)
        adapter.prepare_for_task()
        head = head.to(adapter.device).eval()
        return cls(net, adapter, head, tuple(model.classes), model.preprocessing, model.pcsw,
                   dict(model.volume_ranges_mm3), nesting=dict(model.nesting),
                   coarse_classes=tuple(model.coarse_classes))

    @property
    def labels(self) -> list[int]:
        return [c.label for c in self.classes]

    @property
    def uses_points(self) -> bool:
        return self.prompt_points if self.prompt_points is not None else self.adapter.knows_points

    @property
    def uses_anchors(self) -> bool:
        return self.anchors if self.anchors is not None else self.adapter.carries_boxes


def build_task_backbone(model: TaskModel, *, device: str = "auto", source: object = "") -> "Backbone":
    """The backbone a task model was trained on, built on ``device``.

    A model trained on an untrained test backbone (``weights_sha256 == "random-init"``) gets the
    same seeded random SAM-2 weights back; every other model gets its named checkpoint.
    """
    from .backbones.registry import SAM2_NAMES, build_backbone

    name = model.backbone.name
    size = model.preprocessing.image_size
    if model.backbone.weights_sha256 == RANDOM_INIT:
        if name not in SAM2_NAMES:
            raise TaskModelError(source, f"names an untrained {name} backbone, which cannot be rebuilt",
                                 "Retrain the task model on a real backbone.")
        from .backbones.sam2_backbone import build_sam2_backbone

        log.warning("task model %s runs on an untrained (random-init) %s: for tests only", source, name)
        return build_sam2_backbone(name, image_size=size, random_init=True, device=device)
    if name == "litemedsam":
        return build_backbone("litemedsam", device=device)
    return build_backbone(name, device=device, image_size=size)


def check_backbone(model: TaskModel, backbone: "Backbone", source: object = "") -> None:
    """Refuse a backbone other than the one the model was trained on (name and weights hash)."""
    ref = model.backbone
    if backbone.name != ref.name or backbone.weights_sha256 != ref.weights_sha256:
        raise TaskModelError(
            source,
            f"was trained on {ref.name} (weights sha256 {ref.weights_sha256[:16]}...) but the backbone is "
            f"{backbone.name} (weights sha256 {backbone.weights_sha256[:16]}...)",
            f"Load the {ref.name} checkpoint it was trained on, or retrain the task model on this backbone.",
        )


@dataclasses.dataclass
class AutoSegmentResult:
    """What an Auto-segment run produced.

    Attributes:
        labels: label volume on the input's grid (0 = background).
        prompts: the prompts used, in stack coordinates (``source`` says auto or user).
        pcsw: PCSW's decision for every class it ran on in this run (not the user's classes).
        user_classes: labels whose prompts came from the user.
        absent: labels with no prompt (PCSW found nothing, or the user deleted the class).
        recomputed / reused: labels the engine propagated in this run / kept from the last run.
        seconds: wall time; ``timings``: seconds per stage (``coarse``, ``pcsw``, ``engine``).
        rings: outer label -> the slices where the ring rule rebuilt it (:mod:`sss_lib.rings`).
        from_coarse: the labels taken from the coarse head (:attr:`TaskRuntime.coarse_classes`
            that were automatically prompted in this run).
    """

    labels: Volume
    prompts: PromptSet
    pcsw: dict[int, PcswResult]
    user_classes: list[int]
    absent: list[int]
    recomputed: list[int]
    reused: list[int]
    seconds: float
    timings: dict[str, float]
    rings: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    from_coarse: list[int] = dataclasses.field(default_factory=list)


class AutoSegmentSession:
    """Auto-segments one volume with one task model, keeping embeddings, coarse probabilities and
    per-class results between runs, so a run after a prompt edit recomputes only changed classes.

    Args:
        volume: the input volume (its grid is the output's grid).
        runtime: the task model, ready to run (:meth:`TaskRuntime.from_task_model`).
        store: an embedding store to share; a private one by default.
    """

    def __init__(self, volume: Volume, runtime: TaskRuntime, *, store: EmbeddingStore | None = None) -> None:
        self.volume = volume
        self.runtime = runtime
        axis = axis_from_name(runtime.preprocessing.slice_axis, volume)
        self.engine = SegmentationSession(volume, runtime.backbone, slice_axis=axis,
                                          preprocessing=runtime.preprocessing.to_preprocessing(), store=store)
        self._probabilities: dict[int, np.ndarray] | None = None
        self._auto: tuple[PromptSet, dict[int, PcswResult]] | None = None

    @property
    def slice_axis(self):  # noqa: ANN201 - SliceAxis
        return self.engine.slice_axis

    def _rings(self, labels: Volume, prompt_set: PromptSet) -> tuple[Volume, dict[int, list[int]]]:
        """Apply the runtime's ring rule to the automatically prompted classes."""
        rt = self.runtime
        if not rt.ring_rule or not rt.nesting:
            return labels, {}
        from .rings import apply_ring_rule

        axis = self.slice_axis
        stack = axis.to_stack(labels.voxels).copy()
        changed = apply_ring_rule(stack, self.probabilities(), rt.nesting, _auto_labels(prompt_set))
        return (labels.with_voxels(axis.from_stack(stack)) if changed else labels), changed

    def _coarse_classes(self, labels: Volume, prompt_set: PromptSet) -> tuple[Volume, list[int]]:
        """Take the runtime's coarse classes from the coarse head, where automatically prompted."""
        classes = [c for c in self.runtime.coarse_classes if c in _auto_labels(prompt_set)]
        if not classes:
            return labels, []
        from .class_source import apply_coarse_classes, coarse_label_stack

        axis = self.slice_axis
        stack = axis.to_stack(labels.voxels).copy()
        apply_coarse_classes(stack, coarse_label_stack(self.probabilities()), classes)
        return labels.with_voxels(axis.from_stack(stack)), classes

    def coarse_labels(self) -> Volume:
        """The coarse head's own argmax as a label volume on the input's grid (0 = background)."""
        from .class_source import coarse_label_stack

        stack = coarse_label_stack(self.probabilities())
        dtype = np.uint8 if max(self.runtime.labels, default=0) < 256 else np.uint16
        return self.volume.with_voxels(self.slice_axis.from_stack(stack).astype(dtype, copy=False))

    def _gate(self, labels: Volume, prompt_set: PromptSet) -> Volume:
        """Apply the runtime's presence gate to the automatically prompted classes."""
        fraction = self.runtime.presence_fraction
        auto = _auto_labels(prompt_set)
        if fraction is None or not auto:
            return labels
        axis = self.slice_axis
        stack = axis.to_stack(labels.voxels).copy()
        removed = presence_gate(stack, self.probabilities(), auto, self.runtime.pcsw.threshold, fraction)
        for label, slices in removed.items():
            log.info("class %d: removed from slice(s) %s where the coarse head does not see it", label, slices)
        return labels.with_voxels(axis.from_stack(stack)) if removed else labels

    def probabilities(self, *, progress: Progress | None = None,
                      should_cancel: Callable[[], bool] | None = None) -> dict[int, np.ndarray]:
        """Class label -> coarse probabilities ``(S, H, W)`` float32 along the session's slice axis
        (computed on the first call, embedding every slice through the engine's cache)."""
        if self._probabilities is None:
            from .coarse_head import stack_probabilities

            n = self.engine.stack_shape[0]

            def lookup(s: int) -> Any:
                if should_cancel is not None and should_cancel():
                    raise Cancelled("auto-segment cancelled; nothing was changed")
                emb = self.engine.embedding(s)
                if progress is not None:
                    progress(EngineEvent("embed", s + 1, n, f"coarse head on slice {s + 1}/{n}"))
                return emb

            rt = self.runtime
            self._probabilities = stack_probabilities(rt.head, rt.adapter, lookup, self.engine.stack_shape, rt.labels)
        return self._probabilities

    def prompts(self, edited: PromptSet | None = None, *, progress: Progress | None = None,
                should_cancel: Callable[[], bool] | None = None) -> tuple[PromptSet, dict[int, PcswResult]]:
        """The prompts a run uses: PCSW's, with the user's classes from ``edited`` kept (see the
        module docstring for how edits are recognised)."""
        rt = self.runtime
        probs = self.probabilities(progress=progress, should_cancel=should_cancel)
        axis = self.slice_axis
        common = dict(
            slice_axis=axis,
            in_plane_spacing=self.volume.in_plane_spacing(axis),
            slice_spacing=float(self.volume.spacing[axis.axis]),
            names={c.label: c.name for c in rt.classes},
            colors={c.label: c.color for c in rt.classes},
            class_ranges=rt.volume_ranges_mm3,
            config=rt.pcsw,
        )
        if self._auto is None:
            auto, results = pcsw_prompt_set(probs, **common)
            if rt.uses_anchors:
                auto = with_anchors(auto, probs, rt.pcsw, common["in_plane_spacing"])
            if not rt.uses_points:
                auto = boxes_only(auto)
            self._auto = (auto, results)
        auto, results = self._auto
        if edited is None:
            return auto, dict(results)
        marked = mark_user_edits(edited, auto)
        user = {c.label: c for c in marked.classes if any(p.source == "user" for p in c.prompts)}
        # The auto classes are this session's PCSW prompts (the same every time); the user's are kept.
        auto_classes = auto.by_label()
        kept = set(marked.by_label())
        classes = [user.get(lbl) or auto_classes[lbl] for lbl in sorted(kept) if lbl in user or lbl in auto_classes]
        dropped = sorted(set(auto_classes) - kept)
        if dropped:
            log.info("classes %s are not in the edited prompts: left unsegmented", dropped)
        return PromptSet(axis, classes), {k: v for k, v in results.items() if k in kept and k not in user}

    def run(self, edited: PromptSet | None = None, *, progress: Progress | None = None,
            should_cancel: Callable[[], bool] | None = None) -> AutoSegmentResult:
        """Segment with PCSW's prompts (and the user's classes from ``edited``).

        Raises:
            Cancelled: ``should_cancel`` returned True; the session is left as before the run.
        """
        t0 = time.perf_counter()
        self.probabilities(progress=progress, should_cancel=should_cancel)
        t1 = time.perf_counter()
        prompt_set, results = self.prompts(edited)
        t2 = time.perf_counter()
        if prompt_set.classes:
            with _carried_points(self.runtime):
                seg = self.engine.segment(prompt_set, progress=progress, should_cancel=should_cancel)
            labels, recomputed, reused = seg.labels, seg.recomputed, seg.reused
            labels = self._gate(labels, prompt_set)
            labels, rings = self._rings(labels, prompt_set)
            labels, from_coarse = self._coarse_classes(labels, prompt_set)
        else:
            log.warning("no class has a prompt: the label map is empty")
            labels = self.volume.with_voxels(np.zeros(self.volume.voxels.shape, np.uint8))
            recomputed, reused, rings, from_coarse = [], [], {}, []
        t3 = time.perf_counter()
        present = prompt_set.by_label()
        user = sorted(lbl for lbl, c in present.items() if any(p.source == "user" for p in c.prompts))
        absent = sorted(set(self.runtime.labels) - set(present))
        for lbl, res in results.items():
            if res.status != "ok":
                log.info("class %d: PCSW %s (%s)", lbl, res.status, res.reason)
        return AutoSegmentResult(labels, prompt_set, results, user, absent, recomputed, reused, t3 - t0,
                                 {"coarse": t1 - t0, "pcsw": t2 - t1, "engine": t3 - t2}, rings, from_coarse)


def _auto_labels(prompt_set: PromptSet) -> list[int]:
    """The classes of ``prompt_set`` that no user prompt holds."""
    return [c.label for c in prompt_set.classes if not any(p.source == "user" for p in c.prompts)]


def boxes_only(prompts: PromptSet) -> PromptSet:
    """``prompts`` with the points of every automatic prompt removed (boxes kept); a prompt that
    is a point alone, and the user's prompts, are kept as they are."""
    classes = []
    for c in prompts.classes:
        kept = [dataclasses.replace(p, positive_points=[], negative_points=[])
                if p.source != "user" and p.box is not None else p for p in c.prompts]
        classes.append(ClassPrompts(c.label, c.name, kept, c.color))
    return PromptSet(prompts.slice_axis, classes)


class _carried_points:
    """While a run propagates: a 2D backbone carries boxes alone when the runtime uses no points."""

    def __init__(self, runtime: TaskRuntime) -> None:
        self.backbone = runtime.backbone
        self.active = not runtime.uses_points and hasattr(self.backbone, "carry_points")
        self.before = getattr(self.backbone, "carry_points", None)

    def __enter__(self) -> None:
        if self.active:
            self.backbone.carry_points = False  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.backbone.carry_points = self.before  # type: ignore[attr-defined]


def with_anchors(prompts: PromptSet, probabilities: dict[int, np.ndarray], config: PcswConfig,
                 in_plane_spacing: tuple[float, float]) -> PromptSet:
    """Each class's PCSW prompt followed by an anchor prompt on every other slice of the 3D
    component it prompts (see :attr:`TaskRuntime.anchors`).

    The component is the ``connectivity``-connected component of ``probability > threshold`` that
    holds the key prompt's positive point. An anchor on slice ``s`` is made from the component's
    pixels there exactly as PCSW makes its key prompt (box with PCSW's margin, deepest point,
    negative points from the other classes inside the box); its confidence is the component's
    mean probability on that slice.
    """
    from scipy import ndimage

    from .pcsw.generator import slice_prompt as pcsw_slice_prompt

    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[config.connectivity])
    classes = []
    for c in prompts.classes:
        key = c.prompts[0] if c.prompts else None
        if key is None or not key.positive_points or c.label not in probabilities:
            classes.append(c)
            continue
        prob = probabilities[c.label]
        fg = prob > config.threshold
        x, y = (int(round(v)) for v in key.positive_points[0])
        comps, _ = ndimage.label(fg, structure=structure)
        comp_id = comps[key.key_slice, y, x]
        if comp_id == 0:
            classes.append(c)
            continue
        component = comps == comp_id
        others = {lbl: p for lbl, p in probabilities.items() if lbl != c.label}
        anchors = []
        for s in np.flatnonzero(component.any(axis=(1, 2))):
            if s == key.key_slice:
                continue
            own = component[s]
            anchor = pcsw_slice_prompt(int(s), own, others, config, in_plane_spacing, float(prob[s][own].mean()))
            anchors.append(anchor)
        classes.append(ClassPrompts(c.label, c.name, list(c.prompts) + anchors, c.color))
    return PromptSet(prompts.slice_axis, classes)


def presence_gate(labels: np.ndarray, probabilities: dict[int, np.ndarray], classes: list[int],
                  threshold: float, fraction: float) -> dict[int, list[int]]:
    """Remove, in place, each of ``classes`` from the slices where the coarse head barely sees it.

    ``labels`` is the ``(S, H, W)`` label stack, ``probabilities`` label -> ``(S, H, W)``. On slice
    ``s`` a class with ``A`` pixels in ``labels`` is set to background when fewer than
    ``fraction * A`` pixels of its probability map exceed ``threshold``. Returns label -> removed slices.
    """
    removed: dict[int, list[int]] = {}
    for label in classes:
        prob = probabilities[label]
        for s in range(labels.shape[0]):
            here = labels[s] == label
            area = int(np.count_nonzero(here))
            if area and np.count_nonzero(prob[s] > threshold) < fraction * area:
                labels[s][here] = 0
                removed.setdefault(label, []).append(s)
    return removed


def mark_user_edits(edited: PromptSet, auto: PromptSet) -> PromptSet:
    """``edited`` with every class that is the user's marked ``source="user"`` on all its prompts.

    A class is the user's when any of its prompts says ``"user"`` or its prompts differ from the
    class's PCSW prompts in ``auto`` (compared by :meth:`ClassPrompts.fingerprint`, so a moved box
    counts even when its ``source`` still says ``"auto"``). User prompts get confidence 1.0.
    """
    auto_classes = auto.by_label()
    classes = []
    for c in edited.classes:
        before = auto_classes.get(c.label)
        marked_user = any(p.source == "user" for p in c.prompts)
        is_user = marked_user or before is None or before.fingerprint() != c.fingerprint()
        if is_user:
            prompts = [dataclasses.replace(p, source="user", confidence=1.0) for p in c.prompts]
            c = ClassPrompts(c.label, c.name, prompts, c.color)
        classes.append(c)
    return PromptSet(edited.slice_axis, classes)


def write_prompts_atomic(prompts: PromptSet, path: str | Path, volume: Volume | None = None,
                         coordinates: str = "voxel") -> Path:
    """Write the prompts JSON so that ``path`` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(prompts.to_json(volume, coordinates), fh, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def auto_segment(
    image: str | Path | Volume,
    model: str | Path | TaskModel,
    output: str | Path | None,
    prompts_out: str | Path | None,
    *,
    prompts_in: str | Path | PromptSet | None = None,
    device: str = "auto",
    frame: int | None = None,
    backbone: "Backbone | None" = None,
    prompt_points: bool | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> AutoSegmentResult:
    """Auto-segment one volume with a task model and write the label map and the prompts.

    Args:
        image: a volume file / DICOM folder, or a :class:`Volume`.
        model: a task-model file or a loaded :class:`TaskModel`.
        output: label map file (written atomically, on the input's grid); None writes none.
        prompts_out: prompts JSON to write (voxel coordinates); None writes none.
        prompts_in: an edited prompts file (or set) from an earlier run; see the module docstring.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        frame: frame of a 4D image.
        backbone: a built backbone to use (its decoder weights are replaced by the model's).
        prompt_points: see :attr:`TaskRuntime.prompt_points` (None: the backbone's default).
        progress / should_cancel: see :meth:`AutoSegmentSession.run`.

    Raises:
        InputError: unreadable image or prompts; output is a folder. TaskModelError: unusable
        model file or a backbone other than the model's. Cancelled: nothing was written.
    """
    from .volume_io import read_volume, write_volume

    if output is not None and Path(output).is_dir():
        raise InputError(output, "is a folder", "Give a file name such as seg.nii.gz or seg.nrrd.")
    volume = image if isinstance(image, Volume) else read_volume(image, frame=frame)
    source = "" if isinstance(model, TaskModel) else str(model)
    task = model if isinstance(model, TaskModel) else load_task_model(model)
    runtime = TaskRuntime.from_task_model(task, device=device, backbone=backbone, source=source)
    runtime = dataclasses.replace(runtime, prompt_points=prompt_points)
    session = AutoSegmentSession(volume, runtime)
    edited = None
    if prompts_in is not None:
        edited = prompts_in if isinstance(prompts_in, PromptSet) else PromptSet.load(prompts_in, volume)
        if edited.slice_axis != session.slice_axis:
            raise InputError(prompts_in if not isinstance(prompts_in, PromptSet) else None,
                             f"the edited prompts lie along slice axis {'ijk'[edited.slice_axis.axis]} but the task "
                             f"model slices along {'ijk'[session.slice_axis.axis]}",
                             "Edit the prompts file the last run wrote, without changing its slice_axis.")
    result = session.run(edited, progress=progress, should_cancel=should_cancel)
    if output is not None:
        write_volume(result.labels, output)  # atomic: temp file + rename
        log.info("wrote %s", output)
    if prompts_out is not None:
        write_prompts_atomic(result.prompts, prompts_out)
        log.info("wrote %s", prompts_out)
    return result
