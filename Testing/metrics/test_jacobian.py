import numpy as np
import pytest

from SACBRegistrationLib.metrics import jacobian_determinant, negative_jacobian_percent, sdlogj


def linear_field(matrix, shape=(8, 9, 10)):
    """u(p) = A p in voxels, components in array-axis order: J = I + A everywhere."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", np.asarray(matrix, float), grid)


def test_linear_field_has_constant_known_determinant():
    a = np.array([[0.2, 0.1, 0.0], [0.0, -0.3, 0.05], [0.1, 0.0, 0.4]])
    det = jacobian_determinant(linear_field(a))
    assert np.allclose(det, np.linalg.det(np.eye(3) + a))


def test_uniform_scaling_has_zero_sdlogj_and_no_folding():
    disp = linear_field(0.25 * np.eye(3))
    assert np.allclose(jacobian_determinant(disp), 1.25 ** 3)
    assert sdlogj(disp) == pytest.approx(0.0, abs=1e-6)  # float32 determinants
    assert negative_jacobian_percent(disp) == 0.0


def test_quadratic_field():
    # u_w = 0.01 * w^2: d phi_w / dw = 1 + 0.02 w (central differences are exact for quadratics inside)
    shape = (4, 5, 12)
    disp = np.zeros((3,) + shape)
    w = np.arange(shape[2], dtype=float)
    disp[2] = 0.01 * w ** 2
    det = jacobian_determinant(disp)
    assert np.allclose(det[:, :, 1:-1], (1 + 0.02 * w)[1:-1])


def test_hand_made_fold_is_detected():
    # a slab of voxels mapped backwards past its neighbours: phi_w decreases there
    disp = np.zeros((3, 6, 6, 12))
    disp[2, :, :, 5:8] = -3.0 * np.arange(1, 4)  # phi_w(5..7) = 5-3, 6-6, 7-9: decreasing
    det = jacobian_determinant(disp)
    assert (det[:, :, 6] < 0).all()
    folded = negative_jacobian_percent(disp)
    assert 0 < folded < 100
    assert folded == pytest.approx(100 * np.mean(det < 0))


def test_physical_units_give_the_same_determinant():
    spacing = (2.0, 0.5, 1.5)
    a = np.array([[0.1, 0.0, 0.2], [0.0, 0.1, 0.0], [0.05, 0.0, -0.2]])
    disp_vox = linear_field(a)
    disp_mm = disp_vox * np.array(spacing).reshape(3, 1, 1, 1)
    assert np.allclose(jacobian_determinant(disp_mm, spacing), jacobian_determinant(disp_vox))


def test_mask_and_bad_input():
    disp = linear_field(0.1 * np.eye(3))
    mask = np.zeros(disp.shape[1:], bool)
    mask[2:4] = True
    assert negative_jacobian_percent(disp, mask) == 0.0
    with pytest.raises(ValueError, match=r"\(3, D, H, W\)"):
        jacobian_determinant(np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="finite"):
        jacobian_determinant(np.full((3, 4, 4, 4), np.nan))
