"""Other fits of the default threshold, and other fusions, on the detection bench's trained models.

    python bench/threshold_fits.py                 # after bench/detection.py --out bench-output/detection-thr
    python bench/threshold_fits.py --table docs/bench-results/threshold-fits.json

bench/detection.py keeps each run's trained weights under <out>/models/. This script scores each
of those runs' corpora once more (the detection bench's own `corpus` and `score_corpus`, so the
same images, held-out split, calibration and bank), keeps the values under <out>/values/, and
then asks what `fused`'s default threshold (`quantile:0.99`, no labels) would flag under:
- fits of the held-out `fused` values: "default" (`ScoreCalibration`: a two-Gaussian mixture
  chosen by BIC from MIXTURE_MIN values up); "skew-normal by BIC" (one Gaussian, two, or one
  skew-normal, whichever BIC prefers; the skew-normal's 0.99-quantile raised by the same
  tolerance margin the default adds); "skew-normal bulk + Gaussian tail by BIC" (those three or a
  skew-normal bulk under a Gaussian of anomalies, fitted by EM);
- fusions of the parts' robust z-scores (each fitted with the default): "max" (the default),
  "sum", "l2 of positives", "max + half the second", "log-sum-exp".
For each: the FPR on the normal images and each kind's recall at that threshold, AUROC, and the
recall of colour shifts at the ideal cut (1% of the normals flagged, labels used). A rule for
a change of default (issue 23): FPR <= 2% on every run and no kind's recall down by more than
0.02 on any run. Raw results: docs/bench-results/threshold-fits.json (or `--results`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import write_results  # noqa: E402
from bench.detection import ANOMALY_KINDS, DEFAULT_Q, score_metrics  # noqa: E402

FUSIONS = {
    "max": lambda z: z.max(axis=0),
    "sum": lambda z: z.sum(axis=0),
    "l2 of positives": lambda z: np.sqrt((np.maximum(z, 0.0) ** 2).sum(axis=0)),
    "max + half the second": lambda z: np.sort(z, axis=0)[-1] + 0.5 * np.sort(z, axis=0)[-2],
    "log-sum-exp": lambda z: np.log(np.exp(z).sum(axis=0)),
}


def default_fit(values: np.ndarray) -> float:
    from pipeline.thresholds import ScoreCalibration

    return ScoreCalibration.fit(values, log=False).quantile(DEFAULT_Q)


def _skew_threshold(bulk: tuple[float, float, float], n_bulk: int) -> float:
    """A skew-normal bulk's 0.99-quantile raised by the margin the default's tolerance bound adds
    over its point estimate for a bulk of n_bulk values."""
    from scipy.stats import norm, skewnorm

    from pipeline.thresholds import tolerance_factor

    margin = tolerance_factor(max(3, n_bulk), DEFAULT_Q) - norm.ppf(DEFAULT_Q)
    return float(skewnorm.ppf(DEFAULT_Q, *bulk) + margin * skewnorm.std(*bulk))


def _bulk_models(values: np.ndarray):
    """{model: (BIC, threshold)} for the default's Gaussian bulk (one Gaussian or the lower of two,
    whichever BIC prefers, as `ScoreCalibration` fits it) and for one skew-normal; and the
    two-Gaussian fit."""
    from scipy.stats import skewnorm
    from sklearn.mixture import GaussianMixture

    n, column = values.size, values[:, None]
    one = GaussianMixture(1, random_state=0).fit(column)
    two = GaussianMixture(2, n_init=3, random_state=0).fit(column)  # the fits fit_normal_bulk makes
    skew = skewnorm.fit(values)
    skew_bic = 3 * math.log(n) - 2 * float(skewnorm.logpdf(values, *skew).sum())
    return {"gaussian": (min(one.bic(column), two.bic(column)), default_fit(values)),
            "skew": (skew_bic, _skew_threshold(skew, n))}, two


def skew_normal_fit(values: np.ndarray) -> float:
    """The bulk as one Gaussian, two (the lower one) or one skew-normal, by BIC; below
    MIXTURE_MIN values the default (clipping)."""
    from pipeline.thresholds import MIXTURE_MIN

    values = np.asarray(values, dtype=np.float64)
    if values.size < MIXTURE_MIN:
        return default_fit(values)
    return min(_bulk_models(values)[0].values())[1]


def _skew_bulk_gaussian_tail(values: np.ndarray, start) -> tuple[float, tuple, float] | None:
    """EM for a skew-normal bulk under a Gaussian tail, started from the two-Gaussian split:
    (log-likelihood, the bulk's (shape, location, scale), the tail's weight), or None when the tail
    ends up empty, heavier than MAX_CONTAMINATION or below the bulk's mean."""
    from scipy.optimize import minimize
    from scipy.stats import norm, skewnorm

    from pipeline.thresholds import MAX_CONTAMINATION

    lower = int(np.argmin(start.means_[:, 0]))
    bulk = start.predict_proba(values[:, None])[:, lower]  # each value's responsibility of the bulk
    shape, location, scale = skewnorm.fit(values)
    params, previous, tail = np.array([shape, location, math.log(scale)]), -math.inf, 0.0
    for _ in range(60):
        tail = 1.0 - float(bulk.mean())
        if not 1e-3 < tail <= MAX_CONTAMINATION:
            return None
        params = minimize(lambda p, r=bulk: -float((r * skewnorm.logpdf(values, p[0], p[1], math.exp(p[2]))).sum()),
                          params, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 400}).x
        weights = 1.0 - bulk
        mean = float((weights * values).sum() / weights.sum())
        sd = math.sqrt(float((weights * (values - mean) ** 2).sum() / weights.sum())) + 1e-6
        in_bulk = (1.0 - tail) * skewnorm.pdf(values, params[0], params[1], math.exp(params[2]))
        in_tail = tail * norm.pdf(values, mean, sd)
        likelihood = float(np.log(in_bulk + in_tail + 1e-300).sum())
        bulk = in_bulk / (in_bulk + in_tail + 1e-300)
        if likelihood - previous < 1e-5:
            break
        previous = likelihood
    shape, location, scale = params[0], params[1], math.exp(params[2])
    if mean <= skewnorm.mean(shape, location, scale):
        return None
    return previous, (shape, location, scale), tail


