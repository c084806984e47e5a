"""The sacb command: outputs, --json, exit codes and messages, models, evaluate, demo, worker."""

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch

from SACBRegistrationLib import cli
from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.packages import write_package
from SACBRegistrationLib.worker import run_request

from .pipeline.conftest import labels_of, make_image, smooth_volume


@pytest.fixture
def files(tmp_path):
    fixed_array, moving_array = smooth_volume((30, 32, 28), 0), smooth_volume((30, 32, 28), 1)
    paths = {}
    for name, image in (("fixed.nii.gz", make_image(fixed_array, (2, 2, 2))),
                        ("moving.nrrd", make_image(moving_array, (2, 2, 2))),
                        ("fixed_seg.nii.gz", make_image(labels_of(fixed_array), (2, 2, 2))),
                        ("moving_seg.nii.gz", make_image(labels_of(moving_array), (2, 2, 2)))):
        sitk.WriteImage(image, str(tmp_path / name))
        paths[name.split(".")[0]] = tmp_path / name
    return paths


@pytest.fixture
def package(tmp_path, monkeypatch):
    monkeypatch.setenv("SACB_MODELS_DIR", str(tmp_path / "user-models"))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SACBNet(SACBNetConfig(clusters=2))
    return write_package(tmp_path / "tiny", model, name="tiny", version="0", spacing_mm=[4, 4, 4],
                         intensity={"method": "percentile", "low": 0.5, "high": 99.5}, modality="MR T1w",
                         anatomy="test").path


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_register_writes_outputs_and_json(files, package, tmp_path, capsys):
    code, out, _ = run(capsys, "register", files["fixed"], files["moving"], "--fixed-seg", files["fixed_seg"],
                       "--moving-seg", files["moving_seg"], "--model", package, "--out", tmp_path / "out", "--json",
                       "--quiet", "--io-steps", "2", "--io-smoothness", "2.5", "--fine-pass")
    assert code == cli.EXIT_OK
    report = json.loads(out)
    assert report["options"]["fine_pass"] is True and "fine_pass" in report["timings_s"]
    assert report["ok"] and report["model"]["name"] == "tiny"
    assert report["options"]["io_smoothness"] == 2.5  # the option reached the registration, not the preset's 1.0
    assert set(report["metrics"]["summary"]) >= {"dice_before", "dice_after", "hd95_after_mm"}
    for path in report["outputs"].values():
        assert (tmp_path / "out" / path.split("/")[-1]).is_file()
    code, out, _ = run(capsys, "evaluate", "--fixed", files["fixed"], "--moving", files["moving"], "--transform",
                       tmp_path / "out" / "transform.h5", "--fixed-seg", files["fixed_seg"], "--moving-seg",
                       files["moving_seg"], "--out", tmp_path / "eval.csv")
    assert code == 0 and "mean Dice" in out and (tmp_path / "eval.csv").is_file()


@pytest.mark.parametrize("make_args, code, message", [
    (lambda f, p, t: ["register", t / "missing.nii.gz", f["moving"], "--model", p], cli.EXIT_INPUT, "fixed image not found"),
    (lambda f, p, t: ["register", f["fixed"], f["moving"], "--model", "no-such-model"], cli.EXIT_PACKAGE, "no model named"),
    (lambda f, p, t: ["register", f["fixed"], f["moving"], "--model", p, "--fixed-seg", f["moving"]], cli.EXIT_INPUT,
     "non-integer values"),
    (lambda f, p, t: ["register", f["fixed"], f["moving"], "--model", p, "--out", f["fixed"]], cli.EXIT_INPUT,
     "is a file; choose a folder name"),
    (lambda f, p, t: ["evaluate", "--fixed", f["fixed"], "--moving", f["moving"], "--transform", f["fixed_seg"]],
     cli.EXIT_INPUT, "not a 3D displacement field"),
    (lambda f, p, t: ["evaluate", "--fixed", f["fixed"], "--moving", f["moving"], "--transform", f["fixed_seg"],
                      "--out", t / "missing" / "m.csv"], cli.EXIT_INPUT, "does not exist; create"),
])
def test_errors_have_exit_codes_and_messages(files, package, tmp_path, capsys, monkeypatch, make_args, code, message):
    monkeypatch.chdir(tmp_path)  # where the default output folder would go
    got, out, err = run(capsys, *make_args(files, package, tmp_path), "--quiet")
    assert got == code
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "sacb-output").exists()  # a failed run creates no output folder
    got, out, _ = run(capsys, *make_args(files, package, tmp_path), "--quiet", "--json")
    assert got == code and json.loads(out)["ok"] is False and message in json.loads(out)["error"]["message"]


