"""Training throughput and quality: Ray Train against a bare loop, and Fire against plain.

    python bench/train_throughput.py --images 4000 --epochs 3

1. Throughput: the same Fire model, data, batch size and number of steps, trained (a) by a
   bare single-process PyTorch loop (pyarrow read + decode + step, all cores' threads) and
   (b) by the Ray Train job (`pipeline.train.train`, one worker, decoding in Ray Data tasks).
   Images/s is training images over the epochs' training time, measured the same way in both;
   wall time including Ray's start-up is shown beside it.
2. Quality: Fire and plain autoencoders after the same training budget on the same corpus:
   validation PSNR, parameters and GFLOPs per image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, table  # noqa: E402
from pipeline.datasets import split_of  # noqa: E402
from pipeline.images import decode_batch  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.reconstruction import mse_per_image, psnr  # noqa: E402
from pipeline.train import TrainConfig  # noqa: E402


def bare_loop(cfg: TrainConfig) -> dict:
    """One process, no Ray: read, decode, and train exactly as the workers do, epoch by epoch."""
    import pyarrow.parquet as pq

    from pipeline import storage

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    shards = storage.list_shards(cfg.data)
    train_seconds = images = 0.0
    for _ in range(cfg.epochs):
        model.train()
        started = time.perf_counter()
        for shard in shards:
            for batch in pq.ParquetFile(shard).iter_batches(batch_size=cfg.batch_size, columns=["id", "image"]):
                ids = batch.column("id").to_pylist()
                keep = ~split_of(ids, cfg.val_fraction)
                images_b = [b for b, k in zip(batch.column("image").to_pylist(), keep) if k]
                pixels, _ = decode_batch(images_b, cfg.image_size, cfg.channels, cfg.resize)
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
                loss = mse_per_image(x, model(x)["x_hat"]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                images += len(x)
        scheduler.step()
        train_seconds += time.perf_counter() - started
    return {"images_per_s": images / train_seconds, "val_mse": validation_mse(cfg, model)}


def validation_mse(cfg: TrainConfig, model: torch.nn.Module) -> float:
    import pyarrow.parquet as pq

    from pipeline import storage

    model.eval()
    errors = []
    with torch.inference_mode():
        for shard in storage.list_shards(cfg.data):
            table = pq.read_table(shard, columns=["id", "image"])
            val = split_of(table.column("id").to_pylist(), cfg.val_fraction)
            images = [b for b, v in zip(table.column("image").to_pylist(), val) if v]
            if images:
                pixels, _ = decode_batch(images, cfg.image_size, cfg.channels, cfg.resize)
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
                errors.append(mse_per_image(x, model(x)["x_hat"]).numpy())
    return float(np.concatenate(errors).mean())


def ray_train(cfg: TrainConfig) -> dict:
    from pipeline.train import train

    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    history = result.history
    images = sum(m["train_images"] for m in history)
    train_seconds = sum(m["train_images"] / m["images_per_s"] for m in history)
    return {"images_per_s": images / train_seconds, "val_mse": history[-1]["val_mse"], "wall_s": wall}


def gflops(cfg: TrainConfig) -> float:
    model = build_model(cfg.model_config()).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.rand(1, cfg.channels, cfg.image_size, cfg.image_size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temp dir)")
    args = p.parse_args()

    import ray

    from pipeline.synth import write_synthetic_corpus

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-train-"))
    data = work / f"shards-{args.images}"
    if not data.exists():
        write_synthetic_corpus(str(data), n=args.images, image_size=64, anomaly_fraction=0.0, seed=0,
                               rows_per_shard=500)
    base = dict(data=str(data), epochs=args.epochs, batch_size=args.batch_size, workers=1)

    fire_bare = bare_loop(TrainConfig(out=str(work / "bare"), **base))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    stamp = time.monotonic_ns()
    fire_ray = ray_train(TrainConfig(out=str(work / f"ray-fire-{stamp}"), **base))
    plain_cfg = TrainConfig(out=str(work / f"ray-plain-{stamp}"), model="plain", **base)
    plain_ray = ray_train(plain_cfg)
    ray.shutdown()

    print(f"Machine: {machine()}\n")
    print(f"Throughput: {args.images} 64x64 images, {args.epochs} epochs, batch {args.batch_size}, Fire model\n")
    print(table(["path", "train images/s", "ratio to bare", "wall s (incl. start-up)"], [
        ["bare single-process loop", fire_bare["images_per_s"], "1.00", "-"],
        ["Ray Train, 1 worker", fire_ray["images_per_s"],
         f"{fire_ray['images_per_s'] / fire_bare['images_per_s']:.2f}", fire_ray["wall_s"]],
    ]))
    print(f"\nQuality after the same budget ({args.epochs} epochs on {args.images} images, Ray Train):\n")
    fire_cfg = TrainConfig(out="-", **base)
    rows = []
    for name, cfg, r in (("fire", fire_cfg, fire_ray), ("plain", plain_cfg, plain_ray)):
        rows.append([name, f"{count_parameters(build_model(cfg.model_config())):,}", gflops(cfg), r["val_mse"],
                     f"{psnr(r['val_mse']):.2f}", r["images_per_s"]])
    print(table(["model", "parameters", "GFLOPs/image", "val MSE", "val PSNR (dB)", "train images/s"], rows))
    print("\n" + json.dumps({"bare": fire_bare, "ray_fire": fire_ray, "ray_plain": plain_ray}))


if __name__ == "__main__":
    main()
