import pytest

from SACBRegistrationLib.training.config import ConfigError, apply_overrides, load_config


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nsteps = 10\n[[data.sources]]\nkind = "synth"\nlabels = 5\n')
    cfg = load_config(path, ["optim.lr=0.001", "data.shape=[32,32,48]", "run.out=runs/x", "data.sources.0.weight=2"])
    assert cfg.optim.steps == 10 and cfg.optim.lr == 0.001 and cfg.data.shape == [32, 32, 48]
    assert cfg.run.out == "runs/x" and cfg.data.sources[0].kind == "synth" and cfg.data.sources[0].weight == 2


@pytest.mark.parametrize("overrides, message", [
    (["optim.stepz=3"], "unknown key"),
    (["trainer.steps=3"], "unknown section"),
    (["data.shape=[30,32,32]"], "multiples of 16"),
    (['data.sources=[{"kind":"files"}]'], "expected data source kind"),
    (['data.sources=[{"kind":"folder"}]'], "needs path"),
    (['optim.schedule="cosine"'], "expected optim.schedule"),
    (["loss.ncc_window=4"], "odd loss.ncc_window"),
    (["optim.steps"], "section.key=value"),
    (['data.sources=[{"kind":"template","control_spacing":1}]'], "control_spacing"),
    (['data.sources=[{"kind":"synth","fine_pass":true,"crop":[16,16,16]}]'], "fine_pass pairs are made from the template"),
    (['data.sources=[{"kind":"template","fine_pass":true}]'], "needs crop = three positive multiples of 16"),
    (['data.sources=[{"kind":"template","fine_pass":true,"crop":[16,20,16]}]'], "multiples of 16"),
])
def test_invalid_configs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nsteps = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)


def test_overrides_do_not_modify_the_input():
    data = {"optim": {"steps": 1}}
    apply_overrides(data, ["optim.steps=2"])
    assert data == {"optim": {"steps": 1}}


def test_recipes_parse():
    from pathlib import Path
    configs = Path(__file__).resolve().parents[2] / "configs"
    recipes = sorted(configs.glob("*.toml"))
    assert len(recipes) >= 4
    for recipe in recipes:
        cfg = load_config(recipe)
        assert cfg.optim.lr > 0 and cfg.model.clusters == 7


def test_control_spacing_reaches_the_template_pairs():
    """``control_spacing`` of a template source sets the scale of its random deformations: the
    dataset built from the config carries it, and a finer spacing gives a field that varies faster
    (a larger mean gradient for the same velocity std)."""
    import torch

    from SACBRegistrationLib.data.deformations import random_diffeomorphism
    from SACBRegistrationLib.training.trainer import build_source

    cfg = load_config(None, ["data.shape=[32,32,32]", "data.spacing_mm=6.0",
                             'data.sources=[{"kind":"template","control_spacing":4}]'])
    assert cfg.data.sources[0].control_spacing == 4
    dataset = build_source(cfg.data.sources[0], cfg, 2, seed=0)
    assert dataset.dataset.control_spacing == 4

    def roughness(spacing):
        disp = random_diffeomorphism((32, 32, 32), torch.Generator().manual_seed(0), 2.0, spacing)
        return disp.diff(dim=2).abs().mean().item()
    assert roughness(4) > 1.5 * roughness(8)
