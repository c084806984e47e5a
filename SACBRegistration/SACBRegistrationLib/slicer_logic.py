"""Headless logic of the Slicer module: MRML nodes in, MRML nodes out.

Runs unchanged inside 3D Slicer and under the ``slicer-core`` package (real MRML scene, nodes,
storage nodes, segmentation and transform logic; no Qt). The module's
``SACBRegistrationLogic`` combines it with ``ScriptedLoadableModuleLogic``.

How a registration runs:

1. the inputs are checked (nothing is created when they are wrong);
2. they are written to a temporary folder through MRML storage nodes (segmentations as label
   maps whose values follow the segment names, so fixed and moving labels correspond);
3. the engine runs in a separate Python process (Slicer's ``PythonSlicer``, or the current
   interpreter outside Slicer), printing ``PROGRESS`` lines that are parsed here;
4. the results are read back through storage nodes into new (or the selected) nodes, all at the
   end: a failure or a cancellation leaves the scene as it was, and the temporary folder goes
   (unless ``keepTemporaryFiles``: then its path is logged, for troubleshooting).

:meth:`RegistrationLogic.prepareResultDisplay` then arranges the MRML side of showing the results
(which node goes in which layer, 3D surfaces, the moving volume under the transform); the widget
does the view calls (layers, layout).

``RegistrationJob.poll()`` is non-blocking (the widget calls it from a timer); ``wait()`` blocks
(scripting and tests). No torch is imported in this process.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import slicer
import vtk

from .progress import parse_worker_line
from .runtime import enable_huge_pages
from .slicer_setup import installed_torch_version, too_old_message, version_at_least
from .vocabulary import (
    AFFINE_MODES,
    DEFAULT_QUALITY,
    DEVICES,
    QUALITY_PRESETS,
    SIMILARITIES,
    WORKER_ERROR,
    WORKER_RESULT,
    check_choice,
)

ROLE_FIXED = "spatialRegistrationFixed"
ROLE_MOVING = "spatialRegistrationMoving"
"""Slicer's standard registration roles on a transform node (``GetFixedNodeReferenceRole()`` /
``GetMovingNodeReferenceRole()`` of ``vtkMRMLTransformNode``), which other modules understand."""
MODULE_DIR = Path(__file__).resolve().parents[1]
"""The folder holding ``SACBRegistrationLib`` (put on the worker's ``PYTHONPATH``)."""
RESULT_FOREGROUND_OPACITY = 0.5
"""Opacity of the registered (foreground) volume over the fixed one in the slice views."""
ALL_SEGMENTS = ""
"""``fixedMaskSegment`` value meaning "the union of all segments" (and the label map's non-zero voxels)."""

_log = logging.getLogger(__name__)


class RegistrationError(RuntimeError):
    """A registration could not run or failed; the message is meant for the user."""


@dataclass
class OutputRequest:
    """Which outputs to create (each optional). A ``...Node`` is filled instead of creating a new one."""

    warpedVolume: bool = True
    transform: bool = True
    displacementRGB: bool = True
    clusterMaps: bool = True
    metricsTable: bool = True
    warpedSegmentation: bool = True
    jacobian: bool = True
    warpedVolumeNode: Any = None
    transformNode: Any = None
    displacementRGBNode: Any = None
    clusterMapsNode: Any = None
    metricsTableNode: Any = None
    warpedSegmentationNode: Any = None
    jacobianNode: Any = None


@dataclass
class RegistrationOutputs:
    """Nodes created or filled by a registration, and its figures."""

    warpedVolume: Any = None
    transform: Any = None
    displacementRGB: Any = None
    clusterMaps: Any = None
    metricsTable: Any = None
    warpedSegmentation: Any = None
    jacobian: Any = None
    folding: Any = None
    """A segmentation with the folded voxels (Jacobian determinant <= 0) as a segment, when there are any."""
    metrics: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    def nodes(self) -> List[Any]:
        return [n for n in (self.warpedVolume, self.transform, self.displacementRGB, self.clusterMaps,
                            self.metricsTable, self.warpedSegmentation, self.jacobian, self.folding) if n is not None]


# --------------------------------------------------------------------------- input checks


def _isVolume(node) -> bool:
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode")


def _describe(node) -> str:
    return f"'{node.GetName()}'" if node is not None else "(none)"


def checkVolume(node, role: str) -> None:
    """Raise ``ValueError`` naming the problem and the fix if ``node`` cannot be registered."""
    if node is None:
        raise ValueError(f"Select a {role} volume.")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"The {role} volume {_describe(node)} is a label map; select an intensity volume "
                         f"(label maps go in the segmentation selectors).")
    if node.IsA("vtkMRMLVectorVolumeNode") or not _isVolume(node):
        raise ValueError(f"The {role} volume {_describe(node)} is not a scalar (grey-level) volume; convert it "
                         f"first (e.g. Vector to Scalar Volume module).")
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"The {role} volume {_describe(node)} has no image data; load or compute it first.")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"The {role} volume {_describe(node)} has {image.GetNumberOfScalarComponents()} "
                         f"components per voxel; registration needs a grey-level volume.")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise ValueError(f"The {role} volume {_describe(node)} is 2D ({dims[0]} x {dims[1]} x {dims[2]}); "
                         f"registration needs 3D volumes.")
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"The {role} volume {_describe(node)} is under the transform "
                         f"'{node.GetParentTransformNode().GetName()}'; harden it (Data module, right-click, "
                         f"Harden transform) or remove it before registering.")


