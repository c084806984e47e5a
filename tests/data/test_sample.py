"""The bundled sample pair is what make_sample_pair writes (checksums), and it is a real pair."""

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SACBRegistrationLib.data.sample import make_sample_pair
from SACBRegistrationLib.packages import file_sha256

SAMPLE = Path(__file__).resolve().parents[2] / "SACBRegistration" / "Resources" / "SampleData"


def test_bundled_files_match_their_checksums():
    meta = json.loads((SAMPLE / "SampleData.json").read_text())
    for entry in meta["files"].values():
        assert file_sha256(SAMPLE / entry["file"]) == entry["sha256"]


def test_regenerating_gives_identical_files(tmp_path):
    written = make_sample_pair(tmp_path)
    meta = json.loads((SAMPLE / "SampleData.json").read_text())
    for key, path in written.items():
        assert file_sha256(path) == meta["files"][key]["sha256"], key


def test_moving_image_has_its_own_oblique_anisotropic_grid():
    fixed = sitk.ReadImage(str(SAMPLE / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(SAMPLE / "moving.nii.gz"))
    assert not np.allclose(fixed.GetDirection(), moving.GetDirection())
    assert len(set(np.round(moving.GetSpacing(), 3))) == 2
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "moving_segmentation.nii.gz")))
    assert sorted(np.unique(labels)) == list(range(17))
