"""Model packages and the registry: checksums, corrupted / truncated / tampered packages,
imports of the authors' checkpoints and of archives."""

import json
import shutil
import zipfile

import pytest
import torch

from SACBRegistrationLib import registry
from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet
from SACBRegistrationLib.packages import PackageError, file_sha256, read_package, write_package


def make(path, **changes):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SACBNet(SACBNetConfig(clusters=3))
    values = dict(name="unit", version="1.2.3", spacing_mm=[1.5, 1.5, 1.5], modality="MR T1w", anatomy="brain",
                  intensity={"method": "percentile", "low": 1.0, "high": 99.0}, training={"steps": 1},
                  validation={"dice": 0.5})
    values.update(changes)
    return write_package(path, model, **values), model


def test_round_trip(tmp_path):
    package, model = make(tmp_path / "pkg")
    again = read_package(tmp_path / "pkg")
    assert again.name == "unit" and again.version == "1.2.3" and again.network == model.config
    assert again.intensity.to_dict() == {"method": "percentile", "low": 1.0, "high": 99.0}
    loaded = again.load_model()
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.config.clusters == (3, 3, 3, 3)
    assert again.load_model(clusters=5).config.clusters == (5, 5, 5, 5)


def test_a_report_records_the_model_and_its_headline_figures_not_its_benchmark_records(tmp_path):
    records = {"held_out": {"pairs": 8, "per_pair": [0.8] * 8}, "dice": 0.5, "note": "2 mm validation pairs"}
    make(tmp_path / "pkg", validation=records)
    reference = read_package(tmp_path / "pkg").reference()
    assert reference["validation"] == {"dice": 0.5, "note": "2 mm validation pairs"}  # scalars only
    assert reference["sha256"] == {"weights.pt": file_sha256(tmp_path / "pkg" / "weights.pt")}
    assert (reference["name"], reference["version"], reference["spacing_mm"]) == ("unit", "1.2.3", [1.5, 1.5, 1.5])
    assert read_package(tmp_path / "pkg").summary()["validation"] == records  # the listing keeps everything
    json.dumps(reference)  # JSON-friendly


def test_writing_never_leaves_a_partial_package(tmp_path):
    with pytest.raises(PackageError, match="expected intensity method"):
        make(tmp_path / "bad", intensity={"method": "zscore"})
    assert not (tmp_path / "bad").exists()
    assert [p for p in tmp_path.iterdir()] == []


def test_corrupted_weights_fail_the_checksum(tmp_path):
    make(tmp_path / "pkg")
    weights = tmp_path / "pkg" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="fails its SHA-256 check"):
        read_package(tmp_path / "pkg")


def test_truncated_weights_fail_the_checksum(tmp_path):
    make(tmp_path / "pkg")
    weights = tmp_path / "pkg" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PackageError, match="fails its SHA-256 check"):
        read_package(tmp_path / "pkg")


class Payload:
    def __reduce__(self):
        return (print, ("package code ran",))


def test_pickled_code_is_refused_even_with_a_matching_checksum(tmp_path, capsys):
    make(tmp_path / "pkg")
    weights = tmp_path / "pkg" / "weights.pt"
    torch.save({"format": "sacbnet-checkpoint", "version": 1, "config": SACBNetConfig().to_dict(),
                "state_dict": {}, "metadata": Payload()}, weights)
    meta = json.loads((tmp_path / "pkg" / "model.json").read_text())
    meta["files"]["weights.pt"] = file_sha256(weights)  # an attacker updates the checksum too
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="refused for safety") as raised:
        read_package(tmp_path / "pkg").load_model()
    assert "package code ran" not in capsys.readouterr().out
    # never pass on torch's advice to disable the safe loader, nor its terminal colour codes
    assert "weights_only=False" not in str(raised.value) and "\x1b[" not in str(raised.value)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("network"), "missing 'network'"),
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(spacing_mm=[1, 1]), "three positive numbers in spacing_mm"),
    (lambda m: m.update(spacing_mm=[True, True, True]), "three positive numbers in spacing_mm"),
    (lambda m: m.update(training=[1, 2]), "model.json: field 'training' should be a JSON object"),
    (lambda m: m.update(training="abc"), "model.json: field 'training' should be a JSON object"),
    (lambda m: m.update(modality=3), "field 'modality' should be text"),
    (lambda m: m.update(shape=[80, "96", 80]), "field 'shape' should be three positive whole numbers"),
    (lambda m: m["network"].update(cluster_feature="s"), "expected cluster_feature"),
    (lambda m: m.update(files={"../evil.pt": "0" * 64}), "bad file entry"),
    (lambda m: m.update(files={}), "lists no weights"),
])
def test_malformed_model_json(tmp_path, edit, message):
    make(tmp_path / "pkg")
    meta_path = tmp_path / "pkg" / "model.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=message):
        read_package(tmp_path / "pkg")


