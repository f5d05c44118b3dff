"""bench/threshold_fits.py's candidates do what its tables say they do (fast: drawn values, no model)."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, skewnorm

from bench.threshold_fits import FUSIONS, default_fit, skew_mixture_fit, skew_normal_fit, verdicts


def test_the_skew_normal_candidate_holds_a_skewed_clean_bulk_that_the_mixture_splits():
    values = skewnorm.rvs(4.0, size=1000, random_state=np.random.default_rng(0))
    true_fpr = {name: float(skewnorm.sf(fit(values), 4.0)) for name, fit in
                (("default", default_fit), ("skew", skew_normal_fit))}
    assert true_fpr["skew"] <= 0.012  # the 0.99-quantile with the tolerance margin above it
    assert true_fpr["default"] > 0.05  # two Gaussians by BIC: the lower one is too narrow


def test_the_skew_normal_candidate_keeps_the_mixture_for_separated_anomalies():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.0, 1.0, 950), rng.normal(8.0, 1.0, 50)])
    threshold = skew_normal_fit(values)
    assert norm.sf(threshold) < 0.02 and threshold < 4.0  # the bulk's tail, below every anomaly's bulk


def test_the_skew_bulk_with_a_gaussian_tail_holds_a_skewed_bulk_under_anomalies():
    rng = np.random.default_rng(0)
    spread, centre = skewnorm.std(4.0), skewnorm.mean(4.0)
    values = np.concatenate([skewnorm.rvs(4.0, size=950, random_state=rng), rng.normal(centre + 6 * spread, spread, 50)])
    assert skewnorm.sf(skew_mixture_fit(values), 4.0) <= 0.02  # the bulk's own tail, found under the anomalies
    assert skewnorm.sf(skew_normal_fit(values), 4.0) > 0.025  # without the tail model: two Gaussians, too narrow


def test_the_fusions_agree_on_one_part_and_max_is_the_default_fuse():
    z = np.array([[0.5, 3.0, -1.0]])
    assert np.allclose(FUSIONS["max"](z), z[0]) and np.allclose(FUSIONS["sum"](z), z[0])
    parts = np.array([[0.0, 2.0], [1.0, -1.0], [0.5, 0.5]])
    assert np.allclose(FUSIONS["max"](parts), [1.0, 2.0])


def test_a_candidate_fails_the_rule_on_one_run_over_two_percent_or_one_kind_down_by_more_than_002():
    def run(default_fpr, other_fpr, default_recall, other_recall):
        return {"candidates": {"max / default": {"fpr": default_fpr, "recall": {"scratch": default_recall}},
                               "other": {"fpr": other_fpr, "recall": {"scratch": other_recall}}}}

    assert verdicts([run(0.01, 0.01, 0.90, 0.89)])["other"].endswith("passes")
    assert verdicts([run(0.01, 0.01, 0.90, 0.89), run(0.01, 0.021, 0.9, 0.9)])["other"].endswith("fails")
    assert verdicts([run(0.01, 0.01, 0.90, 0.87)])["other"].endswith("fails")
