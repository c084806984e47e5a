"""The module's run state machine (Qt-free controller) against real MRML nodes under slicer-core,
with a fake timer and a recording view: the widget's bugs found by reading it against Slicer."""

import stat
import sys

import pytest

pytest.importorskip("slicer")

from SACBRegistrationLib.slicer_controller import ERROR_LOG_LINES, RegistrationController  # noqa: E402
from SACBRegistrationLib.slicer_logic import OutputRequest, RegistrationError, RegistrationLogic  # noqa: E402

from .test_logic import node_state  # noqa: E402


class FakeTimer:
    def __init__(self):
        self.active = False

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class RecordingView:
    """Records calls; ``reenter`` simulates a modal dialog's event loop firing the timer again."""

    def __init__(self):
        self.calls, self.reenter = [], None

    def setRunning(self, running):
        self.calls.append(("running", running))

    def appendLog(self, line):
        self.calls.append(("log", line))

    def setProgress(self, percent, message):
        self.calls.append(("progress", percent))

    def showOutputs(self, assignable, outputs):
        self.calls.append(("outputs", sorted(assignable)))

    def showError(self, message, details):
        self.calls.append(("error", message))
        self.details = details
        if self.reenter is not None:
            for _ in range(3):  # a modal box: the timer keeps firing while it is open
                self.reenter()

    def named(self, kind):
        return [c for c in self.calls if c[0] == kind]


class FailedJob:
    state, progress, message, error, outputs = "running", 10, "working", "", None

    def __init__(self):
        self.log = ["PROGRESS 10 working", "ERROR input the moving image is empty"]

    def poll(self):
        self.state, self.error = "failed", "the moving image is empty"
        return False

    def cancel(self):
        raise AssertionError("a finished job is not cancelled")


class FakeLogic:
    def __init__(self, job):
        self.job = job

    def startRegistration(self, *args, **kwargs):
        return self.job


def test_a_failed_run_reports_once_even_when_the_error_box_lets_the_timer_fire():
    timer, view = FakeTimer(), RecordingView()
    controller = RegistrationController(FakeLogic(FailedJob()), view, timer)
    view.reenter = controller.poll
    controller.start("fixed", "moving")
    assert timer.active and controller.running
    controller.poll()
    assert view.named("error") == [("error", "the moving image is empty")]  # one box, not one per tick
    assert not timer.active and not controller.running
    assert view.calls[-2] == ("running", False)  # the button is Apply again before the box opens


def test_a_job_that_raises_while_polled_ends_as_failed():
    class Broken(FailedJob):
        def poll(self):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    timer, view = FakeTimer(), RecordingView()
    controller = RegistrationController(FakeLogic(Broken()), view, timer)
    controller.start()
    controller.poll()
    assert not controller.running and not timer.active
    assert "could not be followed" in view.named("error")[0][1]


def label_maps(scene, nodes):
    """The fixture's segmentations as label-map volume nodes (fixed, moving)."""
    logic = pytest.importorskip("slicer").vtkSlicerSegmentationsModuleLogic
    maps = []
    for key in ("fixed_seg", "moving_seg"):
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", key + " labels")
        assert logic.ExportAllSegmentsToLabelmapNode(nodes[key], node, 0)
        maps.append(node)
    return maps


def test_a_label_map_result_is_not_assigned_to_the_segmentation_field(scene, nodes, package_path):
    fixed_labels, moving_labels = label_maps(scene, nodes)
    outputs = RegistrationLogic().registerVolumes(nodes["fixed"], nodes["moving"], fixed_labels, moving_labels,
                                                  model=package_path, device="cpu", quality="fast",
                                                  outputs=OutputRequest(clusterMaps=False), timeout=300)
    assert outputs.warpedSegmentation.IsA("vtkMRMLLabelMapVolumeNode")

    class Done(FailedJob):
        def poll(self):
            self.state = "succeeded"
            return False

    done = Done()
    done.outputs = outputs
    timer, view = FakeTimer(), RecordingView()
    controller = RegistrationController(FakeLogic(done), view, timer)
    controller.start()
    controller.poll()
    shown = view.named("outputs")[0][1]
    assert "warpedVolume" in shown and "transform" in shown
    assert "warpedSegmentation" not in shown  # the parameter node's field holds segmentation nodes only
    assert not controller.running and not timer.active


def test_a_label_map_result_fills_a_chosen_segmentation_node(scene, nodes, package_path):
    fixed_labels, labels = label_maps(scene, nodes)
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    outputs = RegistrationLogic().registerVolumes(
        nodes["fixed"], nodes["moving"], fixed_labels, labels, model=package_path, device="cpu", quality="fast",
        outputs=OutputRequest(clusterMaps=False, warpedSegmentationNode=target), timeout=300)
    assert outputs.warpedSegmentation is target
    assert target.GetSegmentation().GetNumberOfSegments() == 2


def test_registering_without_torch_says_how_to_install_it(scene, nodes, monkeypatch):
    monkeypatch.setattr(RegistrationLogic, "torchAvailable", staticmethod(lambda: False))
    before = node_state(scene)
    with pytest.raises(RegistrationError, match="install the 'PyTorch' extension"):
        RegistrationLogic().startRegistration(nodes["fixed"], nodes["moving"])
    assert node_state(scene) == before


def test_undecodable_worker_output_fails_the_job_instead_of_hanging(scene, nodes, tmp_path):
    script = tmp_path / "garbage.py"
    script.write_text("import sys\nsys.stdout.buffer.write(b'PROGRESS 5 \\xff\\xfe caf\\xe9\\n')\nsys.stdout.flush()\n"
                      "sys.exit(3)\n")
    fake = tmp_path / "python-with-garbage"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    job = RegistrationLogic(pythonExecutable=str(fake)).startRegistration(nodes["fixed"], nodes["moving"])
    with pytest.raises(RegistrationError, match=r"exit code 3"):
        job.wait(timeout=60)
    assert any("\ufffd" in line for line in job.log)  # decoded with replacement characters


def test_the_error_box_details_are_the_last_lines_of_the_worker_log():
    class LongFailure(FailedJob):
        def __init__(self):
            self.log = [f"PROGRESS {i} step {i}" for i in range(30)] + ["Traceback (most recent call last):",
                                                                         "ERROR internal boom"]

    timer, view = FakeTimer(), RecordingView()
    controller = RegistrationController(FakeLogic(LongFailure()), view, timer)
    controller.start()
    controller.poll()
    lines = view.details.splitlines()
    assert len(lines) == ERROR_LOG_LINES and lines[-1] == "ERROR internal boom"
    assert lines[0] == f"PROGRESS {32 - ERROR_LOG_LINES} step {32 - ERROR_LOG_LINES}"
    assert [c for c in view.calls if c[0] == "log"][-1] == ("log", "ERROR internal boom")  # the log panel has all
