"""Batch registration: the pairs CSV is checked before any work, the model is loaded once, finished
pairs are skipped on a re-run, a failed pair does not stop the others, and torchrun ranks (two CPU
processes on gloo) each register their own share exactly once."""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SACBRegistrationLib import cli
from SACBRegistrationLib.packages import ModelPackage
from SACBRegistrationLib.pipeline.batch import BatchRow, read_pairs, shard
from SACBRegistrationLib.pipeline.io import InputError
from SACBRegistrationLib.vocabulary import BATCH_SUMMARY_COLUMNS, EXIT_CODES

from .conftest import make_image, smooth_volume

FAST = ["--quality", "fast", "--affine", "off", "--no-clusters", "--no-overview", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four small moving images (shifted copies of one volume) and a fixed image, with label maps."""
    folder = tmp_path_factory.mktemp("batch_images")
    volume = smooth_volume((24, 28, 26), 3)
    labels = (volume > np.percentile(volume, 50)).astype(np.int16)
    sitk.WriteImage(make_image(volume, (2.0, 2.0, 2.0)), str(folder / "fixed.nii.gz"))
    sitk.WriteImage(make_image(labels, (2.0, 2.0, 2.0)), str(folder / "fixed_seg.nii.gz"))
    for i in range(4):
        shifted = np.roll(volume, i + 1, axis=2)
        sitk.WriteImage(make_image(shifted, (2.0, 2.0, 2.0)), str(folder / f"moving{i}.nii.gz"))
        sitk.WriteImage(make_image(np.roll(labels, i + 1, axis=2), (2.0, 2.0, 2.0)), str(folder / f"moving{i}_seg.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(b"not an image at all")
    return folder


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_summary(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_read_pairs_resolves_paths_and_ids(images):
    pairs = write_csv(images / "pairs.csv", ["fixed", "moving", "moving_seg", "fixed_seg", "quality", "io_steps"],
                      [["fixed.nii.gz", "moving0.nii.gz", "moving0_seg.nii.gz", "fixed_seg.nii.gz", "", ""],
                       ["fixed.nii.gz", str(images / "moving1.nii.gz"), "", "", "accurate", "3"]])
    rows = read_pairs(pairs)
    assert [r.id for r in rows] == ["0000_moving0", "0001_moving1"]
    assert rows[0].fixed == str(images / "fixed.nii.gz") and rows[0].moving_seg == str(images / "moving0_seg.nii.gz")
    assert rows[1].fixed_seg is None and rows[1].options == {"quality": "accurate", "io_steps": 3}
    assert rows[0].options == {}


@pytest.mark.parametrize("header, row, message", [
    (["fixed", "moving", "colour"], ["fixed.nii.gz", "moving0.nii.gz", "red"], "unknown: colour"),
    (["fixed"], ["fixed.nii.gz"], "expected a header with 'fixed' and 'moving'"),
    (["fixed", "moving"], ["fixed.nii.gz", "missing.nii.gz"], "row 2: moving not found"),
    (["fixed", "moving"], ["fixed.nii.gz", ""], "row 2: 'fixed' and 'moving' are required"),
    (["fixed", "moving", "quality"], ["fixed.nii.gz", "moving0.nii.gz", "best"], "row 2: expected quality"),
    (["fixed", "moving", "io_steps"], ["fixed.nii.gz", "moving0.nii.gz", "many"], "row 2: expected an integer for io_steps"),
    (["fixed", "moving", "id"], ["fixed.nii.gz", "moving0.nii.gz", "../escape"], "cannot name a folder"),
])
def test_read_pairs_refuses_bad_rows_naming_row_and_column(images, tmp_path, header, row, message):
    pairs = write_csv(images / f"bad_{abs(hash(message))}.csv", header, [row])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_pairs(pairs)


def test_read_pairs_refuses_repeated_ids_and_empty_files(images):
    pairs = write_csv(images / "repeat.csv", ["fixed", "moving", "id"],
                      [["fixed.nii.gz", "moving0.nii.gz", "a"], ["fixed.nii.gz", "moving1.nii.gz", "a"]])
    with pytest.raises(InputError, match="id 'a' repeats row 2"):
        read_pairs(pairs)
    with pytest.raises(InputError, match="no pairs"):
        read_pairs(write_csv(images / "empty.csv", ["fixed", "moving"], []))


def test_shard_gives_every_row_to_exactly_one_rank():
    rows = [BatchRow(i, f"p{i}", "f", "m") for i in range(7)]
    parts = [shard(rows, rank, 3) for rank in range(3)]
    assert sorted(r.index for part in parts for r in part) == list(range(7))
    assert [r.index for r in parts[1]] == [1, 4]
    with pytest.raises(ValueError, match="rank"):
        shard(rows, 3, 3)


def test_batch_loads_the_model_once_goes_on_after_a_failure_and_resumes(images, tmp_path, tiny_package, monkeypatch):
    pairs = write_csv(images / "run.csv", ["fixed", "moving", "fixed_seg", "moving_seg", "id"],
                      [["fixed.nii.gz", "moving0.nii.gz", "fixed_seg.nii.gz", "moving0_seg.nii.gz", "first"],
                       ["fixed.nii.gz", "broken.nii.gz", "", "", "broken"],
                       ["fixed.nii.gz", "moving1.nii.gz", "", "", "third"]])
    loads = []
    original = ModelPackage._load

    def counting_load(self, *args, **kwargs):
        loads.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModelPackage, "_load", counting_load)
    out = tmp_path / "out"
    code = cli.main(["register-batch", str(pairs), "--out", str(out), "--model", str(tiny_package.path)] + FAST)
    assert code == EXIT_CODES["input"]  # the broken pair's failure, after the others were done
    assert loads == ["tiny"]  # one model load for the whole batch
    summary = read_summary(out / "summary.csv")
    assert list(summary[0]) == list(BATCH_SUMMARY_COLUMNS)
    assert [(r["id"], r["status"]) for r in summary] == [("first", "ok"), ("broken", "failed"), ("third", "ok")]
    assert "broken.nii.gz" in summary[1]["message"] and summary[1]["output"] == ""
    assert float(summary[0]["dice_after"]) > float(summary[0]["dice_before"]) - 0.2  # metrics recorded with labels
    assert summary[2]["dice_after"] == ""  # no segmentations given for that pair
    assert (out / "first" / "report.json").is_file() and (out / "third" / "warped.nii.gz").is_file()
    assert not (out / "broken").exists()  # nothing half-written for the failed pair
    first_report = (out / "first" / "report.json").read_bytes()
    # a re-run skips the finished pairs (resume) and retries the failed one
    loads.clear()
    code = cli.main(["register-batch", str(pairs), "--out", str(out), "--model", str(tiny_package.path)] + FAST)
    summary = read_summary(out / "summary.csv")
    assert [r["status"] for r in summary] == ["done earlier", "failed", "done earlier"]
    assert (out / "first" / "report.json").read_bytes() == first_report and code == EXIT_CODES["input"]
    assert summary[0]["dice_after"] != ""  # the summary of a resumed pair comes from its report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_share_the_pairs_once(images, tmp_path, tiny_package):
    pairs = write_csv(images / "ranks.csv", ["fixed", "moving"],
                      [["fixed.nii.gz", f"moving{i}.nii.gz"] for i in range(4)])
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "SACBRegistrationLib.cli", "register-batch", str(pairs),
               "--out", str(out), "--model", str(tiny_package.path), "--threads", "1"] + FAST
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(out / "summary.csv")
    assert [int(r["index"]) for r in summary] == [0, 1, 2, 3] and all(r["status"] == "ok" for r in summary)
    assert [int(r["rank"]) for r in summary] == [0, 1, 0, 1]  # rank r took rows r, r + 2
    assert sorted(p.name for p in out.iterdir()) == sorted(r["id"] for r in summary) + ["summary.csv"]  # no rank parts left
    for r in summary:
        assert (out / r["id"] / "report.json").is_file()
