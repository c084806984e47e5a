"""Fault injection at the Slicer Logic level (slicer-core): the worker process killed while it reads,
runs the network or saves, and a write failure (disk full) inside the worker.

After every fault: the scene's node IDs are those before the run (segmentation inputs included,
whose export to label maps must not leave nodes behind), the input volumes' voxels unchanged, the
Logic's temporary folder gone (its temporary root is empty), the worker and its process group gone,
and the error a sentence for the user (no traceback).

The worker is started with ``python -c`` and the patch of
:func:`Testing.pipeline.test_fault_injection.fault_code`, which holds it inside a stage and prints
``FAULT-POINT <stage>`` on its output (which the Logic records in ``job.log``); the product code has
no fault hook.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from SACBRegistrationLib.slicer_logic import RegistrationError, RegistrationLogic  # noqa: E402

from ..pipeline.test_fault_injection import MARKER, WATCHDOG_SECONDS, fault_code  # noqa: E402


class FaultyLogic(RegistrationLogic):
    """The Logic with its worker started under a fault patch."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault

    def _workerCommand(self, request):
        return [sys.executable, "-c", fault_code("worker"), self.fault, str(request)]


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """The Logic's temporary root, private to the test (other runs on the machine share /tmp)."""
    root = tmp_path / "temp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def started(scene, nodes, package_path, temp_root, monkeypatch):
    """A function starting a faulty registration (with segmentations); returns (job, snapshot)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)  # Slicer's scene always has it

    def start(fault: str):
        snapshot = {"ids": node_ids(scene), "fixed": slicer.util.arrayFromVolume(nodes["fixed"]).copy(),
                    "moving": slicer.util.arrayFromVolume(nodes["moving"]).copy()}
        job = FaultyLogic(fault).startRegistration(nodes["fixed"], nodes["moving"], nodes["fixed_seg"],
                                                   nodes["moving_seg"], model=package_path, device="cpu",
                                                   quality="fast")
        return job, snapshot

    return start


def assert_left_as_before(scene, nodes, job, snapshot, temp_root):
    assert node_ids(scene) == snapshot["ids"]
    assert np.array_equal(slicer.util.arrayFromVolume(nodes["fixed"]), snapshot["fixed"])
    assert np.array_equal(slicer.util.arrayFromVolume(nodes["moving"]), snapshot["moving"])
    assert not job.workDir.exists() and list(temp_root.iterdir()) == []
    assert job.process.poll() is not None
    with pytest.raises(ProcessLookupError):  # nothing left in the worker's process group
        os.killpg(job.process.pid, 0)


def wait_for_line(job, line: str, timeout: float = WATCHDOG_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while job.poll() and line not in job.log:
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"the worker never printed {line!r}: {job.log[-5:]}")
        time.sleep(0.02)
    assert line in job.log, f"the worker ended before {line!r}: {job.state} {job.error} {job.log[-5:]}"


@pytest.mark.parametrize("fault, sig", [("read", signal.SIGKILL), ("network", signal.SIGKILL),
                                        ("save", signal.SIGKILL), ("save", signal.SIGTERM)])
def test_killing_the_worker_at_a_stage_leaves_the_scene_and_no_files(fault, sig, started, scene, nodes, temp_root):
    job, snapshot = started(fault)
    wait_for_line(job, f"{MARKER} {fault}")
    os.kill(job.process.pid, sig)  # as the OOM killer or a user's kill would
    with pytest.raises(RegistrationError) as raised:
        job.wait(timeout=60)
    message = str(raised.value)
    assert message.startswith(f"The registration process stopped unexpectedly (exit code {-sig})"), message
    assert "Traceback" not in message and job.state == "failed"
    assert_left_as_before(scene, nodes, job, snapshot, temp_root)


def test_a_full_disk_in_the_worker_is_reported_and_leaves_the_scene(started, scene, nodes, temp_root):
    job, snapshot = started("enospc")
    with pytest.raises(RegistrationError, match="the disk is full: no space left while writing the outputs") as raised:
        job.wait(timeout=WATCHDOG_SECONDS)
    assert "Traceback" not in str(raised.value) and "bad worker request" not in str(raised.value)
    assert any(line.startswith("ERROR resources ") for line in job.log), job.log[-3:]
    assert_left_as_before(scene, nodes, job, snapshot, temp_root)