def checkSegmentation(node, role: str) -> None:
    if node is None:
        return
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        if node.GetImageData() is None:
            raise ValueError(f"The {role} label map {_describe(node)} has no image data.")
        return
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"The {role} segmentation {_describe(node)} is neither a segmentation nor a label map.")
    if node.GetSegmentation() is None or node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ValueError(f"The {role} segmentation {_describe(node)} has no segments; add segments or leave the "
                         f"selector empty.")
    if node.GetParentTransformNode() is not None:
        raise ValueError(f"The {role} segmentation {_describe(node)} is under a transform; harden it first.")


def checkMask(node, segmentId: Optional[str] = ALL_SEGMENTS) -> None:
    """Raise ``ValueError`` naming the problem and the fix if ``node`` (a segmentation or label map,
    or None) cannot serve as the fixed-image mask, or ``segmentId`` is not one of its segments."""
    if node is None:
        return
    checkSegmentation(node, "fixed-image mask")
    if segmentId and node.IsA("vtkMRMLSegmentationNode") and node.GetSegmentation().GetSegment(segmentId) is None:
        raise ValueError(f"The fixed-image mask {_describe(node)} has no segment with ID '{segmentId}'; choose one of "
                         f"its segments, or all segments.")
    if segmentId and node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"The fixed-image mask {_describe(node)} is a label map: it has no segments to choose "
                         f"(all its non-zero voxels are used); choose all segments.")


def checkInputs(fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None) -> None:
    """Raise ``ValueError`` naming the problem and the fix if the volumes and segmentations cannot be registered."""
    checkVolume(fixedVolume, "fixed")
    checkVolume(movingVolume, "moving")
    if fixedVolume is movingVolume or fixedVolume.GetID() == movingVolume.GetID():
        raise ValueError(f"The fixed and moving volumes are the same node {_describe(fixedVolume)}; choose two "
                         f"different volumes.")
    checkSegmentation(fixedSegmentation, "fixed")
    checkSegmentation(movingSegmentation, "moving")
    if (fixedSegmentation is None) != (movingSegmentation is None):
        raise ValueError("Select both a fixed and a moving segmentation (for Dice / HD95 before and after), or "
                         "neither.")


# --------------------------------------------------------------------------- MRML <-> files


