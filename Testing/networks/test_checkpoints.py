import pytest
import torch

from SACBRegistrationLib.networks.checkpoints import (
    CheckpointError,
    infer_official_config,
    load_checkpoint,
    load_official_checkpoint,
    save_checkpoint,
)
from SACBRegistrationLib.networks.config import SACBNetConfig
from SACBRegistrationLib.networks.sacbnet import SACBNet


@pytest.fixture(scope="module")
def reference(reference_file):
    return torch.load(reference_file, weights_only=True)


@pytest.fixture
def official_file(reference, tmp_path):
    """The reference weights written exactly as the authors' training script saves them."""
    path = tmp_path / "dsc0.7309_e299.pth.tar"
    torch.save({"state_dict": reference["state_dict"]}, path)
    return path


def test_reproduces_the_official_output(reference, official_file):
    model = load_official_checkpoint(official_file, clusters=1)
    with torch.no_grad():
        out = model(reference["moving"], reference["fixed"])
    diff = (out.displacement - reference["flow"]).abs().flatten()
    assert diff.mean().item() < 1e-3
    assert torch.quantile(diff, 0.99).item() < 1e-2
    assert (out.warped - reference["warped"]).abs().mean().item() < 1e-3


def test_official_weights_rebuild_the_papers_architecture(reference):
    cfg = infer_official_config(reference["state_dict"], clusters=7)
    assert cfg == SACBNetConfig()
    assert sum(t.numel() for k, t in reference["state_dict"].items() if not k.endswith(".grid")) == 1_105_591


def test_dataparallel_prefix_is_accepted(reference, official_file, tmp_path):
    path = tmp_path / "dp.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference["state_dict"].items()}}, path)
    prefixed, plain = load_official_checkpoint(path, clusters=1), load_official_checkpoint(official_file, clusters=1)
    assert isinstance(prefixed, SACBNet)
    # the very same weights as without the prefix (not a freshly initialised network)
    assert prefixed.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(prefixed.state_dict()[key], value), key


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SACBNet(SACBNetConfig(clusters=(2, 3, 4, 5), cluster_feature="both")).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, metadata={"trained_steps": 3})
    again, metadata = load_checkpoint(path)
    assert again.config == model.config
    assert metadata == {"trained_steps": 3}
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x[0], x[1]).displacement, again(x[0], x[1]).displacement)


def test_load_checkpoint_reads_official_files_too(official_file):
    model, metadata = load_checkpoint(official_file, clusters=1)
    assert model.config.clusters == (1, 1, 1, 1) and "official" in metadata["source"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(official_file, tmp_path):
    data = official_file.read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(truncated)


class Payload:
    """An arbitrary Python object: unpickling it would run code, so it must be refused."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


def test_weights_that_do_not_fit(reference, tmp_path):
    state = dict(reference["state_dict"])
    state["sacb_proj2.w"] = torch.zeros(3, 3, 27)
    path = tmp_path / "wrong.pth.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_official_checkpoint(path, clusters=1)
    del state["sacb_proj2.w"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_official_checkpoint(path, clusters=1)


def test_not_a_sacbnet(tmp_path):
    path = tmp_path / "other.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match="not a SACB-Net state dict"):
        load_official_checkpoint(path)