def test_nothing_is_written_on_failure(files, package, tmp_path, capsys):
    out = tmp_path / "out"
    run(capsys, "register", files["fixed"], files["moving"], "--model", package, "--fixed-seg", files["moving"],
        "--out", out, "--quiet")
    assert not out.exists()
    out.mkdir()  # an existing folder stays, empty
    run(capsys, "register", files["fixed"], files["moving"], "--model", package, "--fixed-seg", files["moving"],
        "--out", out, "--quiet")
    assert out.is_dir() and list(out.iterdir()) == []


def test_models_commands(package, tmp_path, capsys, reference_file):
    code, out, _ = run(capsys, "models", "import", package, "--name", "mine")
    assert code == 0 and "imported mine" in out
    code, out, _ = run(capsys, "models", "list", "--json")
    listed = json.loads(out)["models"]
    assert code == 0 and "mine" in [m["path"].split("/")[-1] for m in listed]
    assert "mine" in [m["name"] for m in listed] and "tiny" not in [m["name"] for m in listed]  # renamed inside
    code, out, _ = run(capsys, "models", "verify", "mine")
    assert code == 0 and "checksums and weights OK" in out
    reference = torch.load(reference_file, weights_only=True)
    checkpoint = tmp_path / "official.pth.tar"
    torch.save({"state_dict": reference["state_dict"]}, checkpoint)
    code, _, err = run(capsys, "models", "import", checkpoint, "--name", "official")
    assert code == cli.EXIT_USAGE and "--modality, --spacing" in err
    code, out, _ = run(capsys, "models", "import", checkpoint, "--name", "official", "--modality", "CT",
                       "--spacing", "2", "--window", "-1000", "1000", "--anatomy", "abdomen")
    assert code == 0
    code, out, _ = run(capsys, "models", "list", "--json")
    official = [m for m in json.loads(out)["models"] if m["name"] == "official"][0]
    assert official["spacing_mm"] == [2.0, 2.0, 2.0] and official["intensity"]["method"] == "window"
    code, out, _ = run(capsys, "models", "remove", "official")
    assert code == 0


