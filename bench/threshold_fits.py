"""Other fits of the default threshold, and other fusions, on the detection bench's trained models.

    python bench/threshold_fits.py                 # after bench/detection.py --out bench-output/detection-thr
    python bench/threshold_fits.py --table docs/bench-results/threshold-fits.json

bench/detection.py keeps each run's trained weights under <out>/models/. This script scores each
of those runs' corpora once more (the detection bench's own `corpus` and `score_corpus`, so the
same images, held-out split, calibration and bank), keeps the values under <out>/values/, and
then asks what `fused`'s default threshold (`quantile:0.99`, no labels) would flag under:
- fits of the held-out `fused` values: "default" (`ScoreCalibration`: a two-Gaussian mixture
  chosen by BIC from MIXTURE_MIN values up), and "skew-normal by BIC" (one Gaussian, two, or one
  skew-normal, whichever BIC prefers; the skew-normal's 0.99-quantile raised by the same
  tolerance margin the default adds);
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
from bench.detection import ANOMALY_KINDS, DEFAULT_Q, IDEAL_FPR, VARIANTS  # noqa: E402

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


def skew_normal_fit(values: np.ndarray) -> float:
    """The bulk as one Gaussian, two (the lower one) or one skew-normal, by BIC; below
    MIXTURE_MIN values the default (clipping)."""
    from scipy.stats import norm, skewnorm
    from sklearn.mixture import GaussianMixture

    from pipeline.thresholds import MAX_CONTAMINATION, MIXTURE_MIN, tolerance_factor

    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < MIXTURE_MIN:
        return default_fit(values)
    column = values[:, None]
    one = GaussianMixture(1, random_state=0).fit(column)
    two = GaussianMixture(2, n_init=3, random_state=0).fit(column)
    shape, location, scale = skewnorm.fit(values)
    skew_bic = 3 * math.log(n) - 2 * float(skewnorm.logpdf(values, shape, location, scale).sum())
    margin = tolerance_factor(n, DEFAULT_Q) - norm.ppf(DEFAULT_Q)  # the default's bound over its point estimate
    best = min((one.bic(column), "one"), (two.bic(column), "two"), (skew_bic, "skew"))[1]
    if best == "skew":
        return float(skewnorm.ppf(DEFAULT_Q, shape, location, scale) + margin * skewnorm.std(shape, location, scale))
    means, sds, weights = two.means_[:, 0], np.sqrt(two.covariances_.reshape(-1)), two.weights_
    bulk, tail = (0, 1) if means[0] < means[1] else (1, 0)
    if best == "one" or weights[tail] > MAX_CONTAMINATION:
        return float(values.mean() + tolerance_factor(n, DEFAULT_Q) * values.std())
    return float(means[bulk] + tolerance_factor(max(3, round(n * weights[bulk])), DEFAULT_Q) * sds[bulk])


FITS = {"default": default_fit, "skew-normal by BIC": skew_normal_fit}


def run_values(key: str, out: Path, n: int) -> dict[str, np.ndarray]:
    """The fused parts' robust z of every image and (leave-one-out) of the held-out ones, and the
    kinds; cached under <out>/values/."""
    cache = out / "values" / f"{key}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=True) as saved:
            return dict(saved)
    import torch

    from bench.detection import corpus, score_corpus
    from pipeline.model import AutoencoderConfig, build_model
    from pipeline.sampling import split_of
    from pipeline.train import TrainConfig

    weights = out / "models" / f"{key}.pt"
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run bench/detection.py --out {out} for this run first")
    torch.set_num_threads(1)
    seed, fraction, variant, size = key.split("_")
    seed, fraction, size = int(seed[1:]), float(fraction[1:]), int(size[1:])
    ids, pixels, kinds = corpus(n, size, fraction, seed)
    cfg = TrainConfig(data_url="-", out_url="-", model=AutoencoderConfig(image_size=size), seed=seed,
                      **VARIANTS[variant])
    held_out = split_of(ids, cfg.val_fraction)
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    calibration, scores = score_corpus(model.eval(), ids, pixels, held_out)
    values = {"parts": calibration.fused_parts(scores),
              "held_out_parts": calibration.held_out_parts({name: scores[name][held_out]
                                                            for name in calibration.fused_from}),
              "kinds": kinds.astype(str)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **values)
    return values


def measure(fused: np.ndarray, kinds: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    normal = fused[kinds == ""]
    ideal = float(np.quantile(normal, 1 - IDEAL_FPR))
    return {"threshold": float(threshold), "fpr": float((normal > threshold).mean()),
            "recall": {k: float((fused[kinds == k] > threshold).mean()) for k in ANOMALY_KINDS if (kinds == k).any()},
            "auroc": float(roc_auc_score((kinds != "").astype(int), fused)),
            "ideal_colour_shift": float((fused[kinds == "colour_shift"] > ideal).mean())}


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
