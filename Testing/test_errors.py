"""Failure classification (``errors.py``): exit codes and messages of every error family, and no
torch (nor the command-line module) imported to classify an error."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from SACBRegistrationLib.errors import Failure, classify
from SACBRegistrationLib.packages import PackageError
from SACBRegistrationLib.pipeline.io import InputError
from SACBRegistrationLib.pipeline.registration import Cancelled
from SACBRegistrationLib.pipeline.resources import ResourceError
from SACBRegistrationLib.training.config import ConfigError
from SACBRegistrationLib.training.trainer import TrainingError

# the exit codes documented in the ``sacb`` docstring and README
INPUT, PACKAGE, RESOURCES, CANCELLED, UNEXPECTED = 3, 4, 5, 6, 1


@pytest.mark.parametrize("error, code, kind, message", [
    (InputError("fixed image not found: a.nii"), INPUT, "input", "fixed image not found: a.nii"),
    (ConfigError("expected optim.steps >= 1"), INPUT, "input", "expected optim.steps >= 1"),
    (PackageError("no model named x"), PACKAGE, "model", "no model named x"),
    (ResourceError("needs about 9 GB"), RESOURCES, "resources", "needs about 9 GB"),
    (MemoryError(), RESOURCES, "resources", "out of memory"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), RESOURCES, "resources",
     "the GPU ran out of memory; use the CPU (device 'cpu') or crop the images"),
    (Cancelled("registration cancelled"), CANCELLED, "cancelled", "cancelled"),
    (KeyboardInterrupt("signal 15"), CANCELLED, "cancelled", "cancelled"),
    (TrainingError("no training pairs"), INPUT, "input", "no training pairs"),
    (ValueError("expected device in ('auto', 'cpu', 'cuda'), got 'gpu'"), INPUT, "input",
     "expected device in ('auto', 'cpu', 'cuda'), got 'gpu'"),
    (RuntimeError("boom"), UNEXPECTED, "internal", "RuntimeError: boom"),
    (KeyError("x"), UNEXPECTED, "internal", "KeyError: 'x'"),
])
def test_each_error_family_has_its_exit_code_and_message(error, code, kind, message):
    failure = classify(error)
    assert (failure.code, failure.kind, failure.message) == (code, kind, message)


def test_a_classified_failure_passes_through_unchanged():
    failure = Failure(2, "usage", "importing an official checkpoint needs --name")
    assert classify(failure) is failure


def run_isolated(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object, returned here."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_classifying_imports_neither_torch_nor_the_engine():
    got = run_isolated("""
        import json, sys
        from SACBRegistrationLib.errors import classify
        failures = [classify(e) for e in (ValueError("bad"), MemoryError(), KeyboardInterrupt(), RuntimeError("x"))]
        print(json.dumps({"codes": [f.code for f in failures],
                          "loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.",
                                    "SACBRegistrationLib.pipeline", "SACBRegistrationLib.training",
                                    "SACBRegistrationLib.cli", "numpy", "SimpleITK")))}))
    """)
    assert got == {"codes": [INPUT, RESOURCES, CANCELLED, UNEXPECTED], "loaded": []}


def test_the_worker_reports_a_bad_request_without_torch_or_the_cli(tmp_path):
    # the import loop is gone: the worker's error path needs neither cli.py nor torch
    missing = tmp_path / "no-such-request.json"
    got = run_isolated(f"""
        import contextlib, io, json, sys
        from SACBRegistrationLib.worker import run_request
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = run_request({str(missing)!r})
        print(json.dumps({{"code": code, "line": out.getvalue().strip(),
                          "loaded": sorted(m for m in ("torch", "SACBRegistrationLib.cli") if m in sys.modules)}}))
    """)
    assert got["code"] == INPUT and got["loaded"] == []
    assert got["line"].startswith(f"ERROR input bad worker request {missing}: ")


def test_every_exception_class_is_defined_once_in_errors_and_reexported():
    from SACBRegistrationLib import errors, slicer_errors
    from SACBRegistrationLib.data import template
    from SACBRegistrationLib.networks import checkpoints
    from SACBRegistrationLib.training import config, trainer

    homes = {"InputError": InputError, "PackageError": PackageError, "Cancelled": Cancelled,
             "ResourceError": ResourceError, "ConfigError": config.ConfigError, "TrainingError": trainer.TrainingError,
             "CheckpointError": checkpoints.CheckpointError, "TemplateError": template.TemplateError,
             "RegistrationError": slicer_errors.RegistrationError}
    for name, cls in homes.items():
        assert cls is getattr(errors, name), name
        assert cls.__module__ == "SACBRegistrationLib.errors", name