def skew_mixture_fit(values: np.ndarray) -> float:
    """As skew_normal_fit, with one more model in the BIC's choice: a skew-normal bulk under a
    Gaussian tail of anomalies (its 0.99-quantile and margin taken on the bulk's share)."""
    from pipeline.thresholds import MIXTURE_MIN

    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < MIXTURE_MIN:
        return default_fit(values)
    models, two = _bulk_models(values)
    fitted = _skew_bulk_gaussian_tail(values, two)
    if fitted is not None:
        likelihood, bulk, tail = fitted
        models["skew bulk"] = (6 * math.log(n) - 2 * likelihood, _skew_threshold(bulk, round(n * (1 - tail))))
    return min(models.values())[1]


FITS = {"default": default_fit, "skew-normal by BIC": skew_normal_fit,
        "skew-normal bulk + Gaussian tail by BIC": skew_mixture_fit}


def run_values(key: str, out: Path, n: int) -> dict[str, np.ndarray]:
    """The fused parts' robust z of every image and (leave-one-out) of the held-out ones, and the
    kinds; cached under <out>/values/."""
    cache = out / "values" / f"{key}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=True) as saved:
            return dict(saved)
    import torch

    from bench.detection import run_corpus, saved_model, score_corpus

    weights = out / "models" / f"{key}.pt"
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run bench/detection.py --out {out} for this run first")
    torch.set_num_threads(1)
    _, ids, pixels, kinds, cfg, held_out = run_corpus(key, n)
    calibration, scores = score_corpus(saved_model(weights, cfg)[0], ids, pixels, held_out)
    values = {"parts": calibration.fused_parts(scores),
              "held_out_parts": calibration.held_out_parts({name: scores[name][held_out]
                                                            for name in calibration.fused_from}),
              "kinds": kinds.astype(str)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **values)
    return values


