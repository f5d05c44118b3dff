"""Anomaly detection on real surfaces: photographs shipped with scikit-image, real and drawn defects.

    python bench/surfaces.py                          # 3 surfaces x 3 seeds: ~26 min on 2 busy cores
    python bench/surfaces.py --quick                  # one small run: does it work
    python bench/surfaces.py --surfaces brick --seeds 1 --jobs 1

Normal images: random 256-512 px square crops (a random quarter turn, a random flip) of one
photograph of a surface from `skimage.data` (brick, grass, gravel: 512 px greyscale, shipped
in the package, no download). One model per surface and seed. Anomalies (bench/surface_defects.py,
drawn on fresh crops at crop resolution, before any resizing): real texture from another
photograph pasted in an irregular shape, thin cracks, dark regions, small bright specks, each
at three contrasts in turn.

Each run trains, calibrates and scores as bench/detection.py does (its `train_model` and
`score_corpus`: the train job's defaults in a bare loop, the exported model's calibration by
`calibrate_with_bank`, every image scored by `ImageScorer`). The training corpus is defect-free
(as a user with a clean reference set would have it): 5% of it (split_of, by id) calibrates,
the rest trains and is the neighbour bank. Scored: unseen normal crops plus about 10%
anomalies. Images reach the model as the pipeline feeds them today: each crop PNG-encoded and
decoded by pipeline.images at the model's input size (the whole image resized).

Per score: AUROC; at the default threshold (quantile:0.99 of the score's calibration, what
`embed` flags by), the FPR on the normal images and the recall of each kind (and of each
kind at each contrast); and the recall at the ideal cut that flags 1% of the normals.

Runs are cached in <out>/runs/*.json, their weights in <out>/models/*.pt: an interrupted bench
resumes, a change of scoring only rescores (delete runs/). Prints Markdown (the "Real
surfaces" section of docs/BENCHMARKS.md); writes the raw numbers to --results. Needs
scikit-image (the test extra: pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.surface_defects import CONTRASTS, KINDS, draw_anomaly  # noqa: E402

SURFACES = ("brick", "grass", "gravel")
# Where pasted texture comes from: other photographs in skimage.data that load offline.
TEXTURE_SOURCES = ("brick", "grass", "gravel", "moon", "camera", "astronaut", "immunohistochemistry")
CROP_SIDES = (256, 512)
RESULTS = REPO / "docs" / "bench-results" / "surfaces.json"
DEFAULT_Q = 0.99
TARGET_AUROC, TARGET_RECALL, TARGET_FPR = 0.95, 0.8, 0.02
# Training variants (TrainConfig settings), as in bench/detection.py. The patch variants train
# exactly as "plain" does (they share its weights) and add the patch memory that
# `train --patch-bank` exports, chosen by each sampler, so that the two samplers are compared
# on the same models; the texture variants the same with `--patch-features texture` (a place
# described by the stem's window statistics rather than the mid-level stages' local means).
# "head" trains the learned defect head (`train --defect-head`) on every
# corruption kind of pipeline/corruptions.py; "head-without-<corruption>" leaves one out, and is
# read only on the anomaly kinds that corruption is nearest to (LEFT_OUT_FOR): the leave-one-
# kind-out run, what the head finds of a kind of defect it never saw anything like.
PATCH_BANK = 4096  # patches kept of about 120,000 candidates (475 crops x 256 places at 64 px)
CORRUPTION_KINDS = ("texture", "patch", "stroke", "shade")  # pipeline.corruptions.CORRUPTIONS, by name only
# Each anomaly kind and the corruption most like it: pasted texture / texture blobs, a thin crack /
# a few-pixel stroke, a dark region / a shaded region, small bright specks / a few-pixel stroke.
LEFT_OUT_FOR = {"texture": "texture", "crack": "stroke", "dark": "shade", "speck": "stroke"}
VARIANTS = {"plain": {},
            "patch-coreset": {"patch_bank": PATCH_BANK, "patch_sampler": "coreset"},
            "patch-random": {"patch_bank": PATCH_BANK, "patch_sampler": "random"},
            "texture-random": {"patch_bank": PATCH_BANK, "patch_sampler": "random", "patch_features": "texture"},
            "texture-coreset": {"patch_bank": PATCH_BANK, "patch_sampler": "coreset", "patch_features": "texture"},
            "head": {"defect_head": True},
            **{f"head-without-{left_out}": {"defect_head": True,
                                            "corruptions": tuple(c for c in CORRUPTION_KINDS if c != left_out)}
               for left_out in dict.fromkeys(LEFT_OUT_FOR.values())}}
# Variants that reuse plain's weights (they differ only in the bank).
TRAINED_AS = {variant: "plain" for variant in VARIANTS if variant.startswith(("patch-", "texture-"))}


# ---------------------------------------------------------------- images


def photograph(name: str, channels: int | None = None) -> np.ndarray:
    """One skimage.data photograph as uint8 (H, W, channels); channels as it comes when None."""
    import skimage.data
    from PIL import Image

    pixels = np.asarray(getattr(skimage.data, name)())
    channels = channels or (1 if pixels.ndim == 2 else 3)
    mode = "L" if channels == 1 else "RGB"
    return np.asarray(Image.fromarray(pixels).convert(mode)).reshape(pixels.shape[0], pixels.shape[1], channels)


def random_crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square crop of CROP_SIDES size (as far as the photograph allows), turned and flipped at random."""
    largest = min(CROP_SIDES[1], *photo.shape[:2])
    side = int(rng.integers(min(CROP_SIDES[0], largest), largest + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = np.rot90(photo[top:top + side, left:left + side], k=int(rng.integers(4)))
    return np.ascontiguousarray(crop[:, ::-1] if rng.integers(2) else crop)


def feed(crop: np.ndarray, image_size: int) -> np.ndarray:
    """What the pipeline hands the model: the image PNG-encoded, then decoded at the model's size."""
    from pipeline.images import decode_image, encode_image

    return decode_image(encode_image(crop, compress_level=0), image_size, crop.shape[-1])  # lossless, quick


def surface_set(surface: str, seed: int, n_train: int, n_normal: int, per_kind: int, image_size: int):
    """(pixels (N, S, S, C) uint8, kinds ("" normal), contrasts (0 normal)): `n_train` normal
    crops to train on, then `n_normal` unseen normal crops and `per_kind` anomalies of each kind."""
    rng = np.random.default_rng([seed, zlib.crc32(surface.encode())])
    photo = photograph(surface)
    sources = [photograph(name, photo.shape[-1]) for name in TEXTURE_SOURCES if name != surface]
    pixels = [feed(random_crop(photo, rng), image_size) for _ in range(n_train + n_normal)]
    kinds, contrasts = [""] * len(pixels), [0.0] * len(pixels)
    for i in range(per_kind * len(KINDS)):
        kind, contrast = KINDS[i % len(KINDS)], CONTRASTS[i // len(KINDS) % len(CONTRASTS)]
        crop = random_crop(photo, rng)
        fits = [s for s in sources if s.shape[0] >= crop.shape[0] and s.shape[1] >= crop.shape[1]]
        changed, _ = draw_anomaly(kind, crop, rng, contrast, fits[int(rng.integers(len(fits)))])
        pixels.append(feed(changed, image_size))
        kinds.append(kind)
        contrasts.append(contrast)
    return np.stack(pixels), np.array(kinds, dtype=object), np.array(contrasts)


# ---------------------------------------------------------------- one run


def run_key(surface: str, seed: int, settings: dict, variant: str = "plain") -> str:
    tiles = f"_tile{settings['tile']}s{settings['tile_stride']}" if settings.get("tile") else ""
    return (f"{surface}_s{seed}_p{settings['image_size']}{tiles}_n{settings['train']}_e{settings['epochs']}"
            f"_t{settings['normal']}x{settings['per_kind']}_{variant}")


def model_config(settings: dict, channels: int, defect_head: bool = False):
    """The model a run trains: whole images at --image-size, or with --tile tiles of them (`train --tile`)."""
    from pipeline.model import AutoencoderConfig

    if settings.get("tile"):
        return AutoencoderConfig(image_size=settings["tile"], working_size=settings["image_size"],
                                 tile_stride=settings["tile_stride"], channels=channels, defect_head=defect_head)
    return AutoencoderConfig(image_size=settings["image_size"], channels=channels, defect_head=defect_head)


def run_one(surface: str, seed: int, settings: dict, out: Path, variant: str = "plain") -> dict:
    """Train one model on one surface, calibrate it, score the unseen set; cached as JSON."""
    import torch

    from bench.detection import compared_fusions, patch_bank_of, score_corpus, score_metrics, train_model
    from pipeline.model import build_model
    from pipeline.sampling import split_of
    from pipeline.train import TrainConfig

    key = run_key(surface, seed, settings, variant)
    path = out / "runs" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{key}] {message}", flush=True)

    n_train = settings["train"]
    pixels, kinds, contrasts = surface_set(surface, seed, n_train, settings["normal"], settings["per_kind"],
                                           settings["image_size"])
    ids = [f"{surface}-{i:06d}" for i in range(len(pixels))]
    training = dict(VARIANTS[variant])
    head = training.pop("defect_head", False)
    cfg = TrainConfig(data_url="(in memory)", out_url="(in memory)", seed=seed, epochs=settings["epochs"],
                      model=model_config(settings, pixels.shape[-1], head), **training)
    held_out = split_of(ids[:n_train], cfg.val_fraction)
    log(f"{len(pixels)} images ({time.perf_counter() - started:.0f}s); training on {int((~held_out).sum())}")
    weights = out / "models" / f"{run_key(surface, seed, settings, TRAINED_AS.get(variant, variant))}.pt"
    trained = not weights.exists()  # False: another run's weights, loaded (train_seconds is then no training time)
    if not trained:
        model = build_model(cfg.model)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
    else:
        model, _ = train_model(pixels[:n_train][~held_out], pixels[:n_train][held_out], cfg, log)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
    train_seconds = time.perf_counter() - started
    patch_bank, patch_seconds = None, 0.0
    if cfg.patch_bank:
        training = np.flatnonzero(~held_out)
        patch_bank = patch_bank_of(model, pixels[training], cfg.patch_bank, cfg.patch_sampler, seed,
                                   description=cfg.patch_features)
        patch_seconds = time.perf_counter() - started - train_seconds
        log(f"patch bank of {len(patch_bank.patches)} ({cfg.patch_features}, {cfg.patch_sampler}) "
            f"in {patch_seconds:.0f}s")
    calibration, scores = score_corpus(model, ids, pixels, held_out, trained=n_train, patch_bank=patch_bank)
    kinds, contrasts = kinds[n_train:], contrasts[n_train:]

    def measured(values: np.ndarray, threshold: float) -> dict:
        values = values[n_train:]
        found = score_metrics(values, kinds, threshold, KINDS)
        found["auroc_by_kind"] = {kind: auroc(values, kinds, kind) for kind in KINDS}
        found["recall_by_contrast"] = {
            kind: {str(c): float((values[(kinds == kind) & (contrasts == c)] > threshold).mean())
                   for c in CONTRASTS} for kind in KINDS}
        return found

    metrics = {name: measured(values, calibration.threshold(name, DEFAULT_Q)) for name, values in scores.items()}
    for name, fusion in compared_fusions(scores, np.flatnonzero(held_out)).items():  # as bench/detection.py
        metrics[name] = measured(*fusion)
    result = {"key": key, "surface": surface, "seed": seed, "variant": variant, **settings,
              "channels": int(pixels.shape[-1]), "calibration_images": int(held_out.sum()),
              "scored_normal": int((kinds == "").sum()), "scored_anomalies": int((kinds != "").sum()),
              "train_seconds": train_seconds, "trained": trained, "patch_bank_seconds": patch_seconds,
              "default_score": calibration.default_score,
              "estimated_contamination": {name: c.contamination for name, c in calibration.scores.items()},
              "scores": metrics, "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"done in {result['seconds']:.0f}s: {calibration.default_score} AUROC "
        f"{metrics[calibration.default_score]['auroc']:.3f}")
    return result


def auroc(values: np.ndarray, kinds: np.ndarray, kind: str | None = None) -> float:
    """AUROC of the normal images ("") against the anomalies of one kind (of every kind when None)."""
    from sklearn.metrics import roc_auc_score

    keep = (kinds == "") | ((kinds != "") if kind is None else (kinds == kind))
    return float(roc_auc_score(kinds[keep] != "", values[keep]))


# ---------------------------------------------------------------- Markdown


def _mean(values) -> float:
    return float(np.mean(list(values)))


def _cell(values: list[float], digits: int = 2) -> str:
    """Mean over seeds, with the lowest seed in brackets where it is more than 0.05 below."""
    mean, low = float(np.mean(values)), float(np.min(values))
    return f"{mean:.{digits}f}" + (f" (min {low:.{digits}f})" if mean - low > 0.05 else "")


def _meets(runs: list[dict], score: str) -> bool:
    s = [r["scores"][score] for r in runs]
    return (min(x["auroc"] for x in s) >= TARGET_AUROC and max(x["fpr"] for x in s) <= TARGET_FPR
            and all(_mean(x["recall"][k] for x in s) >= TARGET_RECALL for k in KINDS))


def _score_line(surface: str, label: str, group: list[dict], score: str, bold: bool = False) -> str:
    s = [r["scores"][score] for r in group]
    mark = "**" if bold else ""
    return (f"| {surface} | {label}{mark}{score}{mark} | {_cell([x['auroc'] for x in s], 3)} | "
            f"{_mean(x['fpr'] for x in s):.2%} | "
            + " / ".join(f"{_mean(x['recall'][k] for x in s):.2f}" for k in KINDS) + " | "
            + " / ".join(f"{_mean(x['ideal_recall'][k] for x in s):.2f}" for k in KINDS) + " |")


def _variant_markdown(runs: list[dict]) -> list[str]:
    """The scores only a variant has (the patch scores), by surface and variant."""
    base = next((set(r["scores"]) for r in runs if r["variant"] == "plain"), set())
    lines = ["", f"### Variants: the patch memory (`train --patch-bank {PATCH_BANK}`, coreset or random; "
             "texture: `--patch-features texture`) and the learned defect head (`train --defect-head`)", "",
             "The patch and texture variants are the same models as above (they train exactly as plain does); "
             "only the bank differs. The head variant trains its own model (the autoencoder defect-aware, the "
             "head beside it); its other scores are not shown here.", "",
             "| surface | variant: score | AUROC | FPR at default | recall at default: " + " / ".join(KINDS)
             + " | ideal-1%-FPR recall: " + " / ".join(KINDS) + " |", "|---|---|---:|---:|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        if r["variant"] != "plain" and not r["variant"].startswith("head-without-"):
            groups.setdefault((r["surface"], r["variant"]), []).append(r)
    for (surface, variant), group in groups.items():
        for score in group[0]["scores"]:
            if score not in base:
                lines.append(_score_line(surface, f"{variant}: ", group, score))
    timing = {variant: _mean(r["patch_bank_seconds"] for (_, v), g in groups.items() if v == variant for r in g)
              for variant in dict.fromkeys(v for _, v in groups) if variant in TRAINED_AS}
    if timing:
        lines += ["", "Building the bank (candidates, then the sampler), mean seconds per run: "
                  + ", ".join(f"{variant} {seconds:.1f}" for variant, seconds in timing.items()) + "."]
    return lines


def _head_markdown(runs: list[dict]) -> list[str]:
    """The learned head against each kind: trained on every corruption, and without the one
    nearest that kind (LEFT_OUT_FOR); its training time against plain's."""
    by = {(r["surface"], r["variant"], r["seed"]): r for r in runs}
    lines = ["", "### The learned defect head, leave one kind out", "",
             "Each anomaly kind against the unseen normal crops, by `defect_top` / `defect_max`: the head trained "
             "on every corruption kind, and the head trained without the corruption nearest that kind "
             f"({', '.join(f'{k}: {c}' for k, c in LEFT_OUT_FOR.items())}). Means over seeds.", "",
             "| surface | kind | trained without | AUROC, all kinds | AUROC, kind left out | recall at default, "
             "all kinds | recall at default, kind left out |", "|---|---|---|---:|---:|---:|---:|"]
    for surface in dict.fromkeys(r["surface"] for r in runs):
        seeds = sorted({r["seed"] for r in runs if r["surface"] == surface and r["variant"] == "head"})
        for kind, left_out in LEFT_OUT_FOR.items():
            pairs = [(by[(surface, "head", s)], by.get((surface, f"head-without-{left_out}", s))) for s in seeds]
            pairs = [(a, b) for a, b in pairs if b is not None]
            if not pairs:
                continue

            def cells(metric: str) -> list[str]:
                return [" / ".join(f"{_mean(r['scores'][score][metric][kind] for r in side):.2f}"
                                   for score in ("defect_top", "defect_max")) for side in zip(*pairs)]

            lines.append(f"| {surface} | {kind} | {left_out} | " + " | ".join(cells("auroc_by_kind")) + " | "
                         + " | ".join(cells("recall")) + " |")
    # Training cost: only runs that trained here (a cached or weight-sharing run's time is not training).
    plain = [r["train_seconds"] for r in runs if r["variant"] == "plain" and r.get("trained")]
    head = [r["train_seconds"] for r in runs if r["variant"] == "head" and r.get("trained")]
    if plain and head:
        lines += ["", f"Training cost: {_mean(head):.0f} s per head run against {_mean(plain):.0f} s plain "
                  f"({_mean(head) / _mean(plain):.2f}x; runs in parallel on shared cores)."]
    return lines


def markdown(runs: list[dict], settings: dict, results: str = "docs/bench-results/surfaces.json") -> str:
    from bench.common import machine
    from pipeline.train import TrainConfig

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    others = [r for r in runs if r["variant"] != variants[0]]
    runs = [r for r in runs if r["variant"] == variants[0]]

    by_surface: dict[str, list[dict]] = {}
    for r in runs:
        by_surface.setdefault(r["surface"], []).append(r)
    default = runs[0]["default_score"]
    seeds = sorted({r["seed"] for r in runs})
    first = runs[0]
    lines = ["## Real surfaces", "",
             f"`python bench/surfaces.py` — detection on real photographs; raw numbers in "
             f"{results}. Machine: {machine()}.", "",
             f"Surfaces: {', '.join(by_surface)} (skimage.data, 512 px greyscale photographs), one model per "
             f"surface and seed (seeds {', '.join(map(str, seeds))}). Normal images: random "
             f"{CROP_SIDES[0]}-{CROP_SIDES[1]} px crops, turned and flipped; the model sees each whole crop "
             f"resized to {settings['image_size']} px (the pipeline's decode)"
             + (f", cut into {settings['tile']} px tiles every {settings['tile_stride'] or settings['tile'] // 2} "
                f"px (`train --tile`: trained on {TrainConfig(data_url='-', out_url='-').tiles_per_image} random "
                f"tiles of each crop per step, scored on every tile, maps assembled at {settings['image_size']} px)"
                if settings.get("tile") else "")
             + f", {first['channels']} channel(s). "
             f"Trained on {settings['train']:,} defect-free crops (5% of them, {first['calibration_images']} "
             f"images, calibrate; the rest train for {settings['epochs']} epochs with the train job's other "
             f"defaults and are the neighbour bank). Scored: {settings['normal']} unseen normal crops and "
             f"{settings['per_kind']} anomalies of each kind "
             f"({settings['per_kind'] * len(KINDS) / (settings['normal'] + settings['per_kind'] * len(KINDS)):.0%}"
             f"), drawn at crop resolution before the resize by bench/surface_defects.py (nothing shared with "
             f"pipeline/corruptions.py or pipeline/synth.py): texture = another photograph pasted in an "
             f"irregular shape; crack = random-walk polyline 1-3 px wide, darkened; dark = irregular darker "
             f"region; speck = 3-10 bright discs of radius 1-3 px; each at contrast "
             f"{' / '.join(map(str, CONTRASTS))} in turn. Default threshold: `quantile:{DEFAULT_Q}` of each "
             f"score's calibration. Means over seeds; the lowest seed in brackets where it is more than 0.05 "
             f"below. Target (issue 23): AUROC >= {TARGET_AUROC} on each surface, recall >= {TARGET_RECALL} "
             f"per kind at FPR <= {TARGET_FPR:.0%}, default score and threshold.", "",
             f"### The default score (`{default}`) at the default threshold", "",
             "| surface | AUROC | FPR | " + " | ".join(f"recall {k}" for k in KINDS)
             + " | ideal-1%-FPR recall (min kind) | target met |",
             "|---|---:|---:|" + "---:|" * len(KINDS) + "---:|---|"]
    for surface, group in by_surface.items():
        s = [r["scores"][default] for r in group]
        lines.append(f"| {surface} | {_cell([x['auroc'] for x in s], 3)} | {_mean(x['fpr'] for x in s):.2%} "
                     f"(max {max(x['fpr'] for x in s):.2%}) | "
                     + " | ".join(_cell([x["recall"][k] for x in s]) for k in KINDS)
                     + f" | {_mean(min(x['ideal_recall'].values()) for x in s):.2f} | "
                     f"{'yes' if _meets(group, default) else 'no'} |")
    by_contrast = {k: " / ".join(f"{_mean(r['scores'][default]['recall_by_contrast'][k][str(c)] for r in runs):.2f}"
                                 for c in CONTRASTS) for k in KINDS}
    lines += ["", f"Recall of `{default}` by contrast (all surfaces and seeds): "
              + "; ".join(f"{k} {cells}" for k, cells in by_contrast.items())
              + f" at contrast {' / '.join(map(str, CONTRASTS))}.", "",
              "### Every score", "",
              "| surface | score | AUROC | FPR at default | recall at default: " + " / ".join(KINDS)
              + " | ideal-1%-FPR recall: " + " / ".join(KINDS) + " |", "|---|---|---:|---:|---|---|"]
    for surface, group in by_surface.items():
        for score in group[0]["scores"]:
            lines.append(_score_line(surface, "", group, score, bold=score == default))
    best = {surface: max(group[0]["scores"], key=lambda n: _mean(r["scores"][n]["auroc"] for r in group))
            for surface, group in by_surface.items()}
    lines += ["", f"Best AUROC per surface ({variants[0]}): " + ", ".join(
        f"{surface} `{name}` {_mean(r['scores'][name]['auroc'] for r in by_surface[surface]):.3f}"
        for surface, name in best.items()) + "."]
    if others:
        lines += _variant_markdown([*runs, *others])
    if any(r["variant"] == "head" for r in others):
        lines += _head_markdown([*runs, *others])
    return "\n".join([*lines, ""])


# ---------------------------------------------------------------- main


def results_path(given: str | None, default: Path) -> Path:
    """--results: a bare name means docs/bench-results/<name>.json, as for the other benches (a
    name taken for a path once wrote the results to the repository's root); a path ending in .json
    is used as it is."""
    if not given:
        return default
    if given.endswith(".json"):
        return Path(given)
    if os.sep in given or "/" in given:
        raise SystemExit(f"--results {given!r}: give a name under docs/bench-results/ or a path ending in .json")
    return RESULTS.parent / f"{given}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench-output/surfaces", help="working folder (run cache, weights)")
    p.add_argument("--results", default=None,
                   help="raw results: a name under docs/bench-results/ (as the other benches take it) or a path "
                        "ending in .json; default docs/bench-results/surfaces.json, with --quick <out>/surfaces.json")
    p.add_argument("--surfaces", nargs="+", default=list(SURFACES), help="skimage.data photographs, one model each")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="crop, anomaly and training seeds")
    p.add_argument("--train", type=int, default=500, help="defect-free training crops per run (5%% calibrate)")
    p.add_argument("--normal", type=int, default=200, help="unseen normal crops scored per run")
    p.add_argument("--per-kind", type=int, default=6, help="anomalies of each kind scored per run")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the train job's)")
    p.add_argument("--image-size", type=int, default=None, help="working resolution (default: the model's)")
    p.add_argument("--tile", type=int, default=0, help="tile side fed to the model (train --tile); 0: whole images")
    p.add_argument("--tile-stride", type=int, default=0, help="tile stride when scoring (0: half a tile)")
    p.add_argument("--variants", nargs="+", default=["plain"], choices=sorted(VARIANTS), help="training variants")
    p.add_argument("--quick", action="store_true", help="one small run (brick, seed 1, 200 crops, 2 epochs)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once, one thread each")
    args = p.parse_args(argv)
    from pipeline.model import AutoencoderConfig
    from pipeline.train import TrainConfig

    settings = {"train": args.train, "normal": args.normal, "per_kind": args.per_kind,
                "epochs": args.epochs or TrainConfig(data_url="-", out_url="-").epochs,
                "image_size": args.image_size or AutoencoderConfig().image_size,
                "tile": args.tile, "tile_stride": args.tile_stride}
    if args.quick:
        args.surfaces, args.seeds = args.surfaces[:1], args.seeds[:1]
        settings.update(train=200, normal=60, per_kind=3, epochs=2)
    out = Path(args.out)
    runs_wanted = [(surface, seed, variant) for surface in args.surfaces for variant in args.variants
                   for seed in args.seeds]
    # Runs that train first: a variant that reuses another's weights (TRAINED_AS) waits for them.
    phases = [[r for r in runs_wanted if r[2] not in TRAINED_AS], [r for r in runs_wanted if r[2] in TRAINED_AS]]
    done = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for phase in phases:
            futures = {r: pool.submit(run_one, *r[:2], settings, out, r[2]) for r in phase}
            done.update({r: f.result() for r, f in futures.items()})
    runs = [done[r] for r in runs_wanted]
    results = results_path(args.results, out / "surfaces.json" if args.quick else RESULTS)
    text = markdown(runs, settings, os.path.relpath(results.resolve(), REPO))
    (out / "surfaces.md").write_text(text)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
