"""A tiled model at working resolution: the real train and embed jobs on images of 512 px cut
into 64 px tiles, against the same jobs on the same images shrunk whole to 64 px (the bare
baseline: what the pipeline does without --tile), in the same run, on the same cores.

    python bench/tiled.py                              # 1,000 images of 512 px: ~25 min on 2 cores
    python bench/tiled.py --images 120 --size 256      # does it work

Corpus: `synth` images (5% anomalies) written at --size px, PNG. Each job runs in a fresh
process with its own local Ray (`ray.init`), with the jobs' defaults otherwise: train for
--epochs (4 random tiles of each image per step), export with calibration (which scores every
held-out and bank image, tiled), then embed with the default scores. Each job runs twice: once
timed, once with its process tree's peak memory sampled (bench.common.run_child), because the
sampler itself costs CPU.

Reported per job: rows, images/s and tiles/s (training: the epoch's own rate, as its progress
line prints it; embed: rows over the job's wall time), the job's wall seconds, and peak PSS.
Writes docs/bench-results/tiled.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, run_child, table, write_results  # noqa: E402

MODES = ("whole", "tiled")


def model_config(mode: str, size: int, tile: int):
    from pipeline.model import AutoencoderConfig

    if mode == "tiled":
        return AutoencoderConfig(image_size=tile, working_size=size)
    return AutoencoderConfig(image_size=tile)  # the whole image shrunk to the tile's size


def child(job: str, mode: str, data: str, work: str, size: int, tile: int, epochs: int, memory: bool) -> dict:
    """One job in this process, on a fresh local Ray; its numbers as one JSON line. Each training
    run has its own folder (a second run into the first's would resume it: nothing to train);
    embed reads the timed run's model."""
    import ray

    from pipeline.embed import EmbedConfig, embed
    from pipeline.train import TrainConfig, train

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run = str(Path(work) / f"run-{mode}")
    try:
        if job == "train":
            result = train(TrainConfig(data_url=data, out_url=run + ("-memory" if memory else ""),
                                       model=model_config(mode, size, tile), epochs=epochs))
            last = result.history[-1]
            return {"rows": last["train_images"] + last["val_images"], "images_per_s": last["images_per_s"],
                    "tiles_per_s": last.get("tiles_per_s", last["images_per_s"]), "seconds": result.seconds,
                    "val_psnr": last["val_psnr"]}
        summary = embed(EmbedConfig(data_url=data, model_url=str(Path(run) / "model"),
                                    out_url=str(Path(work) / f"latents-{mode}-{os.getpid()}")))
        return {"rows": summary.rows_out, "images_per_s": summary.images_per_s,
                "tiles_per_s": summary.tiles_per_s or summary.images_per_s, "seconds": summary.seconds,
                "flagged": summary.flagged_rows}
    finally:
        ray.shutdown()


def measure(job: str, mode: str, data: str, work: Path, args, sample_memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", job, mode, "--data", data, "--work", str(work),
           "--size", str(args.size), "--tile", str(args.tile), "--epochs", str(args.epochs),
           *(["--memory"] if sample_memory else [])]
    result = run_child(cmd, sample_memory)
    print(f"  {job} {mode}{' (memory)' if sample_memory else ''}: {result['images_per_s']:.1f} images/s, "
          f"{result['tiles_per_s']:.0f} tiles/s, {result['seconds']:.0f} s, peak {result['peak_pss_mib']:.0f} MiB",
          file=sys.stderr, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=512, help="working resolution, px")
    p.add_argument("--tile", type=int, default=64, help="tile side (and the whole-image baseline's size), px")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--child", nargs=2, metavar=("JOB", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.data, args.work, args.size, args.tile, args.epochs, args.memory)),
              flush=True)
        return

    from pipeline.model import AutoencoderConfig
    from pipeline.synth import write_synthetic_corpus

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        data = str(work / "shards")
        write_synthetic_corpus(data, n=args.images, image_size=args.size, anomaly_fraction=0.05, seed=0,
                               rows_per_shard=250)
        results: dict[str, dict[str, dict]] = {}
        for mode in MODES:  # train first: embed reads the exported model
            for job in ("train", "embed"):
                timed = measure(job, mode, data, work, args, sample_memory=False)
                timed["peak_pss_mib"] = measure(job, mode, data, work, args, sample_memory=True)["peak_pss_mib"]
                results.setdefault(job, {})[mode] = timed
    grid = AutoencoderConfig(image_size=args.tile, working_size=args.size).tile_grid()
    rows = []
    for job, by_mode in results.items():
        whole, tiled = by_mode["whole"], by_mode["tiled"]
        for mode, r in by_mode.items():
            rows.append([job, mode, r["rows"], round(r["images_per_s"], 1), round(r["tiles_per_s"]),
                         round(r["seconds"]), round(r["peak_pss_mib"])])
        rows.append([job, "tiled / whole", "", f"{tiled['images_per_s'] / whole['images_per_s']:.3f}x",
                     f"{tiled['tiles_per_s'] / whole['tiles_per_s']:.2f}x", "",
                     f"{tiled['peak_pss_mib'] / whole['peak_pss_mib']:.2f}x"])
    print(f"\nMachine: {machine()}\n\n{args.images:,} synthetic images of {args.size} px; tiled: {args.tile} px tiles, "
          f"{grid.count} an image ({len(grid.rows)} x {len(grid.columns)}, {grid.stride} px apart); whole: each image "
          f"shrunk to {args.tile} px. Train: {args.epochs} epochs.\n")
    print(table(["job", "model", "rows", "images/s", "tiles/s", "job seconds", "peak PSS MiB"], rows))
    write_results("tiled", {"settings": {"images": args.images, "size": args.size, "tile": args.tile,
                                         "tiles_per_image": grid.count, "stride": grid.stride, "epochs": args.epochs},
                            "results": results})


if __name__ == "__main__":
    main()
