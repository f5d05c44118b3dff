"""How often a threshold taken on a small held-out split flags too many normal images.

    python bench/small_splits.py            # seconds: NumPy draws, no model

A held-out split of n images calibrates each score: its normal bulk is fitted (on the log of
the score) and `quantile:0.99` takes a threshold from the fit. Here the normal log-scores are
standard Gaussian draws (the calibration's own model of the bulk, so the true false-positive
rate of any threshold is known exactly: 1 - Phi(threshold)), and a share of each split is
anomalies drawn `separation` sigmas above the bulk. For each n, contamination and separation,
SEEDS splits are drawn and calibrated three ways:
- "mixture, point": the fit this project used before small splits were handled (a Gaussian
  mixture chosen by BIC from 20 values up, the fitted 0.99-quantile itself);
- "clipped, point": the upper-tail-clipped bulk below MIXTURE_MIN values, the fitted quantile;
- "default": what `ScoreCalibration.quantile` does now (clipped bulk below MIXTURE_MIN, the
  mixture above, and the upper CONFIDENCE bound on the quantile).
For each: the mean FPR, the share of splits whose FPR exceeds 2%, the worst FPR, and the mean
recall of the anomalies. Raw results: docs/bench-results/small_splits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEEDS = 300
Q = 0.99


def _mixture_point(values: np.ndarray) -> tuple[float, float]:
    """The earlier fit: mean/std under 20 values, else BIC-chosen mixture's lower component."""
    from sklearn.mixture import GaussianMixture

    location, scale = float(values.mean()), float(values.std())
    if values.size < 20:
        return location, scale
    column = values[:, None]
    one = GaussianMixture(1, random_state=0).fit(column)
    two = GaussianMixture(2, n_init=3, random_state=0).fit(column)
    if two.bic(column) >= one.bic(column):
        return location, scale
    means, sds, weights = two.means_[:, 0], np.sqrt(two.covariances_.reshape(-1)), two.weights_
    bulk, tail = (0, 1) if means[0] < means[1] else (1, 0)
    if weights[tail] > 0.5:
        return location, scale
    return float(means[bulk]), float(sds[bulk])


def run(sizes, contaminations, separations, seeds: int) -> list[dict]:
    from scipy.stats import norm

    from pipeline.thresholds import ScoreCalibration, _clipped_bulk

    z = norm.ppf(Q)
    rows = []
    for separation in separations:
        for n in sizes:
            for contamination in contaminations:
                rng = np.random.default_rng(1000 * n + int(100 * contamination) + separation)
                thresholds = {"mixture, point": [], "clipped, point": [], "default": []}
                for _ in range(seeds):
                    k = rng.binomial(n, contamination)
                    logs = np.concatenate([rng.normal(0.0, 1.0, n - k), rng.normal(separation, 1.0, k)])
                    location, scale = _mixture_point(logs)
                    thresholds["mixture, point"].append(location + z * scale)
                    location, scale, _ = _clipped_bulk(logs)
                    thresholds["clipped, point"].append(location + z * scale)
                    thresholds["default"].append(np.log(ScoreCalibration.fit(np.exp(logs)).quantile(Q)))
                for method, values in thresholds.items():
                    values = np.asarray(values)
                    fpr = 1.0 - norm.cdf(values)
                    rows.append({"n": n, "contamination": contamination, "separation": separation, "method": method,
                                 "mean_fpr": float(fpr.mean()), "share_over_2pct": float((fpr > 0.02).mean()),
                                 "worst_fpr": float(fpr.max()),
                                 "mean_recall": float((1.0 - norm.cdf(values - separation)).mean())})
                print(f"n={n} contamination={contamination} separation={separation}: done", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench-results" / "small_splits.json"))
    args = parser.parse_args()
    from bench.common import table
    from pipeline.thresholds import CONFIDENCE, MIXTURE_MIN, tolerance_factor

    rows = run((15, 20, 60, 250), (0.0, 0.05, 0.1), (3, 5), args.seeds)
    factors = {n: tolerance_factor(n, Q) for n in (20, 60, 250, 5000)}
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "q": Q, "confidence": CONFIDENCE,
                                          "mixture_min": MIXTURE_MIN, "tolerance_factors": factors,
                                          "rows": rows}, indent=1))
    print(table(["n", "contamination", "separation (sd)", "method", "mean FPR", "splits with FPR > 2%",
                 "worst FPR", "mean recall"],
                [[r["n"], r["contamination"], r["separation"], r["method"], f"{r['mean_fpr']:.2%}",
                  f"{r['share_over_2pct']:.1%}", f"{r['worst_fpr']:.1%}", f"{r['mean_recall']:.2f}"] for r in rows]))
    print("\ntolerance factors for q = 0.99 at confidence", CONFIDENCE, {n: round(k, 3) for n, k in factors.items()})


if __name__ == "__main__":
    main()
