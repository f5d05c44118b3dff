"""Train the squeeze autoencoder on image shards with Ray Train (data-parallel, resumable).

Local (embedded Ray):
    python -m jobs.train --data demo-output/shards --out demo-output/run --epochs 10

On a cluster:
    ray job submit --working-dir . -- python -m jobs.train \\
        --data s3://bucket/shards --out s3://bucket/runs/r1 --workers 4 --gpu

Running the same command again after an interruption resumes from the last checkpoint.
The exported model lands in <out>/model/ (safetensors + config.json with calibration).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields

from jobs.cli import HelpFormatter
from pipeline.images import RESIZE_POLICIES
from pipeline.train import TrainConfig, TrainingInputError, train

D = {f.name: f.default for f in fields(TrainConfig)}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="URL of the image shards (local path, s3://, gs://, ...)")
    p.add_argument("--out", required=True, help="URL of the run folder (checkpoints, metrics, exported model)")
    p.add_argument("--model", choices=["fire", "plain"], default=D["model"], help="architecture")
    p.add_argument("--image-size", type=int, default=D["image_size"], help="side of the square model input")
    p.add_argument("--channels", type=int, choices=[1, 3], default=D["channels"], help="1 = grayscale, 3 = RGB")
    p.add_argument("--latent-dim", type=int, default=D["latent_dim"], help="size of the latent vector")
    p.add_argument("--base-width", type=int, default=D["base_width"], help="channels after the stem")
    p.add_argument("--squeeze-ratio", type=float, default=D["squeeze_ratio"], help="Fire squeeze/expand ratio")
    p.add_argument("--pct-3x3", type=float, default=D["pct_3x3"], help="share of 3x3 expand filters")
    p.add_argument("--epochs", type=int, default=D["epochs"], help="total epochs (a resumed run stops here too)")
    p.add_argument("--batch-size", type=int, default=D["batch_size"], help="images per step per worker")
    p.add_argument("--lr", type=float, default=D["lr"], help="AdamW learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=D["weight_decay"], help="AdamW weight decay")
    p.add_argument("--val-fraction", type=float, default=D["val_fraction"], help="held-out share, by id hash")
    p.add_argument("--seed", type=int, default=D["seed"], help="seed for weights and shuffling")
    p.add_argument("--workers", type=int, default=D["workers"], help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL, bf16 autocast)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on GPU")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per worker (default: leave one CPU for decoding, split the rest)")
    p.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   default=D["placement_strategy"], help="how workers are placed on nodes")
    p.add_argument("--keep-checkpoints", type=int, default=D["keep_checkpoints"],
                   help="best checkpoints kept by val_mse (the latest is always kept)")
    p.add_argument("--max-failures", type=int, default=D["max_failures"], help="worker failures to recover from")
    p.add_argument("--id-column", default=D["id_column"], help="column holding unique ids")
    p.add_argument("--image-column", default=D["image_column"], help="column holding encoded image bytes")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default=D["resize"], help="how images reach the model size")
    p.add_argument("--inject-crash", default=None, help=argparse.SUPPRESS)  # tests: marker file, crash once
    args = p.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import ray

    print("train config:", json.dumps({k: v for k, v in asdict(cfg).items() if k != "inject_crash"}), flush=True)
    ray.init()
    try:
        result = train(cfg)
    except TrainingInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    print(json.dumps({"model": result.model_url, "best_epoch": result.best_epoch, "epochs": len(result.history),
                      "val_mse": last.get("val_mse"), "val_psnr": last.get("val_psnr"),
                      "seconds": round(result.seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
