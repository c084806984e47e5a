"""SACB Registration: deep-learning deformable registration with SACB-Net (CVPR 2025) in 3D Slicer.

Module, parameter node, Widget (maps the GUI to the Logic, nothing else), Logic (headless; the
implementation lives in ``SACBRegistrationLib/slicer_logic.py`` and its stage modules
``slicer_inputs``, ``slicer_worker`` and ``slicer_results``, so it also runs outside Slicer) and
Test. Nothing heavy happens at import or in ``setup()``: torch is only needed by the worker process
that runs the registration, and is installed through the PyTorch extension when missing.
"""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
    vtkMRMLVectorVolumeNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SACBRegistrationLib import slicer_setup
from SACBRegistrationLib.slicer_controller import RegistrationController
from SACBRegistrationLib.slicer_logic import RegistrationError, RegistrationLogic
from SACBRegistrationLib.slicer_results import outputRequestFromParameters
from SACBRegistrationLib.slicer_settings import ModuleSettings
from SACBRegistrationLib.vocabulary import AFFINE_MODES, DEFAULT_DEVICE, DEFAULT_QUALITY, DEVICES, QUALITY_PRESETS, SIMILARITIES

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = MODULE_DIR / "Resources" / "SampleData"
PAPER = ("X. Cheng, T. Zhang, W. Lu, Q. Meng, A. F. Frangi, J. Duan. SACB-Net: Spatial-awareness Convolutions "
         "for Medical Image Registration. CVPR 2025.")


#
# SACBRegistration
#


class SACBRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SACB Registration")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SACBRegistration developers"]
        self.parent.helpText = _(
            "Deformable registration of a moving volume to a fixed volume with SACB-Net, a deep network whose "
            "spatial-awareness convolutions adapt their kernels to k-means clusters of the image features. "
            "Produces the warped volume, a displacement-field transform you can apply or harden, an RGB picture "
            "of the field, the SACB cluster maps and a Dice / HD95 / ASSD table when segmentations are given. "
            "Runs in the background on CUDA or the CPU. "
            "<a href=\"https://github.com/SACBRegistration/SlicerSACBRegistration\">Documentation</a>.")
        self.parent.acknowledgementText = _(
            f"Method: {PAPER} The bundled sample data derive from the MNI ICBM152 2009a template "
            "(Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
            "Institute, McGill University).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the bundled brain pair (volumes and segmentations, checksummed) in Sample Data."""
    import SampleData

    meta = json.loads((SAMPLE_DIR / "SampleData.json").read_text())
    order = ("fixed", "moving", "fixed_segmentation", "moving_segmentation")
    files = [meta["files"][key] for key in order]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SACB Registration",
        sampleName="SACBBrainPair",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "SACBBrainPair.png"),
        uris=[(SAMPLE_DIR / f["file"]).as_uri() for f in files],
        fileNames=[f"SACBBrainPair_{f['file']}" for f in files],
        nodeNames=["SACBBrainPair fixed", "SACBBrainPair moving", "SACBBrainPair fixed segmentation",
                   "SACBBrainPair moving segmentation"],
        checksums=[f"SHA256:{f['sha256']}" for f in files],
        loadFileTypes=["VolumeFile", "VolumeFile", "SegmentationFile", "SegmentationFile"],
    )


#
# Parameter node
#


