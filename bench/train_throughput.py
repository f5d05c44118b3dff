"""Training throughput and quality: Ray Train against a bare loop, and Fire against plain.

    python bench/train_throughput.py --images 6000 --epochs 4
    python bench/train_throughput.py --images 3000 --epochs 6 --rounds 3 --setups bare,ray,ray-streamed --no-quality

1. Throughput: the same Fire model, data and number of optimizer steps, trained (a) by a
   bare single-process PyTorch loop (pyarrow read + decode + step every epoch, all cores'
   threads), (b) by the Ray Train job (`pipeline.train.train`) with one worker using every
   core's threads, (c) the same with `--cache-mb 0`, so every epoch streams and decodes the
   shards again instead of reading the rows kept in memory after the first, and (d) with one
   single-threaded worker per core (DDP over gloo, each worker half the batch, so the global
   batch and the steps stay those of the bare loop). Decoding runs in Ray Data tasks.
   `--setups` picks some of bare, ray, ray-streamed, ddp (default: all). The runs alternate,
   `--rounds` times; medians are compared.
   Images/s is training images over the epochs' training time, measured the same way on
   all sides (Ray's includes waiting for Ray Data); wall time including Ray's start-up,
   validation every epoch and checkpoints is shown beside it.
2. Quality: Fire and plain autoencoders after the same training budget on the same corpus:
   validation PSNR, parameters and GFLOPs per image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, table, write_results  # noqa: E402
from pipeline.images import decode_batch  # noqa: E402
from pipeline.model import AutoencoderConfig, build_model, count_parameters  # noqa: E402
from pipeline.sampling import split_of  # noqa: E402
from pipeline.scoring import mse_per_image, psnr  # noqa: E402
from pipeline.train import TrainConfig  # noqa: E402


def bare_loop(cfg: TrainConfig) -> dict:
    """One process, no Ray: read, decode, and train exactly as the workers do, epoch by epoch."""
    import pyarrow.parquet as pq

    from pipeline import storage

    started_all = time.perf_counter()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    shards = storage.list_files(cfg.data_url)
    epochs = []
    for _ in range(cfg.epochs):
        model.train()
        started = time.perf_counter()
        images = 0
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=cfg.batch_size, columns=["id", "image"]):
                ids = batch.column("id").to_pylist()
                keep = ~split_of(ids, cfg.val_fraction)
                images_b = [b for b, k in zip(batch.column("image").to_pylist(), keep) if k]
                pixels, _ = decode_batch(images_b, cfg.model.image_size, cfg.model.channels, cfg.resize)
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
                loss = mse_per_image(x, model(x)["x_hat"]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                images += len(x)
        scheduler.step()
        epochs.append({"train_images": images, "train_seconds": time.perf_counter() - started,
                       "data_wait_seconds": 0.0})
    val_mse = validation_mse(cfg, model)
    return summarize(epochs, val_mse, time.perf_counter() - started_all)


def summarize(epochs: list[dict], val_mse: float, wall: float) -> dict:
    """Images/s over all epochs and over the epochs after the first (start-up excluded)."""
    def rate(part):
        return sum(m["train_images"] for m in part) / sum(m["train_seconds"] for m in part)

    return {"images_per_s": rate(epochs), "after_first_epoch": rate(epochs[1:]) if len(epochs) > 1 else math.nan,
            "first_epoch_wait_s": epochs[0]["data_wait_seconds"],
            "wait_share": sum(m["data_wait_seconds"] for m in epochs) / sum(m["train_seconds"] for m in epochs),
            "val_mse": val_mse, "wall_s": wall}


def validation_mse(cfg: TrainConfig, model: torch.nn.Module) -> float:
    import pyarrow.parquet as pq

    from pipeline import storage

    model.eval()
    errors = []
    with torch.inference_mode():
        for shard in storage.list_files(cfg.data_url):
            table = pq.read_table(shard, columns=["id", "image"])
            val = split_of(table.column("id").to_pylist(), cfg.val_fraction)
            images = [b for b, v in zip(table.column("image").to_pylist(), val) if v]
            if images:
                pixels, _ = decode_batch(images, cfg.model.image_size, cfg.model.channels, cfg.resize)
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
                errors.append(mse_per_image(x, model(x)["x_hat"]).numpy())
    return float(np.concatenate(errors).mean())


def ray_train(cfg: TrainConfig) -> dict:
    import ray

    from pipeline.train import train

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    history = train(cfg).history
    wall = time.perf_counter() - started
    ray.shutdown()
    return summarize(history, history[-1]["val_mse"], wall)


def run_child(mode: str, cfg: TrainConfig) -> dict:
    """One measured run in a fresh process: no Ray processes linger beside a bare run."""
    config = cfg.to_dict()
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--config", json.dumps(config)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gflops(cfg: TrainConfig) -> float:
    model = build_model(cfg.model).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.rand(1, cfg.model.channels, cfg.model.image_size, cfg.model.image_size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (each of W workers takes 1/W)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each throughput setup")
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temp dir)")
    p.add_argument("--setups", type=lambda text: [k.strip() for k in text.split(",") if k.strip()],
                   default=["bare", "ray", "ray-streamed", "ddp"],
                   help="throughput setups, some of bare, ray, ray-streamed, ddp (default: all)")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="skip the Fire-against-plain quality comparison (one more Ray run)")
    p.add_argument("--results", default="train_throughput", help="name of the raw results file")
    p.add_argument("--child", choices=["bare", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        cfg = TrainConfig(**json.loads(args.config))
        print(json.dumps((bare_loop if args.child == "bare" else ray_train)(cfg)), flush=True)
        return

    from pipeline.synth import write_synthetic_corpus

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    data = work / f"shards-{args.images}"
    if not data.exists():
        write_synthetic_corpus(str(data), n=args.images, image_size=64, anomaly_fraction=0.0, seed=0,
                               rows_per_shard=500)
    cores = os.cpu_count()
    base = dict(data_url=str(data), epochs=args.epochs)
    every_setup = {
        "bare": ("bare single-process loop", "bare", dict(batch_size=args.batch_size)),
        "ray": (f"Ray Train, 1 worker x {cores} threads", "ray", dict(batch_size=args.batch_size, workers=1)),
        "ray-streamed": (f"Ray Train, 1 worker x {cores} threads, streamed every epoch (--cache-mb 0)", "ray",
                         dict(batch_size=args.batch_size, workers=1, cache_mb=0)),
        "ddp": (f"Ray Train, {cores} workers x 1 thread (DDP)", "ray",
                dict(batch_size=args.batch_size // cores, workers=cores)),
    }
    unknown = set(args.setups) - set(every_setup)
    if unknown or "bare" not in args.setups:
        raise SystemExit(f"--setups: some of {', '.join(every_setup)}, bare among them (the baseline); "
                         f"got {', '.join(args.setups)}")
    setups = {every_setup[key][0]: every_setup[key][1:] for key in every_setup if key in args.setups}
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    for round_ in range(args.rounds):
        for name, (mode, extra) in setups.items():
            out = work / f"run-{time.monotonic_ns()}"
            runs[name].append(run_child(mode, TrainConfig(out_url=str(out), **base, **extra)))
            print(f"  round {round_ + 1} {name}: {runs[name][-1]['images_per_s']:.0f} img/s", file=sys.stderr,
                  flush=True)
    plain_cfg = TrainConfig(out_url=str(work / f"ray-plain-{time.monotonic_ns()}"),
                            model=AutoencoderConfig(arch="plain"), workers=1,
                            batch_size=args.batch_size, **base)
    fire_name = every_setup["ray"][0]
    plain_ray = run_child("ray", plain_cfg) if args.quality else None

    def median(name, key):
        return statistics.median(r[key] for r in runs[name])

    bare_rate = median("bare single-process loop", "images_per_s")
    rows = []
    for name in setups:
        rate = median(name, "images_per_s")
        rows.append([name, ", ".join(f"{r['images_per_s']:.0f}" for r in runs[name]), rate,
                     f"{rate / bare_rate:.2f}", median(name, "after_first_epoch"),
                     f"{median(name, 'first_epoch_wait_s'):.1f}", f"{median(name, 'wait_share'):.0%}",
                     median(name, "wall_s")])
    print(f"Machine: {machine()}\n")
    print(f"Throughput: {args.images} 64x64 images ({args.images * 0.95:.0f} trained on), {args.epochs} epochs, "
          f"global batch {args.batch_size}, Fire model; medians of {args.rounds} alternating runs\n")
    print(table(["setup", "train images/s (each run)", "median images/s", "ratio to bare",
                 "images/s after epoch 1", "epoch-1 data wait (s)", "data wait share", "wall s"], rows))
    if plain_ray is not None and fire_name in runs:
        print(f"\nQuality after the same budget ({args.epochs} epochs on {args.images} images, Ray Train, 1 "
              "worker):\n")
        fire_cfg = TrainConfig(out_url="-", **base)
        rows = []
        for name, cfg, r in (("fire", fire_cfg, runs[fire_name][0]), ("plain", plain_cfg, plain_ray)):
            rows.append([name, f"{count_parameters(build_model(cfg.model)):,}", gflops(cfg), r["val_mse"],
                         f"{psnr(r['val_mse']):.2f}", r["images_per_s"]])
        print(table(["model", "parameters", "GFLOPs/image", "val MSE", "val PSNR (dB)", "train images/s"], rows))
    write_results(args.results, {"images": args.images, "epochs": args.epochs, "batch_size": args.batch_size,
                                       "runs": runs, "ray_plain": plain_ray})


if __name__ == "__main__":
    main()
