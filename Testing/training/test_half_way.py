"""The fine pass's training pairs (training/half_way.py): half-way warps with known answers, crops
that are windows of the full pair, identical images left alone, and a run that trains on them."""

import csv
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from SACBRegistrationLib.training.config import load_config
from SACBRegistrationLib.training.half_way import HalfWayPairs

FINE = (32, 24, 32)


class Translator(nn.Module):
    """A stand-in first pass: a constant displacement of ``shift`` network-grid voxels along the
    depth axis, signed by which image is brighter, so that its symmetric velocity is ``shift``
    (swapping the images negates the answer)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(float(shift)))

    def forward(self, moving, fixed):
        sign = torch.sign(moving.mean(dim=(1, 2, 3, 4)) - fixed.mean(dim=(1, 2, 3, 4)))  # (B,)
        disp = torch.zeros(moving.shape[0], 3, *moving.shape[2:])
        disp[:, 0] = (self.shift * sign)[:, None, None, None]
        return SimpleNamespace(displacement=disp, clusters=None)


class OnePair(Dataset):
    def __init__(self, count=3):
        generator = torch.Generator().manual_seed(5)
        self.items = []
        for _ in range(count):
            fixed = torch.rand(1, *FINE, generator=generator)
            moving = (fixed + 0.5).clamp(max=1.5)  # brighter: the stand-in's symmetric velocity is +shift
            labels = (fixed * 4).long()
            self.items.append({"moving": moving, "fixed": fixed, "moving_labels": labels, "fixed_labels": labels.clone()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_half_way_images_are_the_pair_moved_by_half_the_first_answer():
    """A first answer of +1 voxel at 2x coarser resolution is 2 fine voxels: the moving image is
    pulled back by +1 fine voxel (warped(d) = moving(d + 1)), the fixed one by -1, labels alike."""
    pairs = OnePair()
    dataset = HalfWayPairs(pairs, Translator(1.0), 0.5, FINE, seed=0)  # the crop is the whole grid
    item, source = dataset[0], pairs[0]
    assert item["moving"].shape == item["fixed"].shape == (1, *FINE)
    inner = (slice(None), slice(1, -1))
    torch.testing.assert_close(item["moving"][inner], source["moving"][:, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(item["fixed"][inner], source["fixed"][:, :-2], atol=1e-5, rtol=0)
    assert torch.equal(item["moving_labels"][inner], source["moving_labels"][:, 2:])
    assert torch.equal(item["fixed_labels"][inner], source["fixed_labels"][:, :-2])
    assert not any(p.requires_grad for p in dataset.first_pass.parameters())


def test_crops_are_deterministic_windows_of_the_full_half_way_pair():
    pairs = OnePair()
    full = HalfWayPairs(pairs, Translator(0.7), 0.5, FINE, seed=3)
    cropped = HalfWayPairs(pairs, Translator(0.7), 0.5, (16, 16, 16), seed=3)
    windows = set()
    for index in range(len(pairs)):
        item = cropped[index]
        window = cropped.window(index, FINE)
        windows.add(tuple(s.start for s in window[1:]))
        for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
            assert item[key].shape == (1, 16, 16, 16)
            assert torch.equal(item[key], full[index][key][window])
            assert torch.equal(item[key], cropped[index][key])  # the same item every time
    assert len(windows) > 1  # the crop moves between items
    with pytest.raises(ValueError, match="at most the fine grid"):
        HalfWayPairs(pairs, Translator(0.7), 0.5, (48, 16, 16), seed=3)[0]


def test_identical_images_stay_put_and_the_scale_is_checked():
    """With a real (random) SACB-Net the symmetric first answer for an image and itself is zero, so
    the half-way pair is the pair itself."""
    from SACBRegistrationLib.networks.config import SACBNetConfig
    from SACBRegistrationLib.networks.sacbnet import SACBNet

    torch.manual_seed(0)
    image = torch.rand(1, 32, 32, 32)  # a network grid of 16^3, the network's size multiple
    same = [{"moving": image, "fixed": image.clone()}]
    dataset = HalfWayPairs(same, SACBNet(SACBNetConfig(clusters=2)), 0.5, (32, 32, 32), seed=0)
    item = dataset[0]
    torch.testing.assert_close(item["moving"], image, atol=1e-5, rtol=0)
    torch.testing.assert_close(item["fixed"], image, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scale 1/n"):
        HalfWayPairs(same, Translator(1.0), 0.4, FINE, seed=0)


def test_a_run_trains_on_fine_pass_pairs_from_a_package(tmp_path):
    """A ``fine_pass`` source builds its 2x finer template pairs from ``model.init``'s first pass
    and trains on them (label Dice included); without ``model.init``, or with a crop larger than
    the fine grid, it stops with an error naming the fix."""
    from SACBRegistrationLib.errors import TrainingError
    from SACBRegistrationLib.training.trainer import train

    base = ["data.shape=[32,32,32]", "data.spacing_mm=6.0", "run.workers=0", "run.log_every=1",
            "run.checkpoint_every=2", "data.validation_pairs=0"]
    first = load_config(None, base + ["optim.steps=1", 'data.sources=[{"kind":"template","max_std":2.0}]',
                                      f'run.out="{tmp_path / "first"}"'])
    package = train(first).package
    fine = ['data.sources=[{"kind":"template","max_std":2.0,"control_spacing":8,"fine_pass":true,"crop":[32,48,32]}]',
            "optim.steps=2", "loss.dice=1.0"]
    cfg = load_config(None, base + fine + [f'model.init="{package}"', f'run.out="{tmp_path / "fine"}"'])
    result = train(cfg, write_package=False)
    rows = list(csv.DictReader(open(tmp_path / "fine" / "train_log.csv")))
    assert result.steps == 2 and len(rows) == 2
    assert all(0.0 < float(r["dice_loss"]) < 1.0 and float(r["ncc"]) < 0 for r in rows)
    with pytest.raises(TrainingError, match="needs model.init"):
        train(load_config(None, base + fine + [f'run.out="{tmp_path / "no_init"}"']), write_package=False)
    too_big = [f.replace("[32,48,32]", "[80,48,32]") for f in fine]
    with pytest.raises(TrainingError, match="larger than the fine grid"):
        train(load_config(None, base + too_big + [f'model.init="{package}"', f'run.out="{tmp_path / "big"}"']),
              write_package=False)