@parameterNodeWrapper
class SACBRegistrationParameterNode:
    """Inputs, options and (optional) output nodes of a registration.

    clusters: k-means clusters per SACB block, 0 = the model's own.
    quality: the preset (fast | balanced | accurate); "preset" / -1 below mean "as the preset says".
    ioSteps: instance-optimisation steps per level (-1 = the preset's, 0 = off).
    similarity: instance-optimisation similarity (auto | lncc | mind).
    finePass: run the network once more at twice its resolution (False = the preset's, off in every preset).
    fixedMask: optional region of the fixed image that instance optimisation compares;
    fixedMaskSegment: the segment ID used from it ("" = all segments united; set by the widget).
    keepTemporaryFiles: leave the worker's temporary folder in place (its path goes to the log).
    create*: which outputs to produce; the matching node is filled, or a new one created if empty.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    fixedMaskSegment: str = ""
    model: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = DEFAULT_DEVICE
    clusters: Annotated[int, WithinRange(0, 16)] = 0
    quality: Annotated[str, Choice(list(QUALITY_PRESETS))] = DEFAULT_QUALITY
    ioSteps: Annotated[int, WithinRange(-1, 2000)] = -1
    affine: Annotated[str, Choice(["preset"] + list(AFFINE_MODES))] = "preset"
    similarity: Annotated[str, Choice(list(SIMILARITIES))] = "auto"
    finePass: bool = False
    keepTemporaryFiles: bool = False
    createWarpedVolume: bool = True
    createTransform: bool = True
    createDisplacementRGB: bool = True
    createClusterMaps: bool = True
    createMetricsTable: bool = True
    createWarpedSegmentation: bool = True
    createJacobian: bool = True
    warpedVolume: vtkMRMLScalarVolumeNode
    transform: vtkMRMLTransformNode
    displacementRGB: vtkMRMLVectorVolumeNode
    clusterMaps: vtkMRMLSegmentationNode
    metricsTable: vtkMRMLTableNode
    warpedSegmentation: vtkMRMLSegmentationNode
    jacobian: vtkMRMLScalarVolumeNode


#
# SACBRegistrationWidget
#


class SACBRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Maps the GUI to the Logic; the Logic does the work."""

    POLL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._controller = None
        self._settings = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SACBRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SACBRegistrationLogic()
        self._settings = ModuleSettings(qt.QSettings())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.fixedMaskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.refreshMaskSegments)
        self.ui.fixedMaskSegmentComboBox.connect("currentIndexChanged(int)", self.onMaskSegmentSelected)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._controller = RegistrationController(self.logic, self, self._timer)
        self._timer.connect("timeout()", self._controller.poll)
        self.ui.progressBar.setVisible(False)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._controller.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._controller.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        isNew = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode") is None
        parameterNode = self.logic.getParameterNode()
        if isNew:  # a new scene: start from the options used last time (a saved scene keeps its own)
            remembered = self._settings.restore([m["name"] for m in self.logic.availableModels()])
            parameterNode.device, parameterNode.quality = remembered["device"], remembered["quality"]
            parameterNode.model = remembered["model"]
        self.setParameterNode(parameterNode)
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode: Optional[SACBRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._selectModelInCombo(self._parameterNode.model)
            self.refreshMaskSegments(self._parameterNode.fixedMask)
            self._checkCanApply()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        p = self._parameterNode
        if p:  # remembered for the next session (qt.QSettings)
            self._settings.remember({"device": p.device, "quality": p.quality, "model": p.model})

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._controller is not None and self._controller.running:
            return  # the button is the Cancel button while a registration runs
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and self.ui.modelComboBox.count)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Register the moving volume to the fixed volume") if ready else _(
            "Select a fixed and a moving volume (and install or import a model)")

    # -- fixed-image mask

    def refreshMaskSegments(self, mask) -> None:
        """Fill the segment selector from ``mask`` (all segments first), keeping the chosen segment. Called
        with the selector's new node (its signal may come before the parameter node is updated)."""
        p = self._parameterNode
        chosen = p.fixedMaskSegment if p else ""
        combo = self.ui.fixedMaskSegmentComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for label, value in self.logic.maskSegmentChoices(mask):
            combo.addItem(label, value)
        combo.setCurrentIndex(max(0, combo.findData(chosen)) if combo.count else -1)
        combo.enabled = combo.count > 1
        combo.blockSignals(wasBlocked)
        if p and combo.count and (combo.itemData(combo.currentIndex) or "") != chosen:
            p.fixedMaskSegment = combo.itemData(combo.currentIndex) or ""  # the chosen segment is gone: all

    def onMaskSegmentSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.fixedMaskSegment = self.ui.fixedMaskSegmentComboBox.itemData(index) or ""

    # -- models

    def refreshModels(self) -> None:
        # keep the user's choice: clearing and refilling the box must not overwrite the parameter node
        chosen = self._parameterNode.model if self._parameterNode else ""
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for summary in self.logic.availableModels():
            label = f"{summary['name']} ({summary['modality']}, {summary['spacing_mm'][0]:g} mm)"
            self.ui.modelComboBox.addItem(label, summary["name"])
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, summary.get("description", ""),
                                              qt.Qt.ToolTipRole)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        self._selectModelInCombo(chosen)  # the chosen model, or the default when it is gone

    def _selectModelInCombo(self, name: str) -> None:
        index = self.ui.modelComboBox.findData(name) if name else -1
        if index < 0:
            from SACBRegistrationLib.registry import DEFAULT_MODEL
            index = max(0, self.ui.modelComboBox.findData(DEFAULT_MODEL))
        self.ui.modelComboBox.setCurrentIndex(index)

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import a model package or an official SACB-Net checkpoint"), "",
            _("Model packages or checkpoints (*.zip *.tar *.pth *.pth.tar model.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not import the model."), waitCursor=True):
            if path.endswith("model.json"):
                summary = self.logic.importModel(str(Path(path).parent))
            elif path.endswith(".zip"):
                summary = self.logic.importModel(path)
            else:
                metadata = _askCheckpointMetadata(Path(path).name)
                if metadata is None:
                    return
                summary = self.logic.importModel(path, **metadata)
            self.refreshModels()
            self._selectModelInCombo(summary["name"])
            slicer.util.infoDisplay(_("Imported model {name}.").format(name=summary["name"]))

    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the sample data."), waitCursor=True):
            nodes = loadSamplePair()
            p = self._parameterNode
            p.fixedVolume, p.movingVolume = nodes["fixed"], nodes["moving"]
            p.fixedSegmentation, p.movingSegmentation = nodes["fixed_segmentation"], nodes["moving_segmentation"]

    # -- running

    def onApplyButton(self) -> None:
        if self._controller.running:
            self._controller.cancel()
            return
        if not _ensureTorch():
            return
        p = self._parameterNode
        outputs = outputRequestFromParameters(p)
        with slicer.util.tryWithErrorDisplay(_("Could not start the registration."), waitCursor=True):
            self.ui.logTextEdit.clear()
            self._controller.start(
                p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation, model=p.model or None,
                device=p.device, clusters=p.clusters or None, quality=p.quality,
                ioSteps=None if p.ioSteps < 0 else p.ioSteps, affine=None if p.affine == "preset" else p.affine,
                similarity=p.similarity, finePass=p.finePass or None, outputs=outputs, fixedMask=p.fixedMask,
                fixedMaskSegment=p.fixedMaskSegment if p.fixedMask else "", keepTemporaryFiles=p.keepTemporaryFiles)

    # -- the controller's view (RegistrationController calls these)

    def setRunning(self, running: bool) -> None:
        self.ui.progressBar.setVisible(running)
        self.ui.progressBar.setValue(0)
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the registration; the scene stays as it was")
        else:
            self.ui.applyButton.text = _("Apply")
            self._checkCanApply()

    def appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def setProgress(self, percent: int, message: str) -> None:
        self.ui.progressBar.setValue(percent)
        self.ui.statusLabel.text = message

    def showError(self, message: str, details: str) -> None:
        self.ui.statusLabel.text = _("Failed")
        self.ui.logCollapsibleButton.collapsed = False  # the whole log, below the button
        extra = {"detailedText": _("Last lines of the log:") + "\n" + details} if details else {}
        slicer.util.errorDisplay(_("Registration failed: {error}").format(error=message), **extra)

    def showOutputs(self, assignable, outputs) -> None:
        p = self._parameterNode
        for name, node in assignable.items():
            setattr(p, name, node)
        showResults(self.logic.prepareResultDisplay(p.fixedVolume, p.movingVolume, outputs))
        summary = outputs.metrics.get("summary") or {}
        regularity = outputs.metrics.get("regularity") or {}
        parts = []
        if summary.get("dice_after") is not None:
            parts.append(_("mean Dice {before:.3f} -> {after:.3f}").format(before=summary["dice_before"],
                                                                             after=summary["dice_after"]))
        if regularity:
            parts.append(_("folding {fold:.3f}%").format(fold=regularity["negative_jacobian_percent"]))
        self.ui.statusLabel.text = _("Done") + (": " + ", ".join(parts) if parts else "")
        for warning in outputs.warnings:
            self.appendLog(_("Warning: ") + warning)


