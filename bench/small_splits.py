"""How often a threshold taken on a held-out split flags too many normal images.

    python bench/small_splits.py            # minutes: NumPy draws, no model

A held-out split of n images calibrates each score: its normal bulk is fitted (on the log of
the score) and `quantile:0.99` takes a threshold from the fit. Here the normal log-scores are
drawn from a known distribution, so the true false-positive rate of any threshold is exact, and
a share of each split is anomalies drawn `separation` standard deviations above the bulk's
median. Three shapes of normal bulk:
- "gaussian": standard Gaussian draws (the calibration's own model of the bulk);
- "skewed": a skew-normal with shape 4, standardised (a log-score with a long upper tail);
- "max of 3": the largest of three standard Gaussians (the shape of `fused`, the largest of its
  parts' z-scores).
For each shape, n, contamination and separation, `--seeds` splits are drawn and calibrated three
ways:
- "clipped, point": upper-tail clipping (`_clipped_bulk`), the fitted 0.99-quantile itself;
- "default": what `ScoreCalibration.quantile` does (clipping below MIXTURE_MIN values, a
  two-Gaussian mixture chosen by BIC from MIXTURE_MIN up, and the upper CONFIDENCE bound);
- "clipped, bound": the alternative, clipping at every size with the same bound (below
  MIXTURE_MIN it is the default).
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

SEEDS = 150
Q = 0.99
SIZES = (20, 60, 250, 1000)
CONTAMINATIONS = (0.0, 0.05, 0.1)
SEPARATIONS = (3, 5)
SKEW = 4.0
SHAPES = ("gaussian", "skewed", "max of 3")  # of the normal bulk: see Shape


class Shape:
    """A normal bulk: draws, its exact upper tail, and its median and standard deviation."""

    def __init__(self, name: str):
        from scipy.stats import norm, skewnorm

        self.name = name
        if name == "gaussian":
            self.draw, self.sf = (lambda rng, n: rng.normal(0.0, 1.0, n)), norm.sf
        elif name == "skewed":
            mean, sd = skewnorm.mean(SKEW), skewnorm.std(SKEW)
            self.draw = lambda rng, n: (skewnorm.rvs(SKEW, size=n, random_state=rng) - mean) / sd
            self.sf = lambda t: skewnorm.sf(np.asarray(t) * sd + mean, SKEW)
        elif name == "max of 3":
            self.draw = lambda rng, n: rng.normal(0.0, 1.0, (n, 3)).max(axis=1)
            self.sf = lambda t: 1.0 - norm.cdf(t) ** 3
        else:
            raise ValueError(name)
        reference = self.draw(np.random.default_rng(0), 200_000)
        self.median, self.sd = float(np.median(reference)), float(reference.std())


def run(shapes, sizes, contaminations, separations, seeds: int) -> list[dict]:
    from scipy.stats import norm

    from pipeline.thresholds import MIXTURE_MIN, ScoreCalibration, _clipped_bulk

    z = norm.ppf(Q)
    rows = []
    for shape in (Shape(name) for name in shapes):
        for separation in separations:
            for n in sizes:
                for contamination in contaminations:
                    rng = np.random.default_rng(1000 * n + int(100 * contamination) + separation)
                    anomaly = shape.median + separation * shape.sd
                    thresholds = {"clipped, point": [], "default": [], "clipped, bound": []}
                    for _ in range(seeds):
                        k = rng.binomial(n, contamination)
                        logs = np.concatenate([shape.draw(rng, n - k), rng.normal(anomaly, shape.sd, k)])
                        clipped = _clipped_bulk(logs)
                        default = np.log(ScoreCalibration.fit(np.exp(logs)).quantile(Q))
                        thresholds["clipped, point"].append(clipped[0] + z * clipped[1])
                        thresholds["default"].append(default)
                        bound = ScoreCalibration(n, False, *clipped, 0.0, 1.0, ()).quantile(Q)  # as the default bounds
                        thresholds["clipped, bound"].append(bound if n >= MIXTURE_MIN else default)
                    for method, values in thresholds.items():
                        values = np.asarray(values)
                        fpr = shape.sf(values)
                        rows.append({"shape": shape.name, "n": n, "contamination": contamination,
                                     "separation": separation, "method": method, "mean_fpr": float(fpr.mean()),
                                     "share_over_2pct": float((fpr > 0.02).mean()), "worst_fpr": float(fpr.max()),
                                     "mean_recall": float(norm.sf((values - anomaly) / shape.sd).mean())})
                    print(f"{shape.name} n={n} contamination={contamination} separation={separation}: done",
                          file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    """Two tables: the splits of MIXTURE_MIN values and more, where the default fits a mixture,
    beside clipping with the same bound; and the smaller ones, where the default clips, beside
    the point estimate."""
    from bench.common import table
    from pipeline.thresholds import MIXTURE_MIN

    by = {(r["shape"], r["n"], r["contamination"], r["separation"], r["method"]): r for r in rows}
    keys = sorted({k[:4] for k in by}, key=lambda k: (k[3], SHAPES.index(k[0]), k[1], k[2]))

    def cells(r: dict) -> list[str]:
        return [f"{r['mean_fpr']:.2%}", f"{r['share_over_2pct']:.0%}", f"{r['mean_recall']:.2f}"]

    large = [[*k, *cells(by[(*k, "default")]), *cells(by[(*k, "clipped, bound")])]
             for k in keys if k[1] >= MIXTURE_MIN]
    small = [[*k, *cells(by[(*k, "clipped, point")]), *cells(by[(*k, "default")]),
              f"{by[(*k, 'default')]['worst_fpr']:.1%}"] for k in keys if k[1] < MIXTURE_MIN]
    head = ["shape", "n", "contamination", "separation (sd)"]
    return (table(head + ["default (mixture): mean FPR", "> 2%", "recall", "clipped, bound: mean FPR", "> 2%",
                          "recall"], large)
            + "\n\n" + table(head + ["point: mean FPR", "> 2%", "recall", "default: mean FPR", "> 2%", "recall",
                                      "worst FPR"], small))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench-results" / "small_splits.json"))
    parser.add_argument("--table", metavar="RESULTS", help="print the Markdown of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["rows"]))
        return
    from bench.common import machine
    from pipeline.thresholds import CLIP_SIGMAS, CONFIDENCE, MIXTURE_MIN, tolerance_factor

    rows = run(args.shapes, SIZES, CONTAMINATIONS, SEPARATIONS, args.seeds)
    factors = {n: tolerance_factor(n, Q) for n in (20, 60, 250, 1000, 5000)}
    settings = {"machine": machine(), "seeds": args.seeds, "q": Q, "confidence": CONFIDENCE, "clip_sigmas": CLIP_SIGMAS,
                "mixture_min": MIXTURE_MIN, "skew": SKEW, "tolerance_factors": factors}
    Path(args.out).write_text(json.dumps({**settings, "rows": rows}, indent=1))
    print(markdown(rows))
    print("\ntolerance factors for q = 0.99 at confidence", CONFIDENCE, {n: round(k, 3) for n, k in factors.items()})


if __name__ == "__main__":
    main()