def _segmentNames(node) -> List[str]:
    if node is None or not node.IsA("vtkMRMLSegmentationNode"):
        return []
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def writeVolume(node, path: Path) -> None:
    """Write a volume through a storage node that is not added to the scene (inputs untouched)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(node):
        raise RegistrationError(f"Could not write {_describe(node)} to {path}.")


def writeSegmentation(scene, node, referenceVolume, labels: Dict[str, int], path: Path,
                      segmentIds: Optional[List[str]] = None) -> None:
    """Write a segmentation as a label map on ``referenceVolume``'s grid, each segment at the value
    ``labels[name]`` (only ``segmentIds`` if given, else all); a label map volume is written as it is."""
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        writeVolume(node, path)
        return
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "SACBRegistrationTemporaryColors")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SACBRegistrationTemporaryLabelmap")
    try:
        colors.SetTypeToUser()
        colors.SetNumberOfColors(max(labels.values()) + 1)
        colors.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
        for name, value in labels.items():
            colors.SetColor(value, name, 1.0, 1.0, 1.0, 1.0)
        ids = vtk.vtkStringArray()
        if segmentIds is None:
            node.GetSegmentation().GetSegmentIDs(ids)
        else:
            for segmentId in segmentIds:
                ids.InsertNextValue(segmentId)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, ids, labelmap, referenceVolume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not ok or labelmap.GetImageData() is None:  # e.g. only empty segments
            raise RegistrationError(f"Could not convert the segmentation {_describe(node)} to a label map; check "
                                    f"that it has a binary labelmap representation and geometry.")
        writeVolume(labelmap, path)
    finally:
        for temporary in (labelmap, colors):
            displayNode = temporary.GetDisplayNode() if hasattr(temporary, "GetDisplayNode") else None
            if displayNode is not None:
                scene.RemoveNode(displayNode)
            scene.RemoveNode(temporary)
        for i in reversed(range(scene.GetNumberOfNodes())):  # the export adds a "<name>_ColorTable" too
            extra = scene.GetNthNode(i)
            if extra.GetID() not in existing and extra.IsA("vtkMRMLColorNode"):
                scene.RemoveNode(extra)


def _readInto(scene, className: str, name: str, path: Path, storageClass: str = "vtkMRMLVolumeArchetypeStorageNode"):
    node = scene.AddNewNodeByClass(className, name)
    storage = scene.AddNewNodeByClass(storageClass)
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RegistrationError(f"Could not read the result {path.name}.")
    except BaseException:
        scene.RemoveNode(node)
        raise
    finally:
        scene.RemoveNode(storage)  # the temporary files go; saving the scene writes new ones
    return node


def useLinearGridInterpolation(transformNode) -> int:
    """Make Slicer evaluate the displacement grids of a loaded transform as ITK does (trilinear).

    Slicer reads ITK displacement fields as grid transforms with *cubic* interpolation; the engine's
    field lives on the grid it was estimated on (coarser than the images), where cubic and trilinear
    differ between grid points. Trilinear makes the transform node, its hardening and the engine's
    warped image agree. Returns how many grids were switched (both directions of the node)."""
    switched = 0
    for transform in (transformNode.GetTransformFromParent(), transformNode.GetTransformToParent()):
        pending = [transform]
        while pending:
            current = pending.pop()
            if current is None:
                continue
            if current.IsA("vtkGridTransform"):
                current.SetInterpolationModeToLinear()
                switched += 1
            if current.IsA("vtkGeneralTransform"):
                pending.extend(current.GetConcatenatedTransform(i)
                               for i in range(current.GetNumberOfConcatenatedTransforms()))
    return switched


def _createDisplay(node) -> None:
    try:
        node.CreateDefaultDisplayNodes()
    except Exception:  # display nodes need application logic in some builds; the data is still there
        pass


# --------------------------------------------------------------------------- the worker process


def _findPythonSlicer() -> Optional[str]:
    """Slicer's Python interpreter: on PATH inside Slicer, else next to the running executable."""
    if getattr(slicer, "app", None) is None:
        return None  # outside Slicer: the current interpreter serves
    found = shutil.which("PythonSlicer")
    if found:
        return found
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file():
            return str(candidate)
    raise RegistrationError("PythonSlicer was not found next to Slicer; the registration worker cannot start.")


