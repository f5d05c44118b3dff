"""Anomaly detection quality by score, training and contamination; and one-class digits.

    python bench/detection.py                       # everything: about an hour on 2 cores
    python bench/detection.py --seeds 1 --jobs 1    # a quicker look
    python bench/detection.py --variants plain invariance --extra --no-digits --results detection-invariance
    python bench/detection.py --table docs/bench-results/detection-after.json   # reprint recorded results

Synthetic corpus (pipeline.synth, its five anomaly kinds exactly as the demo makes them; seeds
other than the demo's 0): N images at 64 px with 5% and with 10% anomalies, each seed and
contamination trained once per training variant (`--variants`, VARIANTS: plain, defect-aware
(--defect-aware), invariance (--invariance 0.05), ssim-l1 (--loss ssim_l1), texture-random (plain's
weights with the texture memory of --patch-bank 4096 --patch-sampler random --patch-features
texture; for such runs also `fused` with a patch score as a fourth part, FUSED_WITH)). One more run
at 128 px, and one with the structure-aware loss.

Each run is what the pipeline does, in one process: the train job's defaults (TrainConfig:
model, epochs, batch, AdamW, cosine schedule, the corruptions and loss of pipeline.train) in a
bare loop on the training split (split_of, 5% held out by id hash, anomalies included: no
labels are used anywhere before scoring), keeping the epoch the train job would export (the
lowest held-out mse), not the last; then the exported model's calibration exactly as
train's calibrate_export makes it (`calibrate_with_bank`: the held-out split calibrates every
score, the training split is the neighbour bank); then every image of the corpus scored by
`ImageScorer`, the code the embed job runs (its Ray pipeline equals this loop row for row:
tests/test_embed.py).

For every score: AUROC and average precision against the labels; at the score's default
threshold (quantile:0.99 of its calibration, what `embed` flags by), the false-positive rate
on the normal images and the recall of each anomaly kind; and the recall of each kind at an
ideal threshold chosen with the labels to flag 1% of the normal images, which separates what
the calibration loses from what the score loses.

Digits (scikit-learn's 1,797 real 8x8 scans, upsampled to 32 px grey): each digit in turn is
the normal class; the model trains on 70% of it (the earlier bench's settings, so its mse
AUROC compares with the 0.986 recorded before these scores); the other 30% of that digit and
all other digits are scored. The bank is 70% of the training images, the rest calibrate (they
were trained on: their reconstruction scores read low, which only moves the fused scale).

Runs are cached in <out>/runs/*.json and their trained weights in <out>/models/*.pt, so an
interrupted bench resumes and a change of scoring only rescores (delete runs/ to rescore);
--jobs runs that many at once, one torch thread each. Prints Markdown for docs/BENCHMARKS.md and writes it to
<out>/detection.md, the raw numbers to <out>/detection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ANOMALY_KINDS = ("scratch", "blot", "noise", "colour_shift", "foreign_object")
IDEAL_FPR = 0.01
DEFAULT_Q = 0.99
# Training variants: TrainConfig fields over its defaults, each named explicitly so that a change of
# default does not change what a recorded variant means.
VARIANTS = {"plain": {"invariance": 0.0}, "defect-aware": {"defect_aware": True, "invariance": 0.0},
            "ssim-l1": {"loss": "ssim_l1", "invariance": 0.0}, "invariance": {"invariance": 0.05},
            "texture-random": {"invariance": 0.0, "patch_bank": 4096, "patch_sampler": "random",
                               "patch_features": "texture"}}
# Variants that only add a memory to plain's model: they score plain's weights (trained once, first).
TRAINED_AS = {"texture-random": "plain"}
# The fusion question (issue 23), asked of every run with a patch memory: `fused` with a patch score as
# one more part ("fused+patch_knn_max"), calibrated as the train job calibrates `fused`.
FUSED_WITH = ("patch_knn_max", "patch_knn_top")
# The default fused parts before the colour memory joined them, measured beside every run
# ("fused@mse,ssim_top,stem_knn"), calibrated the same way: the before and after of that change.
FUSED_BEFORE = ("mse", "ssim_top", "stem_knn")


# ---------------------------------------------------------------- one run


def corpus(n: int, size: int, fraction: float, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The synth job's corpus in memory: ids, (N, S, S, 3) uint8 pixels (the PNGs' exact
    pixels), kinds ("" for normal)."""
    from pipeline.synth import anomaly_plan, synthetic_image

    plan = anomaly_plan(n, fraction, seed)
    pixels = np.stack([synthetic_image(i, seed, size, 3, plan.get(i, "")) for i in range(n)])
    kinds = np.array([plan.get(i, "") for i in range(n)], dtype=object)
    return [f"synth-{i:08d}" for i in range(n)], pixels, kinds