def _ensureTorch() -> bool:
    """True when a new enough PyTorch is installed, after installing or upgrading it through the PyTorch
    extension if the user agrees (its CUDA-aware installer). The decisions are ``slicer_setup``'s."""
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    before = slicer_setup.installed_torch_version()
    advice = slicer_setup.torch_advice(before, PyTorchUtils is not None)
    if advice.action == "ready":
        return True
    if advice.action == "needs-extension":
        slicer.util.errorDisplay(advice.message)
        return False
    if advice.action == "upgrade" and not slicer.util.confirmOkCancelDisplay(advice.message):
        return False
    importedBefore = "torch" in sys.modules
    torch, error = None, None
    try:
        with slicer.util.WaitCursor():
            # install: the extension asks for confirmation itself; upgrade: the user has just agreed
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=advice.action == "install", torchVersionRequirement=slicer_setup.TORCH_REQUIREMENT)
    except Exception as raised:  # pip / light-the-torch failures, files in use, broken downloads
        error = raised
    outcome = slicer_setup.install_outcome(before, slicer_setup.installed_torch_version(), error=error,
                                           declined=torch is None and error is None, imported_before=importedBefore)
    extra = {"detailedText": outcome.details} if outcome.details else {}
    if outcome.level == "error":
        slicer.util.errorDisplay(outcome.message, **extra)
    elif outcome.level == "warning":
        slicer.util.warningDisplay(outcome.message, **extra)
    else:
        slicer.util.infoDisplay(outcome.message)
    if outcome.offer_restart and slicer.util.confirmYesNoDisplay(slicer_setup.RESTART_QUESTION):
        slicer.util.restart()
    return outcome.ok