class RegistrationJob:
    """A registration running in a worker process.

    Attributes: ``state`` (``"running" | "succeeded" | "failed" | "cancelled"``), ``progress``
    (0-100, or -1 when unknown), ``message``, ``log`` (every line the worker printed),
    ``outputs`` (:class:`RegistrationOutputs` once succeeded), ``error`` (message once failed).
    """

    def __init__(self, logic: "RegistrationLogic", process: subprocess.Popen, workDir: Path, request: Dict[str, Any],
                 load: Callable[[Dict[str, Any]], RegistrationOutputs],
                 progressCallback: Optional[Callable[[int, str], None]] = None, keepWorkDir: bool = False) -> None:
        self.keepWorkDir = keepWorkDir
        self.logic = logic
        self.process = process
        self.workDir = workDir
        self.request = request
        self._load = load
        self._progressCallback = progressCallback
        self.state = "running"
        self.progress = 0
        self.message = "starting"
        self.log: List[str] = []
        self.outputs: Optional[RegistrationOutputs] = None
        self.error = ""
        self._result: Optional[Dict[str, Any]] = None
        self._errorLine: Optional[str] = None
        if keepWorkDir:
            self._noteKept()
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _noteKept(self) -> None:
        note = f"Temporary files kept in {self.workDir} (delete the folder when done)"
        self.log.append(note)
        _log.info("SACBRegistration: %s", note)

    def _removeWorkDir(self) -> None:
        if self.keepWorkDir:
            self._noteKept()
        else:
            shutil.rmtree(self.workDir, ignore_errors=True)

    def _read(self) -> None:
        try:
            for line in iter(self.process.stdout.readline, ""):
                self._lines.put(line.rstrip("\n"))
        except Exception as error:  # the job must fail, never stay "running"
            self._lines.put(f"{WORKER_ERROR}internal reading the registration process's output failed: {error}")
            _killProcessTree(self.process)
        finally:
            self._lines.put(None)

    def _handle(self, line: str) -> None:
        self.log.append(line)
        parsed = parse_worker_line(line)
        if parsed is not None:
            percent, message = parsed
            self.progress = -1 if percent is None else percent
            self.message = message
            if self._progressCallback:
                self._progressCallback(self.progress, message)
        elif line.startswith(WORKER_RESULT):
            self._result = json.loads(line[len(WORKER_RESULT):])
        elif line.startswith(WORKER_ERROR):
            self._errorLine = line[len(WORKER_ERROR):]

    def poll(self) -> bool:
        """Process what the worker printed; when it has ended, load the results (on this thread).
        Returns True while the job is still running."""
        if self.state != "running":
            return False
        finished = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                finished = True
                break
            self._handle(line)
        if finished:
            self.process.wait()
            self._finish()
        return self.state == "running"

    def _finish(self) -> None:
        try:
            if self._result is not None and self.process.returncode == 0:
                self.outputs = self._load(self._result)
                self.state = "succeeded"
                self.progress, self.message = 100, "done"
            else:
                self.state = "failed"
                if self._errorLine:
                    kind, _, message = self._errorLine.partition(" ")
                    self.error = message if kind != "internal" else (
                        f"{message} (unexpected error in the registration engine; details in the log)")
                else:
                    tail = "; ".join(self.log[-3:]) or "no output"
                    self.error = (f"The registration process stopped unexpectedly (exit code {self.process.returncode}); "
                                  f"last messages: {tail}")
        except Exception as error:  # loading failed: nothing was kept in the scene
            self.state = "failed"
            self.error = str(error)
        finally:
            self._removeWorkDir()

    def cancel(self) -> None:
        """Stop the worker and its children; temporary files go; the scene is left as it was."""
        if self.state != "running":
            return
        _killProcessTree(self.process)
        self.process.wait()
        self.state = "cancelled"
        self.message = "cancelled"
        self._removeWorkDir()

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> RegistrationOutputs:
        """Block until done; return the outputs or raise :class:`RegistrationError`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise RegistrationError(f"The registration did not finish within {timeout:.0f} s and was cancelled.")
            time.sleep(interval)
        if self.state == "succeeded":
            return self.outputs
        if self.state == "cancelled":
            raise RegistrationError("The registration was cancelled.")
        raise RegistrationError(self.error)


def _killProcessTree(process: subprocess.Popen) -> None:
    """End the worker and everything it started. POSIX: the worker leads its own process group.
    Windows: ``PythonSlicer`` is a launcher whose child does the work, and psutil is not bundled with
    Slicer, so ``taskkill /F /T`` ends the whole tree (``process.kill()`` alone would stop only the
    launcher and leave the registration running)."""
    if os.name == "posix":
        try:
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False,
                   creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    if process.poll() is None:
        process.kill()


# --------------------------------------------------------------------------- the logic


class RegistrationLogic:
    """Register MRML volumes with SACB-Net (see the module docstring).

    Args:
        scene: the MRML scene (default ``slicer.mrmlScene``).
        pythonExecutable: interpreter for the worker (default: ``PythonSlicer`` inside Slicer, the
            current interpreter elsewhere).
    """

    def __init__(self, scene=None, pythonExecutable: Optional[str] = None) -> None:
        self._scene = scene
        self.pythonExecutable = pythonExecutable

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    # -- models (no torch needed)

    @staticmethod
    def availableModels() -> List[Dict[str, Any]]:
        """Summaries of the usable model packages (embedded first)."""
        from . import registry
        return [dict(e.package.summary(), default=e.name == registry.DEFAULT_MODEL)
                for e in registry.list_models() if e.package is not None]

    @staticmethod
    def importModel(path: str, **metadata: Any) -> Dict[str, Any]:
        """Import a package folder / ``.zip``, or an authors' ``.pth.tar`` (then ``name``,
        ``spacing_mm``, ``intensity``, ``modality``, ``anatomy`` are required)."""
        from . import registry
        source = Path(path)
        if source.is_dir() or source.suffix == ".zip":
            return registry.import_package(source, metadata.get("name")).summary()
        return registry.import_official_checkpoint(source, **metadata).summary()

    @staticmethod
    def torchAvailable() -> bool:
        import importlib.util
        return importlib.util.find_spec("torch") is not None

    # -- registration

    def _workerCommand(self, request: Path) -> List[str]:
        executable = self.pythonExecutable or _findPythonSlicer() or sys.executable
        return [executable, "-m", "SACBRegistrationLib.worker", str(request)]

    def _launch(self, command: List[str]) -> subprocess.Popen:
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [environment.get("PYTHONPATH")] if p])
        environment["PYTHONUNBUFFERED"] = "1"
        enable_huge_pages(environment)
        environment["PYTHONIOENCODING"] = "utf-8"  # the worker writes UTF-8 whatever the system locale
        options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                       encoding="utf-8", errors="replace", bufsize=1, env=environment)
        if os.name == "posix":
            options["start_new_session"] = True  # its own process group: cancel ends its children too
        else:  # Windows: own process group, no console window
            options["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                        | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return subprocess.Popen(command, **options)

    def startRegistration(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None, *,
                          model: Optional[str] = None, device: str = "auto", clusters: Optional[int] = None,
                          quality: str = DEFAULT_QUALITY, ioSteps: Optional[int] = None, affine: Optional[str] = None,
                          similarity: str = "auto", labelInterpolation: str = "nearest",
                          outputs: Optional[OutputRequest] = None,
                          progressCallback: Optional[Callable[[int, str], None]] = None,
                          fixedMask=None, fixedMaskSegment: Optional[str] = ALL_SEGMENTS,
                          keepTemporaryFiles: bool = False) -> RegistrationJob:
        """Check the inputs, write them, start the worker and return the running job.

        ``fixedMask``: optional segmentation (or label map) on the fixed image; instance optimisation
        compares the images only inside it: the segment ``fixedMaskSegment`` (an ID), or all segments
        united when it is empty. ``keepTemporaryFiles``: leave the temporary folder (inputs as written,
        request, engine outputs) in place and log its path, for troubleshooting.
        """
        if not self.torchAvailable():
            raise RegistrationError("PyTorch is not installed in this Slicer: install the 'PyTorch' extension from the "
                                    "Extensions Manager (the module offers it when you press Apply), restart Slicer, "
                                    "then register again.")
        torchVersion = installed_torch_version()
        if torchVersion is not None and not _versionOk(torchVersion):
            raise RegistrationError(too_old_message(torchVersion))
        checkInputs(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation)
        checkMask(fixedMask, fixedMaskSegment)
        check_choice("quality", quality, QUALITY_PRESETS)
        check_choice("device", device, DEVICES)
        check_choice("similarity", similarity, SIMILARITIES)
        if affine is not None:
            check_choice("affine", affine, AFFINE_MODES)
        outputs = outputs or OutputRequest()
        scene = self.scene
        tempRoot = getattr(getattr(slicer, "app", None), "temporaryPath", None)
        workDir = Path(tempfile.mkdtemp(prefix="SACBRegistration-", dir=tempRoot))
        try:
            writeVolume(fixedVolume, workDir / "fixed.nrrd")
            writeVolume(movingVolume, workDir / "moving.nrrd")
            names = list(dict.fromkeys(_segmentNames(fixedSegmentation) + _segmentNames(movingSegmentation)))
            labels = {name: i + 1 for i, name in enumerate(names)}
            request: Dict[str, Any] = {
                "fixed": str(workDir / "fixed.nrrd"), "moving": str(workDir / "moving.nrrd"),
                "fixed_segmentation": None, "moving_segmentation": None, "output": str(workDir / "output"),
                "overview": False, "label_names": {str(v): k for k, v in labels.items()},
                "extras": ["jacobian"] if outputs.jacobian else [],
                "options": {"quality": quality, "model": model, "device": device, "clusters": clusters,
                            "io_steps": None if ioSteps is None else int(ioSteps), "affine": affine,
                            "similarity": similarity, "label_interpolation": labelInterpolation,
                            "cluster_maps": bool(outputs.clusterMaps)},
            }
            if fixedSegmentation is not None:
                writeSegmentation(scene, fixedSegmentation, fixedVolume, labels, workDir / "fixed_segmentation.nrrd")
                writeSegmentation(scene, movingSegmentation, movingVolume, labels, workDir / "moving_segmentation.nrrd")
                request["fixed_segmentation"] = str(workDir / "fixed_segmentation.nrrd")
                request["moving_segmentation"] = str(workDir / "moving_segmentation.nrrd")
            if fixedMask is not None:
                maskNames = {name: 1 for name in _segmentNames(fixedMask)}  # every exported segment -> 1
                writeSegmentation(scene, fixedMask, fixedVolume, maskNames, workDir / "fixed_mask.nrrd",
                                  [fixedMaskSegment] if fixedMaskSegment else None)
                request["fixed_mask"] = str(workDir / "fixed_mask.nrrd")
            requestPath = workDir / "request.json"
            requestPath.write_text(json.dumps(request))
            process = self._launch(self._workerCommand(requestPath))
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

        def load(report: Dict[str, Any]) -> RegistrationOutputs:
            return self._loadResults(report, workDir / "output", fixedVolume, movingVolume, movingSegmentation,
                                     outputs)

        return RegistrationJob(self, process, workDir, request, load, progressCallback, keepWorkDir=keepTemporaryFiles)

    def registerVolumes(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None,
                        timeout: Optional[float] = None, **options: Any) -> RegistrationOutputs:
        """Blocking registration (scripting, tests): the outputs, or :class:`RegistrationError`."""
        return self.startRegistration(fixedVolume, movingVolume, fixedSegmentation, movingSegmentation,
                                      **options).wait(timeout)

    # -- results

    def _loadResults(self, report: Dict[str, Any], folder: Path, fixedVolume, movingVolume, movingSegmentation,
                     request: OutputRequest) -> RegistrationOutputs:
        scene = self.scene
        created: List[Any] = []
        result = RegistrationOutputs(report=report, metrics=report.get("metrics", {}),
                                     warnings=list(report.get("warnings", [])))
        base = movingVolume.GetName()
        try:
            if request.warpedVolume:
                node = _readInto(scene, "vtkMRMLScalarVolumeNode", f"{base} registered", folder / "warped.nii.gz")
                created.append(node)
                _createDisplay(node)
                result.warpedVolume = node
            if request.transform:
                node = _readInto(scene, "vtkMRMLGridTransformNode", f"{base} to {fixedVolume.GetName()} (SACB)",
                                 folder / "transform.h5", "vtkMRMLTransformStorageNode")
                created.append(node)
                useLinearGridInterpolation(node)
                node.SetNodeReferenceID(ROLE_FIXED, fixedVolume.GetID())
                node.SetNodeReferenceID(ROLE_MOVING, movingVolume.GetID())
                result.transform = node
            if request.displacementRGB:
                node = _readInto(scene, "vtkMRMLVectorVolumeNode", f"{base} displacement (RGB)",
                                 folder / "displacement_rgb.nrrd")
                created.append(node)
                _createDisplay(node)
                result.displacementRGB = node
            if request.clusterMaps and any(k.startswith("clusters_") for k in report.get("outputs", {})):
                node = self._clusterSegmentation(folder, fixedVolume, f"{fixedVolume.GetName()} SACB clusters", created)
                result.clusterMaps = node
            if request.warpedSegmentation and movingSegmentation is not None and (folder / "warped_segmentation.nii.gz").is_file():
                node = self._warpedSegmentation(folder, fixedVolume, movingSegmentation, report, created)
                result.warpedSegmentation = node
            if request.jacobian and (folder / "jacobian.nii.gz").is_file():
                node = _readInto(scene, "vtkMRMLScalarVolumeNode", f"{base} Jacobian determinant",
                                 folder / "jacobian.nii.gz")
                created.append(node)
                showJacobian(scene, node)
                result.jacobian = node
                result.folding = self._foldingSegmentation(node, fixedVolume, f"{base} folding", created)
            if request.metricsTable:
                node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{base} registration metrics")
                created.append(node)
                fillMetricsTable(node, result.metrics)
                result.metricsTable = node
            # all read: now move the results into the nodes the user selected, if any
            for attribute in ("warpedVolume", "transform", "displacementRGB", "clusterMaps", "metricsTable",
                              "warpedSegmentation", "jacobian"):
                target = getattr(request, attribute + "Node")
                loaded = getattr(result, attribute)
                if target is not None and loaded is not None:
                    _transferContent(scene, loaded, target)
                    created.remove(loaded)
                    scene.RemoveNode(loaded)
                    setattr(result, attribute, target)
        except BaseException:
            for node in reversed(created):
                for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
                    display = node.GetNthDisplayNode(i)
                    if display is not None:
                        scene.RemoveNode(display)
                scene.RemoveNode(node)
            raise
        return result

    def _clusterSegmentation(self, folder: Path, fixedVolume, name: str, created: List[Any]):
        """One segmentation with a segment per (level, cluster) of the fixed image, coloured from a
        colour table, only the finest level visible."""
        from .pipeline.visualisation import PALETTE

        scene = self.scene
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        created.append(segmentation)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
        for level in (2, 3, 4, 5):
            path = folder / f"clusters_level{level}_fixed.nii.gz"
            if not path.is_file():
                continue
            labelmap = _readInto(scene, "vtkMRMLLabelMapVolumeNode", f"level {level}", path)
            try:
                before = segmentation.GetSegmentation().GetNumberOfSegments()
                slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
                segments = segmentation.GetSegmentation()
                for i in range(before, segments.GetNumberOfSegments()):
                    segment = segments.GetNthSegment(i)
                    cluster = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else i - before + 1
                    segment.SetName(f"level {level} cluster {cluster}")
                    segment.SetColor(*(float(c) / 255 for c in PALETTE[cluster % len(PALETTE)]))
            finally:
                scene.RemoveNode(labelmap)
        _createDisplay(segmentation)
        display = segmentation.GetDisplayNode()
        if display is not None:
            segments = segmentation.GetSegmentation()
            for i in range(segments.GetNumberOfSegments()):
                display.SetSegmentVisibility(segments.GetNthSegmentID(i), segments.GetNthSegment(i).GetName().startswith("level 2 "))
        return segmentation

    def _foldingSegmentation(self, jacobian, fixedVolume, name: str, created: List[Any]):
        """A segmentation with one segment, the folded voxels (determinant <= 0), or None without any."""
        determinant = slicer.util.arrayFromVolume(jacobian)
        folded = determinant <= 0
        if not folded.any():
            return None
        scene = self.scene
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels")
        try:
            labelmap.CopyOrientation(jacobian)
            slicer.util.updateVolumeFromArray(labelmap, folded.astype(np.uint8))
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            created.append(segmentation)
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
            segment = segmentation.GetSegmentation().GetNthSegment(0)
            segment.SetName(FOLDING_SEGMENT)
            segment.SetColor(*FOLDING_COLOUR)
            _createDisplay(segmentation)
            return segmentation
        finally:
            scene.RemoveNode(labelmap)

    def _warpedSegmentation(self, folder: Path, fixedVolume, movingSegmentation, report, created: List[Any]):
        scene = self.scene
        name = f"{movingSegmentation.GetName()} registered"
        labelmap = _readInto(scene, "vtkMRMLLabelMapVolumeNode", name, folder / "warped_segmentation.nii.gz")
        if movingSegmentation.IsA("vtkMRMLLabelMapVolumeNode"):
            created.append(labelmap)
            _createDisplay(labelmap)
            return labelmap
        try:
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            created.append(segmentation)
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
            names = {int(k): v for k, v in (report.get("options", {}).get("label_names") or {}).items()}
            source = movingSegmentation.GetSegmentation()
            colours = {source.GetNthSegment(i).GetName(): source.GetNthSegment(i).GetColor()
                       for i in range(source.GetNumberOfSegments())}
            target = segmentation.GetSegmentation()
            for i in range(target.GetNumberOfSegments()):
                segment = target.GetNthSegment(i)
                value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else i + 1
                label_name = names.get(value)
                if label_name:
                    segment.SetName(label_name)
                    if label_name in colours:
                        segment.SetColor(*colours[label_name])
            _createDisplay(segmentation)
            return segmentation
        finally:
            scene.RemoveNode(labelmap)

    def prepareResultDisplay(self, fixedVolume, movingVolume, outputs: RegistrationOutputs) -> "ResultDisplay":
        """The MRML side of showing a finished registration; returns what the views should show.

        * slice views: the fixed volume in the background, the warped volume over it (opacity
          :data:`RESULT_FOREGROUND_OPACITY`); without a warped volume but with a transform, the
          moving volume is placed under the transform and shown over the fixed one instead;
        * the warped segmentation (a segmentation node) gets its closed-surface representation and
          is visible in 3D (the surface needs Slicer's converter rules, registered at start-up);
        * the metrics table is the table to show.
        """
        display = ResultDisplay(background=fixedVolume, table=outputs.metricsTable)
        if outputs.warpedVolume is not None:
            display.foreground = outputs.warpedVolume
        elif outputs.transform is not None and movingVolume is not None:
            movingVolume.SetAndObserveTransformNodeID(outputs.transform.GetID())
            display.foreground = movingVolume
        segmentation = outputs.warpedSegmentation
        if segmentation is not None and segmentation.IsA("vtkMRMLSegmentationNode"):
            if segmentation.GetDisplayNode() is None:
                _createDisplay(segmentation)
            display.surfaceCreated = bool(segmentation.CreateClosedSurfaceRepresentation())
            displayNode = segmentation.GetDisplayNode()
            if displayNode is not None:
                displayNode.SetVisibility(True)
                displayNode.SetVisibility3D(True)
            display.segmentation3D = segmentation
        return display

    @staticmethod
    def maskSegmentChoices(node) -> List[tuple]:
        """(label, value) pairs for the mask's segment selector: all segments (value
        :data:`ALL_SEGMENTS`) first, then each segment by name (value: its ID)."""
        if node is None:
            return []
        if not node.IsA("vtkMRMLSegmentationNode"):
            return [("All labels (non-zero voxels)", ALL_SEGMENTS)]
        segmentation = node.GetSegmentation()
        choices = [("All segments (union)", ALL_SEGMENTS)]
        for i in range(segmentation.GetNumberOfSegments()):
            choices.append((segmentation.GetNthSegment(i).GetName(), segmentation.GetNthSegmentID(i)))
        return choices


@dataclass
class ResultDisplay:
    """What the views should show after a registration (see :meth:`RegistrationLogic.prepareResultDisplay`)."""

    background: Any = None
    foreground: Any = None
    foregroundOpacity: float = RESULT_FOREGROUND_OPACITY
    table: Any = None
    segmentation3D: Any = None
    surfaceCreated: bool = False


JACOBIAN_WINDOW = (0.0, 2.0)
"""Display range of the Jacobian determinant: centred at 1 (volume kept), 0 (collapse) to 2 (doubling)."""
DIVERGING_COLOURS = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
"""Slicer's diverging blue-white-red colour table (blue: shrinking, white: kept, red: expanding)."""
FOLDING_SEGMENT = "folded voxels (Jacobian determinant <= 0)"
FOLDING_COLOUR = (1.0, 0.9, 0.0)