def measure(fused: np.ndarray, kinds: np.ndarray, threshold: float) -> dict:
    """The detection bench's metrics at `threshold`, and colour shifts' recall at its ideal cut."""
    metrics = score_metrics(fused, kinds, threshold)
    return {"threshold": metrics["threshold"], "fpr": metrics["fpr"], "recall": metrics["recall"],
            "auroc": metrics["auroc"], "ideal_colour_shift": metrics["ideal_recall"]["colour_shift"]}


def evaluate(values: dict[str, np.ndarray]) -> dict[str, dict]:
    kinds = values["kinds"]
    combined = {}
    for fusion, combine in FUSIONS.items():
        held, every = combine(values["held_out_parts"]), combine(values["parts"])
        for fit, threshold_of in FITS.items():
            if fusion == "max" or fit == "default":
                combined[f"{fusion} / {fit}"] = measure(every, kinds, threshold_of(held))
    return combined


def verdicts(runs: list[dict]) -> dict[str, str]:
    """Each candidate against the rule for a change of default, run by run against "max / default"."""
    out = {}
    for name in runs[0]["candidates"]:
        worst_fpr = max(r["candidates"][name]["fpr"] for r in runs)
        worst_loss = max(r["candidates"]["max / default"]["recall"][k] - r["candidates"][name]["recall"][k]
                         for r in runs for k in r["candidates"][name]["recall"])
        out[name] = (f"max FPR {worst_fpr:.2%}, largest recall loss {max(worst_loss, 0.0):.2f}: "
                     f"{'passes' if worst_fpr <= 0.02 and worst_loss <= 0.02 else 'fails'}")
    return out


def markdown(runs: list[dict]) -> str:
    lines = ["| run | candidate | threshold | FPR | recall " + " / ".join(ANOMALY_KINDS) + " | AUROC | "
             "colour shift at the ideal cut |", "|---|---|---:|---:|---|---:|---:|"]
    for run in runs:
        for name, m in run["candidates"].items():
            recall = " / ".join(f"{m['recall'].get(k, math.nan):.2f}" for k in ANOMALY_KINDS)
            lines.append(f"| {run['key']} | {name} | {m['threshold']:.3f} | {m['fpr']:.2%} | {recall} | "
                         f"{m['auroc']:.4f} | {m['ideal_colour_shift']:.2f} |")
    lines += ["", "| candidate | against the rule (FPR <= 2% on every run, no kind's recall down by more than 0.02) |",
              "|---|---|"]
    lines += [f"| {name} | {verdict} |" for name, verdict in verdicts(runs).items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-output/detection-thr", help="bench/detection.py's working folder")
    p.add_argument("--n", type=int, default=5000, help="images per corpus, as the detection run used")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--contamination", type=float, nargs="+", default=[0.05, 0.10])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs scored at once, one thread each")
    p.add_argument("--results", default="threshold-fits", help="raw results name under docs/bench-results/")
    p.add_argument("--table", metavar="RESULTS", help="print the Markdown of a results file and exit")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["runs"]))
        return
    out = Path(args.out)
    keys = [f"s{seed}_c{fraction:.2f}_plain_p64" for seed in args.seeds for fraction in args.contamination]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        values = dict(zip(keys, pool.map(run_values, keys, [out] * len(keys), [args.n] * len(keys))))
    runs = [{"key": key, "candidates": evaluate(values[key])} for key in keys]
    write_results(args.results, {"argv": sys.argv[1:], "runs": runs})
    print(markdown(runs))


if __name__ == "__main__":
    main()
