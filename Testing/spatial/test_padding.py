import torch

from SACBRegistrationLib.spatial.padding import pad_to_multiple, padding_for


def test_padding_for():
    assert padding_for((16, 17, 5)) == ((0, 0), (7, 8), (5, 6))


def test_pad_and_crop_back():
    x = torch.randn(2, 1, 17, 30, 16)
    padded, crop = pad_to_multiple(x)
    assert padded.shape == (2, 1, 32, 32, 16)
    assert torch.equal(padded[crop], x)