def train_model(pixels: np.ndarray, val_pixels: np.ndarray, cfg, log):
    """pipeline.train's loop on one worker, without Ray: same model, optimiser, schedule and
    batch loss (`batch_loss`: corruptions, views, loss terms), from the same TrainConfig; (the
    model of the epoch the train job exports: the lowest held-out mse, that epoch)."""
    import copy

    import torch

    from pipeline.inference import ImageScorer, to_input
    from pipeline.model import build_model
    from pipeline.train.loop import batch_loss

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    data = torch.from_numpy(pixels)
    order_seed = torch.Generator().manual_seed(cfg.seed)
    held_out = to_input(torch.from_numpy(val_pixels))
    best = (float("inf"), 0, None)
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        corruptions = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 31)
        viewing = torch.Generator().manual_seed(cfg.seed * 100_019 + epoch * 37)
        order = torch.randperm(len(data), generator=order_seed)
        total = 0.0
        for start in range(0, len(data), cfg.batch_size):
            x = to_input(data[order[start:start + cfg.batch_size]])
            if len(x) < 2:  # BatchNorm needs two images
                continue
            loss = batch_loss(model, x, cfg, corruptions, viewing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
        scheduler.step()
        model.eval()
        scorer = ImageScorer(model, scores=("mse",))  # the train job's validation (a tiled model's: by tiles)
        val_mse = float(np.concatenate([scorer(x)["scores"]["mse"] for x in held_out.split(256)]).mean())
        if val_mse < best[0]:
            best = (val_mse, epoch + 1, copy.deepcopy(model.state_dict()))
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {total / len(data):.5f} val_mse {val_mse:.5f} "
            f"({time.perf_counter() - started:.0f}s)")
    model.load_state_dict(best[2])
    return model.eval(), best[1]


def patch_bank_of(model, pixels: np.ndarray, size: int, sampler: str, seed: int, batch_size: int = 256,
                  precision: str = "float32", description: str = "stages"):
    """The patch bank `train --patch-bank size --patch-sampler sampler --patch-features description`
    stores with `model`, made in process from its training images (N, S, S, C) as
    pipeline.train.export makes it: the same candidates per image, projection and sampler."""
    import torch

    from pipeline.inference import ImageScorer, to_input
    from pipeline.model import fuse_for_inference
    from pipeline.patch_memory import bank_from_candidates
    from pipeline.train.export import PATCH_CANDIDATES, candidates_of, candidates_per_input, patch_projection

    folded = fuse_for_inference(model).to(memory_format=torch.channels_last)
    encoder = ImageScorer(folded, scores=(), precision=precision)
    projection = patch_projection(folded, model.config, seed, description)
    per_input, generator = candidates_per_input(model.config, len(pixels)), np.random.default_rng(seed)
    candidates = np.concatenate([candidates_of(encoder, to_input(torch.from_numpy(pixels[start:start + batch_size])),
                                               projection, per_input, generator, description)
                                 for start in range(0, len(pixels), batch_size)])
    return bank_from_candidates(candidates, projection, size, sampler, seed, PATCH_CANDIDATES, description)


