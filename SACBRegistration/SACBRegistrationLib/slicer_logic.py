"""Headless logic of the Slicer module: MRML nodes in, MRML nodes out.

Runs unchanged inside 3D Slicer and under the ``slicer-core`` package (real MRML scene, nodes,
storage nodes, segmentation and transform logic; no Qt). The module's
``SACBRegistrationLogic`` combines :class:`RegistrationLogic` with ``ScriptedLoadableModuleLogic``.

How a registration runs, one module per stage:

1. the inputs are checked (nothing is created when they are wrong) and
2. written to a temporary folder through MRML storage nodes (segmentations as label maps whose
   values follow the segment names, so fixed and moving labels correspond): :mod:`.slicer_inputs`;
3. the engine runs in a separate Python process (Slicer's ``PythonSlicer``, or the current
   interpreter outside Slicer), printing ``PROGRESS`` lines that are parsed here
   (:class:`~.slicer_worker.RegistrationJob`): :mod:`.slicer_worker`;
4. the results are read back through storage nodes into new (or the selected) nodes, all at the
   end: a failure or a cancellation leaves the scene as it was, and the temporary folder goes
   (unless ``keepTemporaryFiles``: then its path is logged, for troubleshooting): :mod:`.slicer_results`.

:meth:`RegistrationLogic.prepareResultDisplay` then arranges the MRML side of showing the results
(which node goes in which layer, 3D surfaces, the moving volume under the transform); the widget
does the view calls (layers, layout).

``RegistrationJob.poll()`` is non-blocking (the widget calls it from a timer); ``wait()`` blocks
(scripting and tests). No torch is imported in this process. The names of the stage modules are
re-exported here (``from SACBRegistrationLib.slicer_logic import OutputRequest, ...``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import slicer

from .slicer_errors import RegistrationError, describeNode
from .slicer_inputs import (
    ALL_SEGMENTS,
    checkInputs,
    checkMask,
    checkSegmentation,
    checkVolume,
    maskSegmentChoices,
    segmentNames,
    writeInputs,
    writeSegmentation,
    writeVolume,
)
from .slicer_results import (
    DIVERGING_COLOURS,
    FOLDING_COLOUR,
    FOLDING_SEGMENT,
    JACOBIAN_WINDOW,
    RESULT_FOREGROUND_OPACITY,
    ROLE_FIXED,
    ROLE_MOVING,
    TABLE_COLUMNS,
    OutputRequest,
    RegistrationOutputs,
    ResultDisplay,
    fillMetricsTable,
    foldingSegmentation,
    loadResults,
    prepareResultDisplay,
    showJacobian,
    transferContent,
    useLinearGridInterpolation,
)
from .slicer_setup import installed_torch_version, too_old_message, version_at_least
from .slicer_worker import MODULE_DIR, RegistrationJob, findPythonSlicer, killProcessTree, launchWorker, workerCommand
from .vocabulary import AFFINE_MODES, DEFAULT_QUALITY, DEVICES, QUALITY_PRESETS, SIMILARITIES, check_choice

__all__ = [
    "ALL_SEGMENTS", "DIVERGING_COLOURS", "FOLDING_COLOUR", "FOLDING_SEGMENT", "JACOBIAN_WINDOW", "MODULE_DIR",
    "RESULT_FOREGROUND_OPACITY", "ROLE_FIXED", "ROLE_MOVING", "TABLE_COLUMNS", "OutputRequest", "RegistrationError",
    "RegistrationJob", "RegistrationLogic", "RegistrationOutputs", "ResultDisplay", "checkInputs", "checkMask",
    "checkSegmentation", "checkVolume", "describeNode", "fillMetricsTable", "findPythonSlicer", "killProcessTree",
    "launchWorker", "segmentNames", "showJacobian", "transferContent", "useLinearGridInterpolation",
    "workerCommand", "writeSegmentation", "writeVolume",
]


def _versionOk(version: str) -> bool:
    try:
        return version_at_least(version)
    except ValueError:  # unreadable: let the worker try and report
        return True


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
        return workerCommand(request, self.pythonExecutable)

    def _launch(self, command: List[str]) -> subprocess.Popen:
        return launchWorker(command)

    def startRegistration(self, fixedVolume, movingVolume, fixedSegmentation=None, movingSegmentation=None, *,
                          model: Optional[str] = None, device: str = "auto", clusters: Optional[int] = None,
                          quality: str = DEFAULT_QUALITY, ioSteps: Optional[int] = None, affine: Optional[str] = None,
                          similarity: str = "auto", labelInterpolation: str = "nearest", finePass: Optional[bool] = None,
                          outputs: Optional[OutputRequest] = None,
                          progressCallback: Optional[Callable[[int, str], None]] = None,
                          fixedMask=None, fixedMaskSegment: Optional[str] = ALL_SEGMENTS,
                          keepTemporaryFiles: bool = False) -> RegistrationJob:
        """Check the inputs, write them, start the worker and return the running job.

        ``fixedMask``: optional segmentation (or label map) on the fixed image; instance optimisation
        compares the images only inside it: the segment ``fixedMaskSegment`` (an ID), or all segments
        united when it is empty. ``finePass``: run the network once more at twice its resolution on the
        images warped half-way (None: the preset's, off). ``keepTemporaryFiles``: leave the temporary folder (inputs as written,
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
        if finePass is not None and not isinstance(finePass, bool):
            raise ValueError(f"expected finePass True, False or None (the preset's), got {finePass!r}")
        outputs = outputs or OutputRequest()
        tempRoot = getattr(getattr(slicer, "app", None), "temporaryPath", None)
        workDir = Path(tempfile.mkdtemp(prefix="SACBRegistration-", dir=tempRoot))
        try:
            inputs = writeInputs(self.scene, workDir, fixedVolume, movingVolume, fixedSegmentation, movingSegmentation,
                                 fixedMask, fixedMaskSegment)
            request: Dict[str, Any] = {
                "fixed": inputs["fixed"], "moving": inputs["moving"],
                "fixed_segmentation": inputs["fixed_segmentation"], "moving_segmentation": inputs["moving_segmentation"],
                "output": str(workDir / "output"), "overview": False, "label_names": inputs["label_names"],
                "extras": ["jacobian"] if outputs.jacobian else [],
                "options": {"quality": quality, "model": model, "device": device, "clusters": clusters,
                            "io_steps": None if ioSteps is None else int(ioSteps), "affine": affine,
                            "fine_pass": finePass,
                            "similarity": similarity, "label_interpolation": labelInterpolation,
                            "cluster_maps": bool(outputs.clusterMaps)},
            }
            if "fixed_mask" in inputs:
                request["fixed_mask"] = inputs["fixed_mask"]
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
        return loadResults(self.scene, report, folder, fixedVolume, movingVolume, movingSegmentation, request)

    def _foldingSegmentation(self, jacobian, fixedVolume, name: str, created: List[Any]):
        return foldingSegmentation(self.scene, jacobian, fixedVolume, name, created)

    def prepareResultDisplay(self, fixedVolume, movingVolume, outputs: RegistrationOutputs) -> ResultDisplay:
        """The MRML side of showing a finished registration; returns what the views should show
        (see :func:`.slicer_results.prepareResultDisplay`)."""
        return prepareResultDisplay(fixedVolume, movingVolume, outputs)

    maskSegmentChoices = staticmethod(maskSegmentChoices)