def showResults(display) -> None:
    """The view side of a finished registration (the Logic's ``prepareResultDisplay`` did the MRML
    side): fixed under warped in the slice views, the metrics table in a table view, the 3D view
    centred on the warped segmentation."""
    if display.background is not None:
        slicer.util.setSliceViewerLayers(background=display.background, foreground=display.foreground,
                                         foregroundOpacity=display.foregroundOpacity, fit=True)
    layoutManager = slicer.app.layoutManager()
    if display.table is not None and layoutManager is not None:
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(display.table.GetID())
        applicationLogic.PropagateTableSelection()
    if display.segmentation3D is not None and layoutManager is not None and layoutManager.threeDViewCount:
        layoutManager.threeDWidget(0).threeDView().resetFocalPoint()


def _askCheckpointMetadata(fileName: str) -> Optional[dict]:
    """What an authors' checkpoint cannot tell: name, modality, spacing and intensity normalisation."""
    dialog = qt.QDialog(slicer.util.mainWindow())
    dialog.setWindowTitle(_("Import {file}").format(file=fileName))
    form = qt.QFormLayout(dialog)
    name = qt.QLineEdit(Path(fileName).name.split(".")[0].replace(" ", "-"))
    modality = qt.QComboBox()
    modality.addItems(["MR T1w", "MR T2w", "CT", "other"])
    spacing = qt.QDoubleSpinBox()
    spacing.setRange(0.1, 10.0)
    spacing.setValue(1.0)
    spacing.setSuffix(" mm")
    normalisation = qt.QComboBox()
    normalisation.addItems([_("MR: percentiles 0.5-99.5"), _("CT: window -1000 to 1000 HU")])
    anatomy = qt.QLineEdit("brain")
    clusters = qt.QSpinBox()
    clusters.setRange(1, 16)
    clusters.setValue(7)
    for label, widget in ((_("Name"), name), (_("Modality"), modality), (_("Training spacing"), spacing),
                          (_("Intensities"), normalisation), (_("Anatomy"), anatomy), (_("Clusters"), clusters)):
        form.addRow(label, widget)
    buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Ok | qt.QDialogButtonBox.Cancel)
    buttons.connect("accepted()", dialog.accept)
    buttons.connect("rejected()", dialog.reject)
    form.addRow(buttons)
    if not dialog.exec_():
        return None
    intensity = ({"method": "percentile", "low": 0.5, "high": 99.5} if normalisation.currentIndex == 0
                 else {"method": "window", "min": -1000.0, "max": 1000.0})
    return {"name": name.text, "modality": modality.currentText, "spacing_mm": [spacing.value] * 3,
            "intensity": intensity, "anatomy": anatomy.text, "clusters": clusters.value}


