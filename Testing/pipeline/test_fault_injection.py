"""Fault injection at the command line and API level: ``sacb register`` killed (SIGKILL) or stopped
(SIGTERM) while it reads, runs the network or saves; the output disk full (an ``OSError`` injected
at a write, and a real tiny tmpfs where the machine allows mounting one).

After every fault: no output folder half-written (absent, or the previous output byte for byte),
no staging folder or lock left once the next run is over, the input files byte-identical, the
documented exit code (README "Exit codes": cancelled 6, resources 5, bad input 3) and a one-line
message without a traceback.

Each kill is made at a known stage: the ``sacb`` process is started with ``python -c`` and a
patch (:func:`fault_code`) that holds it inside the stage (checking the images just read, in
``registration.predict``, in the saving thread once the metrics files are in the staging folder) and
prints ``FAULT-POINT <stage>``; the test waits for that line, after the stage's own progress
message, then sends the signal. The product code has no fault hook.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List

import pytest
import SimpleITK as sitk

from SACBRegistrationLib import cli
from SACBRegistrationLib.vocabulary import EXIT_CODES

from .conftest import labels_of, make_image, smooth_volume

MODULE_DIR = Path(cli.__file__).resolve().parents[1]
"""The folder holding ``SACBRegistrationLib`` (on the subprocesses' ``PYTHONPATH``)."""
MARKER = "FAULT-POINT"
STAGE_MESSAGES = {"read": "reading inputs", "network": "running SACB-Net", "save": "done"}
"""The progress message that opens each stage (printed before the process is held in it)."""
WATCHDOG_SECONDS = 120
"""A held process is killed after this long whatever happens, so no test can hang."""


def fault_code(entry: str) -> str:
    """Python source for ``python -c CODE FAULT ARGS...``: patch the engine for ``FAULT``, then run
    the ``entry`` point (``cli``: ``sacb ARGS``; ``worker``: the Slicer worker on a request file).

    Faults: ``read`` / ``network`` / ``save`` hold the process (sleep) inside that stage after
    printing ``FAULT-POINT <stage>`` (stderr for the command, stdout, the protocol stream, for the
    worker); ``enospc`` makes the second image written into the staging folder fail with
    ``OSError(ENOSPC)``, the first one being complete on disk."""
    stream = "sys.stderr" if entry == "cli" else "sys.stdout"
    run = ("from SACBRegistrationLib.cli import main\nsys.exit(main(sys.argv[1:]))" if entry == "cli" else
           "from SACBRegistrationLib.worker import main\nsys.exit(main())")
    return f"""
import errno, sys, time
import SimpleITK
from SACBRegistrationLib.pipeline import metrics_table, registration

FAULT = sys.argv.pop(1)
def hold(stage):
    print("{MARKER} " + stage, file={stream}, flush=True)
    time.sleep({WATCHDOG_SECONDS})

real_check, real_predict, real_write = registration.check_image, registration.predict, SimpleITK.WriteImage
staged = []
def check_image(*args, **kwargs):  # the main thread, once the reading threads have read the files
    if FAULT == "read":
        hold("read")
    return real_check(*args, **kwargs)
def predict(*args, **kwargs):
    if FAULT == "network":
        hold("network")
    return real_predict(*args, **kwargs)
def WriteImage(image, path, *args, **kwargs):
    if ".sacb-staging-" in str(path):
        staged.append(path)
        if FAULT == "enospc" and len(staged) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real_write(image, path, *args, **kwargs)
real_write_json = metrics_table.MetricsTable.write_json
def write_json(self, path):  # the main thread, after metrics.csv and .json, while image files are being written
    written = real_write_json(self, path)
    if FAULT == "save":
        hold("save")
    return written
registration.check_image, registration.predict, SimpleITK.WriteImage = check_image, predict, WriteImage
metrics_table.MetricsTable.write_json = write_json
{run}
"""


def subprocess_environment(models_dir: Path) -> Dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SACB_MODELS_DIR=str(models_dir))
    environment["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return environment


def digest(folder: Path) -> Dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative names)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Fixed, moving and their label maps (2 mm, 30 x 32 x 28), in a folder of their own."""
    folder = tmp_path_factory.mktemp("inputs")
    fixed_array, moving_array = smooth_volume((30, 32, 28), 0), smooth_volume((30, 32, 28), 1)
    for name, image in (("fixed.nii.gz", make_image(fixed_array, (2, 2, 2))),
                        ("moving.nrrd", make_image(moving_array, (2, 2, 2))),
                        ("fixed_seg.nii.gz", make_image(labels_of(fixed_array), (2, 2, 2))),
                        ("moving_seg.nii.gz", make_image(labels_of(moving_array), (2, 2, 2)))):
        sitk.WriteImage(image, str(folder / name))
    return folder


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SACB_MODELS_DIR", str(tmp_path / "user-models"))
    return tmp_path / "user-models"


def register_args(inputs: Path, package, out: Path, *extra: str) -> List[str]:
    return ["register", str(inputs / "fixed.nii.gz"), str(inputs / "moving.nrrd"), "--fixed-seg",
            str(inputs / "fixed_seg.nii.gz"), "--moving-seg", str(inputs / "moving_seg.nii.gz"), "--model",
            str(package.path), "--quality", "fast", "--device", "cpu", "--no-overview", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def previous_output(inputs, tiny_package, tmp_path_factory) -> Path:
    """A complete output of an earlier run (to be replaced with ``--overwrite``)."""
    out = tmp_path_factory.mktemp("previous") / "out"
    assert cli.main(register_args(inputs, tiny_package, out, "--quiet")) == EXIT_CODES["ok"]
    return out


def run_and_signal(args: List[str], fault: str, sig: int, environment: Dict[str, str]):
    """Start ``sacb ARGS`` held at ``fault``, send ``sig`` once it is there; (exit code, stderr lines)."""
    process = subprocess.Popen([sys.executable, "-c", fault_code("cli"), fault, *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
    watchdog = threading.Timer(WATCHDOG_SECONDS, process.kill)
    watchdog.start()
    try:
        lines = []
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith(f"{MARKER} {fault}"):
                break
        assert lines and lines[-1] == f"{MARKER} {fault}", f"the process never reached the {fault} stage: {lines}"
        progress = [i for i, line in enumerate(lines) if STAGE_MESSAGES[fault] in line]
        assert progress, f"no '{STAGE_MESSAGES[fault]}' progress message before the {fault} stage: {lines}"
        process.send_signal(sig)
        lines += process.stderr.read().splitlines()
        return process.wait(timeout=60), lines
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("fault", ["read", "network", "save"])
def test_sigkill_at_a_stage_publishes_nothing_and_the_next_run_cleans_up(fault, inputs, tiny_package, models_dir,
                                                                         tmp_path, capsys):
    before = digest(inputs)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    code, _ = run_and_signal(register_args(inputs, tiny_package, out), fault, signal.SIGKILL,
                             subprocess_environment(models_dir))
    assert code == -signal.SIGKILL
    assert not out.exists()  # no output folder, not even a partial one
    left = sorted(p.name for p in work.iterdir())
    if fault == "save":  # killed mid-save: a staging folder holding part of the set, and the lock
        staging = [p for p in work.iterdir() if p.name.startswith(".out.sacb-staging-")]
        assert len(staging) == 1 and ".out.sacb-lock" in left, left
        files = sorted(p.name for p in staging[0].iterdir())
        assert files and "report.json" not in files, files
    else:  # killed before anything was written
        assert left == []
    assert digest(inputs) == before
    # the next run replaces the killed run's leftovers with one complete output
    assert cli.main(register_args(inputs, tiny_package, out, "--quiet")) == EXIT_CODES["ok"]
    capsys.readouterr()
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert (out / "report.json").is_file() and (out / "transform.h5").is_file()
    assert digest(inputs) == before


@pytest.mark.parametrize("fault", ["read", "network", "save"])
def test_sigterm_at_a_stage_cancels_and_keeps_the_previous_output(fault, inputs, tiny_package, previous_output,
                                                                  models_dir, tmp_path):
    before = digest(inputs)
    out = tmp_path / "out"
    shutil.copytree(previous_output, out)
    previous = digest(out)
    code, lines = run_and_signal(register_args(inputs, tiny_package, out, "--overwrite"), fault, signal.SIGTERM,
                                 subprocess_environment(models_dir))
    assert code == EXIT_CODES["cancelled"] == 6
    assert lines[-1] == "error: cancelled", lines[-3:]
    assert not any("Traceback" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no lock
    assert digest(out) == previous  # the previous output, byte for byte
    assert digest(inputs) == before


def fail_at_the_second_staged_write(monkeypatch, error: OSError) -> List[str]:
    """Make ``SimpleITK.WriteImage`` raise ``error`` at the second file written into a staging folder
    (the first is written for real). Returns the staged paths seen."""
    real_write, staged = sitk.WriteImage, []

    def write(image, path, *args, **kwargs):
        if ".sacb-staging-" in str(path):
            staged.append(str(path))
            if len(staged) == 2:
                raise error
        return real_write(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", write)
    return staged


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_full_disk_at_write_is_reported_and_leaves_nothing(overwrite, inputs, tiny_package, previous_output,
                                                             models_dir, tmp_path, capsys, monkeypatch):
    before = digest(inputs)
    out = tmp_path / "out"
    if overwrite:
        shutil.copytree(previous_output, out)
    previous = digest(out) if overwrite else None
    staged = fail_at_the_second_staged_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    code = cli.main(register_args(inputs, tiny_package, out, *(["--overwrite"] if overwrite else [])))
    err = capsys.readouterr().err
    assert len(staged) >= 2  # the failure came partway through the save (files are written in parallel)
    assert code == EXIT_CODES["resources"] == 5
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: the disk is full") and "free some space" in message, message
    assert "Traceback" not in err and "looks like a bug" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if overwrite else [])
    assert (digest(out) == previous) if overwrite else not out.exists()
    assert digest(inputs) == before


def test_other_write_errors_name_the_folder_and_the_fix(inputs, tiny_package, models_dir, tmp_path, capsys,
                                                        monkeypatch):
    fail_at_the_second_staged_write(monkeypatch, OSError(errno.EIO, "Input/output error"))
    out = tmp_path / "out"
    assert cli.main(register_args(inputs, tiny_package, out, "--json")) == EXIT_CODES["input"]
    report = capsys.readouterr().out
    assert '"kind": "input"' in report and f"cannot write the outputs into {out} (Input/output error)" in report
    assert "no output was published" in report and list(tmp_path.iterdir()) == []


def test_a_full_disk_through_the_api_raises_a_resource_error(inputs, tiny_package, tmp_path, monkeypatch):
    from SACBRegistrationLib.pipeline import register
    from SACBRegistrationLib.pipeline.resources import ResourceError

    result = register(str(inputs / "fixed.nii.gz"), str(inputs / "moving.nrrd"), model=tiny_package, quality="fast",
                      device="cpu")
    fail_at_the_second_staged_write(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ResourceError, match="the disk is full"):
        result.save(tmp_path / "nested" / "out")
    assert list(tmp_path.iterdir()) == []  # not even the parent folder it created


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 kB tmpfs (smaller than the outputs) mounted for the test; skips where mounting is not allowed."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux and root; the injected ENOSPC tests cover this case")
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected ENOSPC tests cover this case")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_reported_and_left_clean(tiny_disk, inputs, tiny_package, models_dir, capsys):
    before = digest(inputs)
    code = cli.main(register_args(inputs, tiny_package, tiny_disk / "out"))
    err = capsys.readouterr().err
    assert code == EXIT_CODES["resources"]
    assert "error: the disk is full" in err and "Traceback" not in err  # (HDF5 prints its own diagnostics)
    assert list(tiny_disk.iterdir()) == []
    assert digest(inputs) == before