def showJacobian(scene, node) -> None:
    """Display a Jacobian-determinant volume with a diverging colour map centred at 1 (when Slicer's
    colour tables are loaded; under slicer-core the window alone is set)."""
    _createDisplay(node)
    display = node.GetDisplayNode()
    if display is None:
        return
    low, high = JACOBIAN_WINDOW
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    if scene.GetNodeByID(DIVERGING_COLOURS) is not None:
        display.SetAndObserveColorNodeID(DIVERGING_COLOURS)


def _versionOk(version: str) -> bool:
    try:
        return version_at_least(version)
    except ValueError:  # unreadable: let the worker try and report
        return True


def _transferContent(scene, source, target) -> None:
    """Move a loaded result into a node the user selected (same kind)."""
    if target.IsA("vtkMRMLTransformNode"):
        target.SetAndObserveTransformFromParent(source.GetTransformFromParent())
        for role in (ROLE_FIXED, ROLE_MOVING):
            target.SetNodeReferenceID(role, source.GetNodeReferenceID(role))
    elif target.IsA("vtkMRMLVolumeNode"):
        matrix = vtk.vtkMatrix4x4()
        source.GetIJKToRASMatrix(matrix)
        target.SetIJKToRASMatrix(matrix)
        target.SetAndObserveImageData(source.GetImageData())
        if target.GetDisplayNode() is None:
            _createDisplay(target)
    elif target.IsA("vtkMRMLSegmentationNode") and source.IsA("vtkMRMLLabelMapVolumeNode"):
        # a label-map result (the moving segmentation was a label map) into a chosen segmentation
        target.GetSegmentation().RemoveAllSegments()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(source, target)
        if target.GetDisplayNode() is None:
            _createDisplay(target)
    elif target.IsA("vtkMRMLSegmentationNode"):
        target.GetSegmentation().DeepCopy(source.GetSegmentation())
        if target.GetDisplayNode() is None:
            _createDisplay(target)
    elif target.IsA("vtkMRMLTableNode"):
        target.GetTable().DeepCopy(source.GetTable())
        target.Modified()
    else:
        raise RegistrationError(f"Cannot write a result into {_describe(target)} ({target.GetClassName()}).")


