"""What the anomaly scores cost, against the model's forward pass, per batch.

    python bench/score_cost.py                  # prints a Markdown table

The embed job runs the folded model on a batch and then scores it (pipeline.inference's
ImageScorer): the reconstruction scores from the image and its reconstruction, the
neighbour scores against the training bank, the fused score from the calibration. This
times, on the same batch (random 64 px images: the cost does not depend on the pixels), in
one process, at one torch thread and at all cores, as the median of `--repeats` interleaved
runs after a warm-up: the forward pass in float32 and in bfloat16; the default scores (what
`embed` computes without `--scores`: fused, its parts and mse) and every score together, as
`pipeline.scoring.compute_scores` makes them (shared maps made once); and each score alone.
Shares are of the float32 forward pass measured in the same run; the summary lines also give
them against the bfloat16 one. The bank is full size (BANK_CAP entries, the most a model
keeps), the worst case for the neighbour scores. The process keeps freed memory as embed's
model actors do (pipeline.resources.keep_freed_memory), which speeds up the forward pass more
than the scores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, table, write_results  # noqa: E402


BASELINE = "forward pass, float32 (the baseline)"
BFLOAT16 = "forward pass, bfloat16"


def parts(batch_size: int, image_size: int):
    """{name: zero-argument callable} for the forward pass and every scoring step."""
    import numpy as np
    import torch

    from bench.surfaces import PATCH_BANK
    from pipeline import scoring
    from pipeline.colour_memory import LEVELS, ColourMemory
    from pipeline.patch_memory import PATCH_DIM, PatchBank, describe, random_projection
    from pipeline.scores import DEFAULT_SCORE, FUSED_FROM, computable, names_needing, parse_scores
    from pipeline.thresholds import calibrate
    from pipeline.model import AutoencoderConfig, build_model, fuse_for_inference

    torch.manual_seed(0)
    config = AutoencoderConfig(image_size=image_size)
    model = fuse_for_inference(build_model(config).eval()).to(memory_format=torch.channels_last)
    x = torch.rand(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(x)
    x_hat, z, stem = out["x_hat"], out["z"], out["stem_stats"]
    rng = np.random.default_rng(0)
    ids = [f"bank-{i}" for i in range(scoring.BANK_CAP)]
    bank = scoring.TrainingBank(ids, rng.normal(size=(len(ids), z.shape[1])).astype(np.float32),
                                rng.normal(size=(len(ids), stem.shape[1])).astype(np.float32))
    held_out = {name: v.numpy() for name, v in scoring.reconstruction_scores(x, x_hat).items()}
    held_out.update({name: v.numpy() for name, v in bank.scores(z, stem, None).items()})
    # A colour memory of random counts (its lookups cost the same whatever it holds).
    colours = ColourMemory(rng.poisson(30.0, size=(LEVELS,) * 3).astype(np.float32))
    held_out.update({name: v.numpy() for name, v in scoring.compute_scores(
        names_needing("colours"), scoring.ScoreInputs(x, x_hat, colours=colours)).items()})
    calibration = calibrate(held_out, DEFAULT_SCORE, FUSED_FROM)
    query_ids = [f"query-{i}" for i in range(batch_size)]

    def bfloat16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    def scored(names):
        inputs = scoring.ScoreInputs(x, x_hat, z, stem, query_ids, bank, colours=colours)
        values = scoring.compute_scores([n for n in names if n != "fused"], inputs)
        if "fused" in names:
            calibration.fuse({name: v.numpy() for name, v in values.items()})
        return values

    # The patch scores (`train --patch-bank`): a bank of random patches of the size
    # bench/surfaces.py measures, searched from the encoder's maps of the same batch.
    features = [stage.float() for stage in model(x, features=True)["features"]]
    channels = describe(features).shape[1]
    patch_bank = PatchBank(rng.normal(size=(PATCH_BANK, PATCH_DIM)).astype(np.float32),
                           random_projection(channels, PATCH_DIM))

    # The same with `--patch-features texture`: the stem's window statistics, 7 x 7 places an input.
    texture_bank = PatchBank(rng.normal(size=(PATCH_BANK, PATCH_DIM)).astype(np.float32),
                             random_projection(describe(features, "texture").shape[1], PATCH_DIM), "texture")

    def patch_scores(bank=patch_bank):
        inputs = scoring.ScoreInputs(x, x_hat, features=features, patch_bank=bank)
        return scoring.compute_scores(names_needing("patches"), inputs)

    # A banked model with a colour memory (every model train exports), without a defect head or patch bank.
    available = computable(True, FUSED_FROM, has_colours=True)
    default = parse_scores(None, available)  # what embed computes unless told: fused, its parts, mse
    every = parse_scores("all", available)
    one = {name: (lambda name=name: scored([name])) for name in every if name != "fused"}
    return {
        BASELINE: lambda: model(x),
        BFLOAT16: bfloat16,
        f"default scores ({', '.join(default)})": lambda: scored(default),
        "every score (--scores all)": lambda: scored(every),
        **{f"  {name}": step for name, step in one.items()},
        "  fused (from its parts' values)": lambda: calibration.fuse(held_out),
        f"patch scores (patch_knn_max and _top: one map), --patch-bank {PATCH_BANK:,}": patch_scores,
        f"the same, --patch-features texture": lambda: patch_scores(texture_bank),
    }


def measure(threads: int, batch_size: int, image_size: int, repeats: int) -> dict[str, float]:
    """Median wall seconds of each part at `threads` torch threads."""
    import torch

    from pipeline.resources import keep_freed_memory

    keep_freed_memory()  # as every process that loads a model for inference does
    torch.set_num_threads(threads)
    steps = parts(batch_size, image_size)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    with torch.inference_mode():
        for step in steps.values():  # warm-up
            step()
        for _ in range(repeats):
            for name, step in steps.items():  # interleaved: drift hits every part alike
                started = time.perf_counter()
                step()
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    from pipeline.inference import resolve_precision
    from pipeline.resources import CPU_BATCH_SIZE

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE, help="images per batch (the embed job's CPU batch)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--results", default="score_cost",
                   help="name of the raw results file under docs/bench-results/ (without .json)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    base = BASELINE
    columns = ["step", *[f"ms/batch, {t} thread{'s' * (t > 1)}" for t in sorted({1, cores})],
               *[f"share of forward, {t} thread{'s' * (t > 1)}" for t in sorted({1, cores})]]
    results = {t: measure(t, args.batch_size, args.image_size, args.repeats) for t in sorted({1, cores})}
    rows = []
    for name in results[1]:
        rows.append([name, *[1000 * results[t][name] for t in results],
                     *[f"{results[t][name] / results[t][base]:.0%}" for t in results]])
    print(f"Machine: {machine()}\n")
    print(f"Batch {args.batch_size} images of {args.image_size} px; median of {args.repeats} runs; "
          f"--precision auto runs {resolve_precision('auto', 'cpu')} on this machine.\n")
    print(table(columns, rows))
    for name in results[1]:
        if name.startswith(("default", "every")):
            print(f"\n{name}: " + ", ".join(
                f"{results[t][name] / results[t][base]:.0%} of the float32 forward pass and "
                f"{results[t][name] / results[t][BFLOAT16]:.0%} of the "
                f"bfloat16 one at {t} thread{'s' * (t > 1)}" for t in results))
    write_results(args.results, {"argv": argv if argv is not None else sys.argv[1:], "batch_size": args.batch_size,
                                 "auto_precision": resolve_precision("auto", "cpu"),
                                 "image_size": args.image_size, "repeats": args.repeats,
                                 "seconds_per_batch": {str(t): r for t, r in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
