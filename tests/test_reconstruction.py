"""Reconstruction-error scores agree with independent NumPy / scikit-image references."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from pipeline.reconstruction import mse_per_image, psnr, ssim_error_per_image, ssim_per_image


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.random((3, 3, 32, 40), dtype=np.float32)
    x_hat = np.clip(x + rng.normal(0, 0.1, x.shape).astype(np.float32), 0, 1)
    return x, x_hat


def test_mse_matches_numpy(pair):
    x, x_hat = pair
    expected = ((x.astype(np.float64) - x_hat) ** 2).reshape(len(x), -1).mean(axis=1)
    got = mse_per_image(torch.from_numpy(x), torch.from_numpy(x_hat)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.shape == (3,)


def test_ssim_matches_scikit_image(pair):
    x, x_hat = pair
    got = ssim_per_image(torch.from_numpy(x), torch.from_numpy(x_hat)).numpy()
    expected = [
        structural_similarity(a, b, channel_axis=0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for a, b in zip(x, x_hat)
    ]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_ssim_error_is_zero_for_identical_and_grows_with_noise(pair):
    x, x_hat = pair
    x, x_hat = torch.from_numpy(x), torch.from_numpy(x_hat)
    np.testing.assert_allclose(ssim_error_per_image(x, x).numpy(), 0.0, atol=1e-6)
    noisier = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim_error_per_image(x, noisier) > ssim_error_per_image(x, x_hat)).all()


def test_psnr():
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(0.0) == math.inf
    np.testing.assert_allclose(psnr(np.array([1.0, 1e-4])), [0.0, 40.0])