TABLE_COLUMNS = (("label", "Label"), ("name", "Segment"), ("dice_before", "Dice before"), ("dice_after", "Dice after"),
                 ("hd95_before_mm", "HD95 before (mm)"), ("hd95_after_mm", "HD95 after (mm)"),
                 ("assd_before_mm", "ASSD before (mm)"), ("assd_after_mm", "ASSD after (mm)"), ("value", "Value"))


def fillMetricsTable(node, metrics: Dict[str, Any]) -> None:
    """Per-segment Dice / HD95 / ASSD before and after and a mean row, then one row per regularity
    figure of the field (its name under "Segment", its number under "Value")."""
    table = vtk.vtkTable()
    columns = []
    for key, title in TABLE_COLUMNS:
        array = vtk.vtkStringArray() if key == "name" else vtk.vtkDoubleArray()
        array.SetName(title)
        table.AddColumn(array)
        columns.append((key, array))
    rows = list(metrics.get("labels", []))
    if rows:
        rows.append(dict(metrics.get("summary", {}), label=float("nan"), name="mean"))
    regularity = metrics.get("regularity", {})
    extra = [("folding: voxels with |J| < 0 (%)", regularity.get("negative_jacobian_percent")),
             ("SDlogJ", regularity.get("sdlogj")), ("Jacobian min", regularity.get("jacobian_min")),
             ("Jacobian max", regularity.get("jacobian_max"))]
    for row in rows:
        for key, array in columns:
            value = row.get(key)
            if key == "name":
                array.InsertNextValue(str(value or ""))
            else:
                array.InsertNextValue(float("nan") if value is None else float(value))
    for label, value in extra:
        for key, array in columns:
            if key == "name":
                array.InsertNextValue(label)
            elif key == "value":
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue(float("nan"))
    node.SetAndObserveTable(table)
    node.SetAttribute("SACBRegistration.Metrics", json.dumps(metrics))
