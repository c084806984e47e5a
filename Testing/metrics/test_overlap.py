import math

import numpy as np
import pytest

from SACBRegistrationLib.metrics import dice, dice_per_label


def test_known_dice():
    a = np.zeros((4, 4, 4), int)
    b = np.zeros((4, 4, 4), int)
    a[:2] = 1  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert math.isnan(dice(np.zeros(3), np.zeros(3)))


def test_per_label():
    a = np.array([[[0, 1, 1, 2]]])
    b = np.array([[[0, 1, 2, 2]]])
    assert dice_per_label(a, b) == pytest.approx({1: 2 / 3, 2: 2 / 3})
    assert math.isnan(dice_per_label(a, b, labels=[5])[5])


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="integer label map"):
        dice_per_label(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int))