def loadSamplePair() -> dict:
    """Load the bundled sample pair into the scene (checksums verified first)."""
    import hashlib

    meta = json.loads((SAMPLE_DIR / "SampleData.json").read_text())
    nodes = {}
    for key, entry in meta["files"].items():
        path = SAMPLE_DIR / entry["file"]
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{path.name} fails its checksum; re-install the extension")
        name = f"SACBBrainPair {key.replace('_', ' ')}"
        if key.endswith("segmentation"):
            nodes[key] = slicer.util.loadSegmentation(str(path), {"name": name})
        else:
            nodes[key] = slicer.util.loadVolume(str(path), {"name": name})
    return nodes


#
# SACBRegistrationLogic
#


class SACBRegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """Headless logic. Scripting from the Python console::

        logic = slicer.util.getModuleLogic("SACBRegistration")
        outputs = logic.registerVolumes(fixedNode, movingNode, fixedSegNode, movingSegNode,
                                        device="auto", affine="rigid", ioSteps=50)
        outputs.warpedVolume, outputs.transform, outputs.metrics["summary"]["dice_after"]

    ``startRegistration(...)`` returns a running job instead (``poll()``, ``cancel()``, ``wait()``).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        RegistrationLogic.__init__(self)

    def getParameterNode(self):
        return SACBRegistrationParameterNode(super().getParameterNode())


#
# SACBRegistrationTest
#


class SACBRegistrationTest(ScriptedLoadableModuleTest):
    """Runs the real registration on the CPU inside Slicer (the bundled pair, the default model)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bad_inputs_create_nothing()
        if not SACBRegistrationLogic.torchAvailable():
            # e.g. Slicer's extension build machines: the registration tests need the PyTorch extension
            self.delayDisplay("PyTorch is not installed: the registration and cancel tests are skipped "
                              "(install the PyTorch extension to run them)")
            return
        self.setUp()
        self.test_register_sample_pair()
        self.setUp()
        self.test_cancel_leaves_scene_unchanged()

    def test_bad_inputs_create_nothing(self):
        logic = SACBRegistrationLogic()
        nodes = loadSamplePair()
        count = slicer.mrmlScene.GetNumberOfNodes()
        for args, message in (((None, nodes["moving"]), "Select a fixed volume"),
                              ((nodes["fixed"], nodes["fixed"]), "same node")):
            with self.assertRaises((ValueError, RegistrationError)) as raised:  # RegistrationError: no torch
                logic.startRegistration(*args)
            if logic.torchAvailable():
                self.assertIn(message, str(raised.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

    def test_register_sample_pair(self):
        self.delayDisplay("Registering the sample pair on the CPU")
        nodes = loadSamplePair()
        logic = SACBRegistrationLogic()
        outputs = logic.registerVolumes(nodes["fixed"], nodes["moving"], nodes["fixed_segmentation"],
                                        nodes["moving_segmentation"], device="cpu", timeout=900)
        self.assertIsNotNone(outputs.warpedVolume)
        self.assertTrue(outputs.transform.IsA("vtkMRMLTransformNode"))
        self.assertEqual(outputs.warpedVolume.GetImageData().GetDimensions(),
                         nodes["fixed"].GetImageData().GetDimensions())
        summary = outputs.metrics["summary"]
        self.assertGreater(summary["dice_after"], summary["dice_before"])
        self.assertGreater(outputs.metricsTable.GetTable().GetNumberOfRows(), 16)
        showResults(logic.prepareResultDisplay(nodes["fixed"], nodes["moving"], outputs))
        self.delayDisplay("Test passed: mean Dice {:.3f} -> {:.3f}".format(summary["dice_before"], summary["dice_after"]))

    def test_cancel_leaves_scene_unchanged(self):
        import time
        nodes = loadSamplePair()
        count = slicer.mrmlScene.GetNumberOfNodes()
        job = SACBRegistrationLogic().startRegistration(nodes["fixed"], nodes["moving"], device="cpu")
        while job.poll() and job.progress < 5:
            time.sleep(0.1)
        job.cancel()
        self.assertEqual(job.state, "cancelled")
        self.assertFalse(job.workDir.exists())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        with self.assertRaises(RegistrationError):
            job.wait()