def test_demo_registers_the_bundled_pair(package, tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--model", package, "--out", tmp_path / "demo", "--quiet", "--no-clusters")
    assert code == 0 and "mean Dice" in out
    assert (tmp_path / "demo" / "overview.png").is_file() and (tmp_path / "demo" / "transform.h5").is_file()


def test_default_model_is_shipped_and_registers_the_sample_pair(tmp_path, capsys, monkeypatch):
    """`sacb demo` with no --model: the embedded default model verifies and clearly improves overlap."""
    from SACBRegistrationLib import registry

    monkeypatch.setenv("SACB_MODELS_DIR", str(tmp_path / "user-models"))
    info = registry.get_model(registry.DEFAULT_MODEL)
    assert info.embedded
    registry.verify_model(registry.DEFAULT_MODEL)
    code, _, _ = run(capsys, "demo", "--out", tmp_path / "demo", "--quiet", "--no-clusters")
    assert code == cli.EXIT_OK
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    summary, regularity = metrics["summary"], metrics["regularity"]
    assert summary["dice_after"] > summary["dice_before"] + 0.05
    assert summary["hd95_after_mm"] < summary["hd95_before_mm"]
    assert regularity["negative_jacobian_percent"] < 1.0


@pytest.mark.parametrize("options", [{}, {"quality": "fast"}, {"quality": "fast", "fine_pass": True}],
                         ids=["default", "fast", "fast-fine-pass"])
def test_an_image_registered_to_itself_stays_put(options):
    """The first sanity check a user runs: the bundled fixed image as both fixed and moving, default
    model and options (and the network alone, ``fast``, with and without the fine pass), must give
    (close to) the identity, and a warning that both are the same data."""
    import numpy as np

    from SACBRegistrationLib.pipeline import register

    sample = cli._sample_dir()
    fixed = sitk.ReadImage(str(sample / "fixed.nii.gz"))
    result = register(fixed, fixed, cluster_maps=False, **options)
    field = sitk.GetArrayFromImage(result.displacement)  # (D, H, W, 3) LPS mm
    head = sitk.GetArrayFromImage(fixed) > np.percentile(sitk.GetArrayFromImage(fixed), 60)
    assert np.linalg.norm(field, axis=-1)[head].mean() < SELF_REGISTRATION_MAX_MM
    assert any("same data" in w for w in result.warnings)


SELF_REGISTRATION_MAX_MM = 0.1
"""Largest mean displacement (mm) inside the head when an image is registered to itself."""


def test_console_script_runs(package):
    proc = subprocess.run([sys.executable, "-m", "SACBRegistrationLib.cli", "models", "list", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"]


def test_command_process_ends_fast_with_its_code_and_flushed_output(files, package, tmp_path):
    """``python -m SACBRegistrationLib.cli register`` (the console script's entry point, which skips
    the interpreter's teardown): outputs complete, the summary printed, the exit code kept, also
    for a failure (bad input: 3, its message on stderr)."""
    command = [sys.executable, "-m", "SACBRegistrationLib.cli", "register", str(files["fixed"]), str(files["moving"]),
               "--fixed-seg", str(files["fixed_seg"]), "--moving-seg", str(files["moving_seg"]),
               "--model", str(package), "--io-steps", "0", "--no-clusters"]
    proc = subprocess.run(command + ["--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True)
    assert proc.returncode == cli.EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and all((tmp_path / "out" / p.split("/")[-1]).stat().st_size > 0 for p in report["outputs"].values())
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["metrics"]["summary"]["dice_after"] == pytest.approx(report["metrics"]["summary"]["dice_after"])
    proc = subprocess.run(command[:4] + [str(tmp_path / "missing.nii.gz")] + command[5:] + ["--out", str(tmp_path / "o2")],
                          capture_output=True, text=True)
    assert proc.returncode == cli.EXIT_INPUT and "fixed image not found" in proc.stderr
    assert not (tmp_path / "o2").exists()


def test_worker_request(files, package, tmp_path, capsys):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"fixed": str(files["fixed"]), "moving": str(files["moving"]),
                                   "fixed_segmentation": str(files["fixed_seg"]),
                                   "moving_segmentation": str(files["moving_seg"]), "output": str(tmp_path / "w"),
                                   "options": {"model": str(package)}, "label_names": {"1": "low", "2": "mid"}}))
    assert run_request(request) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PROGRESS ") and lines[-1].startswith("RESULT ")
    report = json.loads(lines[-1][len("RESULT "):])
    assert [row["name"] for row in report["metrics"]["labels"]] == ["low", "mid"]
    request.write_text(json.dumps({"fixed": str(tmp_path / "nope.nii.gz"), "moving": str(files["moving"]),
                                   "output": str(tmp_path / "w2"), "options": {"model": str(package)}}))
    assert run_request(request) == cli.EXIT_INPUT
    assert capsys.readouterr().out.splitlines()[-1].startswith("ERROR input fixed image not found")


@pytest.mark.parametrize("option", [["--io-steps", "-1"], ["--clusters", "0"], ["--quality", "best"],
                                    ["--io-smoothness", "-1"], ["--io-smoothness", "nan"], ["--io-smoothness", "smooth"]])
def test_bad_option_values_are_usage_errors(files, package, tmp_path, capsys, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        cli.main(["register", str(files["fixed"]), str(files["moving"]), "--model", str(package), *option])
    assert raised.value.code == 2  # usage, as documented (not 3, bad input)
    assert not (tmp_path / "sacb-output").exists()