def score_corpus(model, ids: list[str], pixels: np.ndarray, held_out: np.ndarray, trained: int | None = None,
                 batch_size: int = 256, precision: str = "float32", patch_bank=None):
    """(calibration, {score: (N,)}) as train's calibrate_export and the embed job make them. The
    first `trained` rows (default all) are the training corpus: `held_out` among them calibrates,
    the rest is the neighbour bank and the colour memory; rows after them are only scored. With a
    `patch_bank` (`patch_bank_of`), the patch scores too."""
    import torch

    from bench.common import scored_rows
    from pipeline.colour_memory import ColourMemory
    from pipeline.inference import ImageScorer
    from pipeline.model import fuse_for_inference
    from pipeline.scoring import calibrate_with_bank

    trained = len(ids) if trained is None else trained
    colours = ColourMemory.from_pixels(pixels[:trained][~held_out[:trained]], seed=0)
    scorer = ImageScorer(fuse_for_inference(model).to(memory_format=torch.channels_last), precision=precision,
                         patch_bank=patch_bank, colours=colours)
    rows = scored_rows(scorer, pixels, batch_size)
    calibration, bank = calibrate_with_bank(ids[:trained], held_out[:trained],
                                            {name: values[:trained] for name, values in rows.items()})
    scores = {name: values for name, values in rows.items() if name not in ("z", "stem_stats")}
    near: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = slice(start, start + batch_size)
            for name, values in bank.scores(torch.from_numpy(rows["z"][chunk]),
                                            torch.from_numpy(rows["stem_stats"][chunk]), ids[chunk]).items():
                near.setdefault(name, []).append(values.numpy())
    scores.update({name: np.concatenate(values) for name, values in near.items()})
    scores["fused"] = calibration.fuse(scores)
    return calibration, scores


def fused_of(scores: dict[str, np.ndarray], held_out: np.ndarray, parts) -> tuple[np.ndarray, float]:
    """Every row's fused score of `parts`, and its default threshold, calibrated on the `held_out`
    rows (indices of the training rows) as pipeline.thresholds.calibrate fits `fused`."""
    from pipeline.thresholds import calibrate

    calibration = calibrate({name: scores[name][held_out] for name in parts}, "fused", tuple(parts))
    return calibration.fuse(scores), calibration.threshold("fused", DEFAULT_Q)


def fused_with(scores: dict[str, np.ndarray], held_out: np.ndarray, part: str) -> tuple[np.ndarray, float]:
    """`fused_of` the default parts and `part`."""
    from pipeline.scores import FUSED_FROM

    return fused_of(scores, held_out, tuple(dict.fromkeys((*FUSED_FROM, part))))


def compared_fusions(scores: dict[str, np.ndarray], held_out: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
    """{"fused+<part>" for each FUSED_WITH part the run has, "fused@<FUSED_BEFORE>"}: (values, threshold)."""
    fusions = {f"fused+{part}": fused_with(scores, held_out, part) for part in FUSED_WITH if part in scores}
    if all(part in scores for part in FUSED_BEFORE):
        fusions[f"fused@{','.join(FUSED_BEFORE)}"] = fused_of(scores, held_out, FUSED_BEFORE)
    return fusions


def score_metrics(values: np.ndarray, kinds: np.ndarray, threshold: float, kind_names=ANOMALY_KINDS) -> dict:
    """AUROC, AP, FPR and per-kind recall at `threshold`, per-kind recall at the ideal 1% FPR cut
    (kinds among `kind_names`; bench/surfaces.py passes its own)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = (kinds != "").astype(int)
    normal = values[labels == 0]
    ideal = float(np.quantile(normal, 1 - IDEAL_FPR))
    present = [k for k in kind_names if (kinds == k).any()]
    return {"auroc": float(roc_auc_score(labels, values)), "ap": float(average_precision_score(labels, values)),
            "threshold": float(threshold), "fpr": float((normal > threshold).mean()),
            "recall": {k: float((values[kinds == k] > threshold).mean()) for k in present},
            "ideal_recall": {k: float((values[kinds == k] > ideal).mean()) for k in present}}


def run_corpus(key: str, n: int):
    """A run key's ("s1_c0.05_plain_p64") corpus and settings: (seed, contamination, variant, image
    size), ids, pixels, kinds, its TrainConfig and its held-out mask."""
    from pipeline.model import AutoencoderConfig
    from pipeline.sampling import split_of
    from pipeline.train import TrainConfig

    seed, fraction, variant, size = key.split("_")
    seed, fraction, size = int(seed[1:]), float(fraction[1:]), int(size[1:])
    ids, pixels, kinds = corpus(n, size, fraction, seed)
    cfg = TrainConfig(data_url="(in memory)", out_url="(in memory)", model=AutoencoderConfig(image_size=size),
                      seed=seed, **VARIANTS[variant])
    return (seed, fraction, variant, size), ids, pixels, kinds, cfg, split_of(ids, cfg.val_fraction)


def saved_model(weights: Path, cfg):
    """(model in eval mode, the epoch it was exported from) from a run's kept weights."""
    import torch

    from pipeline.model import build_model

    saved = torch.load(weights, weights_only=True)
    model = build_model(cfg.model)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["epoch"]


