"""Local texture statistics on real surfaces: how far a nearest-neighbour score on them ranks defects.

    python bench/surface_texture_stats.py                 # after the tiled surfaces bench (below)
    python bench/surface_texture_stats.py --seeds 1 --surfaces brick

A question for the next detector, not a score of the pipeline: the patch memory
(`train --patch-bank`) describes a place by the encoder's mid-level maps averaged over 3 x 3
cells, a local mean. A textured surface is told apart by more than its local mean: by how much
its responses vary there. This bench describes every window of an image by the per-channel
mean and standard deviation of a map over the window (a window every half window), scales each
number by the training windows' spread, keeps a random 20,000 of the training images'
windows as the memory, and scores an image by its farthest window from that memory (faiss,
exact L2). Maps: the pixels themselves (no model), and the trained tiled model's stem and first
Fire stage (`pipeline.model`'s `stem` and `down[0]`, run on the whole working-resolution image:
both are convolutional, so this is the tiles' maps but at tile borders).

The models and images are bench/surfaces.py's tiled runs (the same crops, anomalies and
training split), read from its run cache and weights, which this script does not make:

    python bench/surfaces.py --image-size 256 --tile 64 --tile-stride 32 --seeds 1 2 3 \\
        --out bench-output/surfaces-tiled

Reported: AUROC of each description against the unseen normal crops, all kinds and each kind,
beside the same run's `fused` (the default score) and its best pipeline score. Only rankings:
no threshold is fitted here. Prints Markdown; raw results to --results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_results  # noqa: E402
from bench.surface_defects import KINDS  # noqa: E402
from bench.surfaces import SURFACES, auroc, model_config, run_key, surface_set  # noqa: E402

SOURCES = ("pixels", "stem", "stage1")
WINDOWS = (16, 32)  # px of the working-resolution image a description covers
MEMORY = 20_000  # training windows kept
# bench/surfaces.py's tiled runs (the command in the docstring; its defaults otherwise)
TILED = {"train": 500, "normal": 200, "per_kind": 6, "image_size": 256, "tile": 64, "tile_stride": 32}


def surfaces_settings() -> dict:
    """The settings of those runs as bench/surfaces.py keys them: the train job's epochs by default."""
    from pipeline.train import TrainConfig

    return {**TILED, "epochs": TrainConfig(data_url="-", out_url="-").epochs}


def feature_map(model, pixels: np.ndarray, source: str):
    """(B, S, S, C) uint8 -> (B, channels, h, w) float32: the pixels in [0, 1], or a map of `model`."""
    import torch

    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    if source == "pixels":
        return x
    with torch.inference_mode():
        # The encoder's first two steps only, as its _encode takes them: the whole image fits
        # the convolutions but not the latent layer, which expects a tile.
        stem = model.stem(torch.addcmul(-model.mean / model.std, x, 1.0 / model.std))  # (B, base, S/2, S/2)
        return stem if source == "stem" else model.down[0](stem)


