"""Scores and thresholds: reconstruction errors agree with independent NumPy / scikit-image references."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from pipeline.errors import InputError
from pipeline.scoring import (
    ThresholdSpec,
    calibration_from_errors,
    contamination_threshold,
    mse_per_image,
    parse_threshold,
    psnr,
    resolve_threshold,
    ssim_error_per_image,
    ssim_per_image,
)


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


# ---------------------------------------------------------------- calibration and thresholds


@pytest.mark.parametrize("spec", ["quantile:1.5", "value:abc", "median", "quantile:", "contamination:2"])
def test_bad_threshold_specs_are_refused(spec):
    with pytest.raises(InputError, match="threshold|contamination"):
        resolve_threshold(spec, {"grid": [0.0, 1.0]}, scores=np.zeros(3))


def test_a_caller_can_refuse_policies_it_cannot_serve():
    with pytest.raises(InputError, match=r"must be quantile:Q or value:X, got 'contamination:0.1'"):
        parse_threshold("contamination:0.1", ("quantile", "value"))
    assert parse_threshold("value:0.5", ("quantile", "value")) == ThresholdSpec("value:0.5", "value", 0.5)


def test_quantile_thresholds_interpolate_the_calibration_grid():
    errors = np.random.default_rng(0).gamma(2.0, 0.01, 5000)
    calibration = calibration_from_errors(errors)
    for q in (0.5, 0.9, 0.99, 0.995):
        assert resolve_threshold(f"quantile:{q}", calibration) == pytest.approx(np.quantile(errors, q), rel=1e-3)
    with pytest.raises(InputError, match="no calibration"):
        resolve_threshold("quantile:0.99", {})
    assert resolve_threshold("value:0.25") == 0.25


@pytest.mark.parametrize("share", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_contamination_flags_exactly_that_share_of_distinct_scores(share):
    scores = np.random.default_rng(1).random(1000)
    value = resolve_threshold(f"contamination:{share}", scores=scores)
    assert int((scores > value).sum()) == round(share * len(scores))
    assert contamination_threshold(np.zeros(0), 0.1) == math.inf