def run_one(key: str, n: int, out: Path, precision: str = "float32") -> dict:
    """One (seed, contamination, training variant, image size) run; cached as JSON."""
    import torch

    from pipeline.model import count_parameters

    path = out / "runs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{key}] {message}", flush=True)

    (seed, fraction, variant, size), ids, pixels, kinds, cfg, held_out = run_corpus(key, n)
    log(f"{n} images, {int((kinds != '').sum())} anomalies; training on {int((~held_out).sum())}")
    trained_as = key.replace(f"_{variant}_", f"_{TRAINED_AS.get(variant, variant)}_")
    weights = out / "models" / f"{trained_as}.pt"  # kept, so that a change of scoring reruns in minutes
    if weights.exists():
        model, exported_epoch = saved_model(weights, cfg)
    else:
        model, exported_epoch = train_model(pixels[~held_out], pixels[held_out], cfg, log)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "epoch": exported_epoch}, weights)
    train_seconds = time.perf_counter() - started
    patch_bank = None
    if cfg.patch_bank:
        patch_bank = patch_bank_of(model, pixels[~held_out], cfg.patch_bank, cfg.patch_sampler, seed,
                                   precision=precision, description=cfg.patch_features)
    calibration, scores = score_corpus(model, ids, pixels, held_out, precision=precision, patch_bank=patch_bank)
    metrics = {name: score_metrics(values, kinds, calibration.threshold(name, DEFAULT_Q))
               for name, values in scores.items()}
    # The training rows' held-out split calibrates, as for every score.
    for name, (values, threshold) in compared_fusions(scores, np.flatnonzero(held_out)).items():
        metrics[name] = score_metrics(values, kinds, threshold)
    result = {"key": key, "precision": precision, "seed": seed, "contamination": fraction, "variant": variant, "image_size": size,
              "images": n, "params": count_parameters(model), "epochs": cfg.epochs, "exported_epoch": exported_epoch,
              "train_seconds": train_seconds, "default_score": calibration.default_score,
              "estimated_contamination": {name: c.contamination for name, c in calibration.scores.items()},
              "scores": metrics, "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"done in {result['seconds']:.0f}s: {calibration.default_score} AUROC "
        f"{result['scores'][calibration.default_score]['auroc']:.3f}")
    return result


# ---------------------------------------------------------------- digits