def window_statistics(maps, window: int):
    """(B, C, h, w) -> (B, places, 2C): each channel's mean and standard deviation over every
    `window` x `window` square of the map, one every half window (the texture memory's statistics)."""
    from pipeline.patch_memory import window_statistics as statistics

    return statistics(maps, window, max(1, window // 2)).flatten(2).transpose(1, 2).contiguous().numpy()


def farthest_window(train: np.ndarray, test: np.ndarray, memory: int = MEMORY, seed: int = 0) -> np.ndarray:
    """(N, places, D) training and (M, places, D) scored descriptions -> (M,): each scored
    image's largest distance from a window to its nearest remembered training window, every
    number scaled by the training windows' standard deviation."""
    import faiss

    flat = train.reshape(-1, train.shape[-1])
    centre, scale = flat.mean(axis=0), flat.std(axis=0) + 1e-6
    kept = flat[np.random.default_rng(seed).permutation(len(flat))[:memory]]
    index = faiss.IndexFlatL2(flat.shape[1])
    index.add(np.ascontiguousarray((kept - centre) / scale, dtype=np.float32))
    queries = np.ascontiguousarray(((test - centre) / scale).reshape(-1, flat.shape[1]), dtype=np.float32)
    squared, _ = index.search(queries, 1)
    return np.sqrt(np.maximum(squared[:, 0], 0)).reshape(test.shape[0], test.shape[1]).max(axis=1)


def run(surface: str, seed: int, out: Path) -> dict:
    """Every description on one surface bench run; its pipeline scores' AUROCs beside them."""
    import torch

    from pipeline.model import build_model
    from pipeline.sampling import split_of
    from pipeline.train import TrainConfig

    torch.set_num_threads(1)
    settings = surfaces_settings()
    key = run_key(surface, seed, settings)
    weights, cached = out / "models" / f"{key}.pt", out / "runs" / f"{key}.json"
    if not (weights.exists() and cached.exists()):
        raise SystemExit(f"no surfaces bench run {key} under {out}: run the command in this script's docstring")
    pipeline_scores = json.loads(cached.read_text())["scores"]
    pixels, kinds, _ = surface_set(surface, seed, settings["train"], settings["normal"], settings["per_kind"],
                                   settings["image_size"])
    model = build_model(model_config(settings, pixels.shape[-1]))
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    n = settings["train"]
    ids = [f"{surface}-{i:06d}" for i in range(n)]
    val_fraction = TrainConfig(data_url="-", out_url="-").val_fraction  # as bench/surfaces.py splits
    trained = np.flatnonzero(~split_of(ids, val_fraction))  # the crops the model trained on
    kinds = kinds[n:]
    result = {"surface": surface, "seed": seed, "run": key, "described": {},
              "pipeline": {name: pipeline_scores[name]["auroc"] for name in pipeline_scores}}
    for source in SOURCES:
        maps = np.concatenate([feature_map(model, pixels[start:start + 64], source).numpy()
                               for start in range(0, len(pixels), 64)])
        for window in WINDOWS:
            cells = window if source == "pixels" else window // 2  # the model's maps are at half resolution
            described = window_statistics(torch.from_numpy(maps), cells)
            scores = farthest_window(described[trained], described[n:], seed=seed)
            result["described"][f"{source}/{window}"] = {
                "auroc": auroc(scores, kinds), "auroc_by_kind": {kind: auroc(scores, kinds, kind) for kind in KINDS}}
            print(f"[{key}] {source} {window}px: AUROC {result['described'][f'{source}/{window}']['auroc']:.3f}",
                  flush=True)
    return result


def markdown(runs: list[dict]) -> str:
    def cell(values: list[float]) -> str:
        mean, low = float(np.mean(values)), float(np.min(values))
        return f"{mean:.3f}" + (f" (min {low:.3f})" if mean - low > 0.05 else "")

    lines = ["| surface | description | AUROC | by kind: " + " / ".join(KINDS) + " |", "|---|---|---:|---|"]
    for surface in dict.fromkeys(r["surface"] for r in runs):
        group = [r for r in runs if r["surface"] == surface]
        for name in group[0]["described"]:
            got = [r["described"][name] for r in group]
            by_kind = " / ".join(f"{np.mean([g['auroc_by_kind'][k] for g in got]):.2f}" for k in KINDS)
            lines.append(f"| {surface} | {name.replace('/', ', ')} px windows | {cell([g['auroc'] for g in got])} "
                         f"| {by_kind} |")
        best = [max(r["pipeline"].values()) for r in group]
        lines.append(f"| {surface} | pipeline: `fused` / best score of the run | "
                     f"{cell([r['pipeline']['fused'] for r in group])} / {cell(best)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench-output/surfaces-tiled", help="bench/surfaces.py's tiled working folder")
    p.add_argument("--surfaces", nargs="+", default=list(SURFACES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--results", default="surface-texture-stats", help="raw results: a name under docs/bench-results/")
    args = p.parse_args(argv)
    runs = [run(surface, seed, Path(args.out)) for surface in args.surfaces for seed in args.seeds]
    text = markdown(runs)
    print(text)
    write_results(args.results, {"settings": {**surfaces_settings(), "memory": MEMORY, "windows": WINDOWS},
                                 "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
