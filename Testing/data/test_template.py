"""The MNI template from nilearn's wheel (package registry only), with checksums."""

import zipfile

import numpy as np
import pytest

from SACBRegistrationLib.data import template as tpl


def test_a_wheel_with_the_wrong_checksum_is_refused(tmp_path):
    fake = tmp_path / tpl.NILEARN_WHEEL
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(tpl._MEMBER.format("t1"), b"not the template")
    with pytest.raises(tpl.TemplateError, match="does not match the expected SHA-256"):
        tpl.fetch_template(tmp_path / "cache", wheel=fake)
    assert not any((tmp_path / "cache").rglob("*.nii.gz"))


def test_fetch_from_the_registry_and_verify(tmp_path):
    """Downloads nilearn's wheel from the package index (no other network use)."""
    paths = tpl.fetch_template(tmp_path / "cache")
    assert tpl.template_available(tmp_path / "cache")
    assert sorted(paths) == ["gm", "t1", "wm"] and (tmp_path / "cache" / "icbm152_2009a" / "NOTICE.txt").is_file()
    paths["t1"].write_bytes(b"damaged")
    assert not tpl.template_available(tmp_path / "cache")


def test_template_volumes():
    image, labels, mask = tpl.template_volumes(spacing=4.0, shape=(48, 48, 48))
    assert image.shape == labels.shape == mask.shape == (48, 48, 48)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert sorted(np.unique(labels)) == list(range(0, tpl.TEMPLATE_LABELS + 1))
    assert mask[24, 24, 24] and not mask[0, 0, 0]


def test_fine_parcels_give_33_labels_with_the_ventricles_deep_inside():
    image, labels, mask = tpl.template_volumes(spacing=4.0, shape=(48, 48, 48), label_set="parcels33")
    assert sorted(np.unique(labels)) == list(range(0, tpl.FINE_TEMPLATE_LABELS + 1))
    ventricles = labels == tpl.FINE_TEMPLATE_LABELS
    # deep inside the brain, in both hemispheres (array axes: inferior-superior, posterior-anterior, right-left)
    spacing = 4.0
    offset_mm = (np.argwhere(ventricles).mean(0) - np.argwhere(mask).mean(0)) * spacing
    assert np.linalg.norm(offset_mm) < 25.0
    centre = np.argwhere(mask).mean(0)[2]
    assert (np.argwhere(ventricles)[:, 2] < centre).any() and (np.argwhere(ventricles)[:, 2] > centre).any()
    # darker than white matter on T1 (CSF), which the label is defined without looking at
    white = (labels > 16) & (labels < tpl.FINE_TEMPLATE_LABELS)
    assert image[ventricles].mean() < image[white].mean() - 0.1
    # the bands split the brain into near-equal parts
    counts = np.bincount(labels.ravel(), minlength=tpl.FINE_TEMPLATE_LABELS + 1)[1:tpl.FINE_TEMPLATE_LABELS]
    assert counts.min() > 0


def test_an_unknown_label_set_is_refused():
    with pytest.raises(ValueError, match="expected label_set in"):
        tpl.template_volumes(spacing=4.0, shape=(48, 48, 48), label_set="aseg")