def run_digits(out: Path, epochs: int = 40, batch_size: int = 16, base_width: int = 16, latent_dim: int = 32) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from bench.digits import load_digits_32
    from pipeline.model import AutoencoderConfig
    from pipeline.sampling import split_of
    from pipeline.train import TrainConfig

    path = out / "runs" / "digits.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    pixels, target = load_digits_32()
    ids = [f"digit-{i:04d}" for i in range(len(target))]
    model_config = AutoencoderConfig(image_size=32, channels=1, base_width=base_width, latent_dim=latent_dim)
    rows, started = [], time.perf_counter()
    for digit in range(10):
        normal = np.flatnonzero(target == digit)
        train = np.random.default_rng(digit).choice(normal, size=int(round(0.7 * len(normal))), replace=False)
        cfg = TrainConfig(data_url="-", out_url="-", model=model_config, epochs=epochs, batch_size=batch_size,
                          seed=digit)
        val = split_of([ids[i] for i in train], cfg.val_fraction)  # the train job's own held-out split
        model, _ = train_model(pixels[train[~val]], pixels[train[val]], cfg, lambda message: None)
        evaluated = np.ones(len(target), dtype=bool)
        evaluated[train] = False
        order = np.concatenate([train, np.flatnonzero(evaluated)])  # training images first
        calibrating = split_of([ids[i] for i in order], 0.3)  # read for the training rows only
        _, scores = score_corpus(model, [ids[i] for i in order], pixels[order], calibrating, trained=len(train))
        # The compared fusions, as in every run (calibrated on the same held-out rows).
        scores.update({name: values for name, (values, _) in
                       compared_fusions(scores, np.flatnonzero(calibrating[:len(train)])).items()})
        anomaly = (target[order] != digit).astype(int)
        unseen = np.arange(len(order)) >= len(train)
        rows.append({"digit": digit, "train_images": len(train),
                     "auroc": {name: float(roc_auc_score(anomaly[unseen], values[unseen]))
                               for name, values in scores.items()}})
        print(f"[digits] {digit}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["auroc"].items())
              + f" ({time.perf_counter() - started:.0f}s)", flush=True)
    result = {"epochs": epochs, "batch_size": batch_size, "base_width": base_width, "latent_dim": latent_dim,
              "per_digit": rows, "mean_auroc": {name: float(np.mean([r["auroc"][name] for r in rows]))
                                                for name in rows[0]["auroc"]},
              "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- Markdown


def _mean(values) -> float:
    return float(np.mean(list(values)))


def _kinds_cell(runs: list[dict], score: str, field: str) -> list[str]:
    """Per kind: mean over seeds (min when seeds disagree by more than 0.05)."""
    cells = []
    for kind in ANOMALY_KINDS:
        values = [r["scores"][score][field][kind] for r in runs]
        mean, low = float(np.mean(values)), float(np.min(values))
        cells.append(f"{mean:.2f}" + (f" (min {low:.2f})" if mean - low > 0.05 else ""))
    return cells


def markdown(runs: list[dict], digits: dict | None, n: int, seeds: list[int]) -> str:
    from bench.common import machine

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["image_size"], r["variant"], r["contamination"]), []).append(r)
    default = runs[0]["default_score"] if runs else "fused"
    lines = ["## Anomaly detection by score", "",
             f"`python bench/detection.py` — detection quality, not speed. Machine: {machine()}.", "",
             f"Synthetic corpora of {n:,} images (pipeline.synth, seeds {', '.join(map(str, seeds))}; the demo's "
             "is 0), trained as the train job trains (10 epochs, a bare loop of its batch loss; the training variant in each row), "
             "calibrated as the train job calibrates, every image scored as the embed job scores it. FPR: "
             "normal images flagged; recall per kind: scratch / blot / noise / colour_shift / foreign_object. "
             f"Means over the seeds (the lowest seed in brackets where it is more than 0.05 below). "
             f"Default threshold: `quantile:{DEFAULT_Q}` of each score's calibration; ideal: the label-chosen "
             f"cut that flags {IDEAL_FPR:.0%} of the normal images.", "",
             f"### The default score (`{default}`) at the default threshold, no labels used", "",
             "| size | training | anomalies | FPR | " + " | ".join(f"recall {k}" for k in ANOMALY_KINDS)
             + " | ideal-1%-FPR recall (min kind) | AUROC |",
             "|---|---|---:|---:|" + "---:|" * len(ANOMALY_KINDS) + "---:|---:|"]
    for (size, variant, fraction), group in sorted(groups.items()):
        # The default, and the compared fusions (`compared_fusions`).
        compared = (name for name in group[0]["scores"] if name.startswith((f"{default}+", f"{default}@")))
        for score in (default, *compared):
            s = [r["scores"][score] for r in group]
            fprs = [x["fpr"] for x in s]
            ideal_min = _mean(min(x["ideal_recall"].values()) for x in s)
            training = variant if score == default else f"{variant}: `{score}`"
            lines.append(f"| {size} px | {training} | {fraction:.0%} ({len(group)} seed{'s' * (len(group) > 1)}) | "
                         f"{np.mean(fprs):.2%} (max {np.max(fprs):.2%}) | "
                         + " | ".join(_kinds_cell(group, score, "recall"))
                         + f" | {ideal_min:.2f} | {_mean(x['auroc'] for x in s):.3f} |")
    lines += ["", "### Every score, 64 px", ""]
    for variant in VARIANTS:
        for fraction in sorted({r["contamination"] for r in runs}):
            group = groups.get((64, variant, fraction))
            if not group:
                continue
            lines += [f"**{variant} training, {fraction:.0%} anomalies** ({len(group)} seeds)", "",
                      "| score | AUROC | AP | FPR at default | recall at default: " + " / ".join(ANOMALY_KINDS)
                      + " | ideal-1%-FPR recall: " + " / ".join(ANOMALY_KINDS) + " |",
                      "|---|---:|---:|---:|---|---|"]
            for score in group[0]["scores"]:
                s = [r["scores"][score] for r in group]
                at_default = " / ".join(f"{_mean(x['recall'][k] for x in s):.2f}" for k in ANOMALY_KINDS)
                at_ideal = " / ".join(f"{_mean(x['ideal_recall'][k] for x in s):.2f}" for k in ANOMALY_KINDS)
                bold = "**" if score == default else ""
                lines.append(f"| {bold}{score}{bold} | {_mean(x['auroc'] for x in s):.3f} | "
                             f"{_mean(x['ap'] for x in s):.3f} | {_mean(x['fpr'] for x in s):.2%} | {at_default} | "
                             f"{at_ideal} |")
            estimated = _mean(r["estimated_contamination"][default] for r in group)
            lines += ["", f"Contamination the calibration estimated from the held-out split ({default}): "
                          f"{estimated:.1%} (true {fraction:.0%}).", ""]
    if digits:
        mean = digits["mean_auroc"]
        lines += ["### scikit-learn digits, one class at a time", "",
                  f"Each digit in turn normal; trained on 70% of it ({digits['epochs']} epochs, batch "
                  f"{digits['batch_size']}, base width {digits['base_width']}, latent {digits['latent_dim']}, 32 px "
                  "grey); AUROC over the unseen 30% of the digit against all other digits, mean over the ten "
                  "digits. Before these scores, mse gave 0.986.", "",
                  "| score | mean AUROC | lowest digit |", "|---|---:|---:|"]
        for name, value in mean.items():
            low = min(digits["per_digit"], key=lambda r: r["auroc"][name])
            bold = "**" if name == default else ""
            lines.append(f"| {bold}{name}{bold} | {value:.3f} | {low['auroc'][name]:.3f} (digit {low['digit']}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench-output/detection", help="working folder (run cache, results)")
    p.add_argument("--n", type=int, default=5000, help="synthetic images per corpus")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="corpus and training seeds")
    p.add_argument("--contamination", type=float, nargs="+", default=[0.05, 0.10], help="anomaly shares")
    p.add_argument("--variants", nargs="+", default=["plain", "defect-aware"], choices=sorted(VARIANTS),
                   help="training variants run for every seed and contamination")
    p.add_argument("--extra", nargs="*", default=["s1_c0.05_plain_p128", "s1_c0.05_ssim-l1_p64"],
                   help="more runs, as s<seed>_c<share>_<variant>_p<size>")
    p.add_argument("--no-digits", action="store_true", help="skip the digits part")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                   help="the scoring forward pass's (ImageScorer); training is float32 either way")
    p.add_argument("--results", default="detection",
                   help="name of the raw results, docs/bench-results/<name>.json (a partial run gets its own)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once, one thread each")
    p.add_argument("--table", nargs="+", metavar="RESULTS", default=None,
                   help="print the Markdown of raw results files (docs/bench-results/*.json) and exit")
    args = p.parse_args(argv)
    if args.table:
        for name in args.table:
            saved = json.loads(Path(name).read_text())
            seeds = sorted({r["seed"] for r in saved["runs"]})
            print(f"<!-- {name} -->\n" + markdown(saved["runs"], saved.get("digits"), saved["runs"][0]["images"], seeds))
        return 0
    out = Path(args.out)
    keys = [f"s{seed}_c{fraction:.2f}_{variant}_p64" for fraction in args.contamination for variant in args.variants
            for seed in args.seeds]
    keys += [k for k in args.extra if k not in keys]
    # A variant that scores another's weights (TRAINED_AS) runs after the runs that train them.
    later = [key for key in keys if key.split("_")[2] in TRAINED_AS]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        digits_future = None if args.no_digits else pool.submit(run_digits, out)
        runs = [f.result() for f in [pool.submit(run_one, key, args.n, out, args.precision)
                                     for key in keys if key not in later]]
        runs += [f.result() for f in [pool.submit(run_one, key, args.n, out, args.precision) for key in later]]
        digits = digits_future.result() if digits_future else None
    text = markdown(runs, digits, args.n, args.seeds)
    (out / "detection.md").write_text(text)
    from bench.common import write_results

    write_results(args.results, {"argv": sys.argv[1:] if argv is None else argv, "runs": runs, "digits": digits})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
