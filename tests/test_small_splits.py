"""Thresholds taken on small held-out splits: honest about their uncertainty, so that few normal
images are flagged even when the split is 20 images with an anomaly among them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from pipeline.thresholds import (
    CONFIDENCE,
    Calibration,
    ScoreCalibration,
    calibrate,
    tolerance_factor,
)

MU, SIGMA = math.log(0.004), 0.35  # normal images' log-scores


def _split(n: int, contamination: float, rng: np.random.Generator) -> np.ndarray:
    """n held-out scores: normal ones, and a binomial share of anomalies 5 sigmas above them."""
    k = rng.binomial(n, contamination)
    return np.exp(np.concatenate([rng.normal(MU, SIGMA, n - k), rng.normal(MU + 5 * SIGMA, SIGMA, k)]))


def _fpr(threshold: float) -> float:
    """The exact share of normal images above `threshold`."""
    return float(1.0 - norm.cdf((math.log(threshold) - MU) / SIGMA))


@pytest.mark.parametrize("n", [20, 60])
def test_the_quantile_threshold_holds_its_false_positive_rate_on_small_contaminated_splits(n):
    rng = np.random.default_rng(n)
    bound, point = [], []
    for _ in range(100):
        calibration = ScoreCalibration.fit(_split(n, 0.05, rng))
        bound.append(_fpr(calibration.quantile(0.99)))
        point.append(_fpr(calibration.estimate(0.99)))
    bound, point = np.asarray(bound), np.asarray(point)
    assert bound.mean() <= 0.01
    # An upper bound at CONFIDENCE lands below the true 0.99-quantile on at most about
    # 1 - CONFIDENCE of the splits; above 2% FPR far less often than that.
    assert (bound > 0.01).mean() <= (1 - CONFIDENCE) + 0.06
    assert (bound > 0.02).mean() <= 0.06
    # The point estimate alone is what flagged too many: well over 2% on many splits.
    assert (point > 0.02).mean() > 2 * (bound > 0.02).mean()


def test_the_bound_shrinks_to_the_plain_quantile_as_the_split_grows():
    z = norm.ppf(0.99)
    factors = [tolerance_factor(n, 0.99) for n in (20, 60, 250, 5000, 100_000)]
    assert factors == sorted(factors, reverse=True)
    assert factors[0] > z + 0.5 and factors[-1] == pytest.approx(z, abs=0.02)


def test_a_small_split_with_anomalies_is_read_by_clipping_not_by_a_mixture():
    normal = norm.ppf((np.arange(57) + 0.5) / 57)  # an even spread of standard Gaussian values
    logs = np.concatenate([normal, [9.0, 10.0, 12.0]])  # three far anomalies
    calibration = ScoreCalibration.fit(np.exp(logs))
    assert calibration.location == pytest.approx(normal.mean(), abs=1e-9)
    assert calibration.scale == pytest.approx(normal.std(ddof=1), abs=1e-9)
    assert calibration.contamination == pytest.approx(3 / 60)


def test_equal_held_out_scores_give_finite_z_and_a_threshold_just_above_them():
    """MAD = 0 (every held-out image scores the same, e.g. a constant corpus): the spread does not
    collapse to nothing, so a slightly higher score is not read as a huge z."""
    values = {"mse": np.full(40, 0.01), "stem_knn": np.full(40, 2.0)}
    calibration = calibrate(values, default_score="fused", fused_from=("mse", "stem_knn"))
    z = calibration.fuse({"mse": np.array([0.0101]), "stem_knn": np.array([2.0])})
    assert np.isfinite(z).all() and float(z[0]) < 20  # a 1% rise in mse is ~10 floors, not 1e9 spreads
    assert 0.01 < calibration.threshold("mse", 0.99) < 0.01 * 1.004  # a hair above the constant


def test_the_fused_calibration_reads_each_held_out_image_as_unseen():
    """In-sample, each part's median and spread are fitted on the very images being fused, which
    makes a small split look tighter than unseen images are; leaving each one out does not."""
    rng = np.random.default_rng(5)
    fprs_out, fprs_in = [], []
    for _ in range(60):
        held = {"mse": rng.lognormal(-5, 0.3, 20), "stem_knn": rng.lognormal(1, 0.2, 20)}
        unseen = {"mse": rng.lognormal(-5, 0.3, 4000), "stem_knn": rng.lognormal(1, 0.2, 4000)}
        calibration = calibrate(held, default_score="fused", fused_from=("mse", "stem_knn"))
        fused = calibration.fuse(unseen)
        fprs_out.append(float((fused > calibration.threshold("fused", 0.99)).mean()))
        in_sample = ScoreCalibration.fit(calibration.fuse(held), log=False)
        fprs_in.append(float((fused > in_sample.quantile(0.99)).mean()))
    assert np.mean(fprs_out) <= 0.012
    assert np.mean(fprs_out) < np.mean(fprs_in)
    assert Calibration.from_dict(calibration.to_dict()).threshold("fused", 0.99) == calibration.threshold("fused", 0.99)