def test_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="not a model package"):
        read_package(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        read_package(tmp_path)


def test_registry_lists_imports_and_removes(tmp_path, reference_file):
    users = tmp_path / "models"
    make(tmp_path / "source")
    imported = registry.import_package(tmp_path / "source", "mine", user_dir=users)
    assert imported.path == users / "mine"
    names = {e.name: e for e in registry.list_models(verify=True, user_dir=users)}
    assert "mine" in names and names["mine"].error == ""
    assert registry.get_model("mine", user_dir=users).name == "mine"  # renamed inside the package too
    assert registry.verify_model("mine", user_dir=users).name == "mine"  # checksums still hold
    assert registry.get_model(tmp_path / "source").name == "unit"
    with pytest.raises(PackageError, match="already imported"):
        registry.import_package(tmp_path / "source", "mine", user_dir=users)
    with pytest.raises(PackageError, match="no model named 'nothing'"):
        registry.get_model("nothing", user_dir=users)
    with pytest.raises(PackageError, match="expected a package name"):
        registry.import_package(tmp_path / "source", "../escape", user_dir=users)
    registry.remove_model("mine", user_dir=users)
    assert not (users / "mine").exists()


def test_import_official_checkpoint(tmp_path, reference_file):
    reference = torch.load(reference_file, weights_only=True)
    checkpoint = tmp_path / "dsc0.7309_e299.pth.tar"
    torch.save({"state_dict": reference["state_dict"]}, checkpoint)
    package = registry.import_official_checkpoint(
        checkpoint, "lpba-official", spacing_mm=[1, 1, 1], intensity={"method": "percentile", "low": 0.5, "high": 99.5},
        modality="MR T1w", anatomy="brain", clusters=1, user_dir=tmp_path / "models")
    assert package.network.clusters == (1, 1, 1, 1) and "official SACB-Net checkpoint" in package.source
    model = package.load_model()
    with torch.no_grad():
        out = model(reference["moving"], reference["fixed"])
    assert (out.displacement - reference["flow"]).abs().mean() < 1e-3
    broken = tmp_path / "broken.pth.tar"
    broken.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(PackageError, match="cannot read checkpoint"):
        registry.import_official_checkpoint(broken, "x", spacing_mm=[1, 1, 1], intensity={"method": "none"},
                                            modality="MR", anatomy="brain", user_dir=tmp_path / "models")
    assert not (tmp_path / "models" / "x").exists()


def test_zip_archives(tmp_path):
    make(tmp_path / "pkg")
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in (tmp_path / "pkg").iterdir():
            z.write(p, f"pkg/{p.name}")
    package = registry.import_package(archive, user_dir=tmp_path / "models")
    assert package.name == "unit"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../outside.txt", "x")
    with pytest.raises(PackageError, match="unsafe member"):
        registry.import_package(evil, user_dir=tmp_path / "models")
    (tmp_path / "not.zip").write_bytes(b"PK garbage")
    with pytest.raises(PackageError, match="not a valid zip"):
        registry.import_package(tmp_path / "not.zip", user_dir=tmp_path / "models")


def test_embedded_packages_match_the_manifest():
    """Every shipped package is listed with its files' SHA-256, and verifies."""
    shipped = sorted(p.name for p in registry.EMBEDDED_DIR.iterdir() if (p / "model.json").is_file()) \
        if registry.EMBEDDED_DIR.is_dir() else []
    assert shipped == sorted(registry.EMBEDDED_MANIFEST)
    for name in shipped:
        registry.verify_model(name)


def test_edited_embedded_package_is_detected(tmp_path, monkeypatch):
    make(tmp_path / "embedded" / "shipped", name="shipped")
    monkeypatch.setattr(registry, "EMBEDDED_DIR", tmp_path / "embedded")
    folder = tmp_path / "embedded" / "shipped"
    manifest = {p.name: file_sha256(p) for p in folder.iterdir()}
    monkeypatch.setattr(registry, "EMBEDDED_MANIFEST", {"shipped": manifest})
    assert registry.get_model("shipped").embedded
    meta = json.loads((folder / "model.json").read_text())
    meta["spacing_mm"] = [3.0, 3.0, 3.0]  # consistent with itself, but not what was shipped
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="differs from the shipped file"):
        registry.get_model("shipped")
    shutil.rmtree(folder)


def test_one_broken_package_does_not_break_the_others(tmp_path):
    users = tmp_path / "models"
    make(tmp_path / "good")
    registry.import_package(tmp_path / "good", "good", user_dir=users)
    make(tmp_path / "bad")
    registry.import_package(tmp_path / "bad", "bad", user_dir=users)
    meta_path = users / "bad" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["training"] = [1, 2]
    meta_path.write_text(json.dumps(meta))
    entries = {e.name: e for e in registry.list_models(user_dir=users)}
    assert entries["good"].error == ""
    assert "field 'training'" in entries["bad"].error
    assert registry.get_model("good", user_dir=users).name == "good"
