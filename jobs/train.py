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
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.cli import arguments, parser, run_job
from jobs.inputs import add_column_flags
from pipeline import train
from pipeline.corruptions import CORRUPTIONS
from pipeline.errors import InputError
from pipeline.images import RESIZE_POLICIES
from pipeline.model import ARCHITECTURES, AutoencoderConfig
from pipeline.patch_memory import DESCRIPTIONS, SAMPLERS
from pipeline.scoring import TRAINING_LOSSES
from pipeline.train import PLACEMENT_STRATEGIES, TrainConfig

D = {f.name: f.default for f in fields(TrainConfig)}
M = AutoencoderConfig()
MODEL_FIELDS = ("arch", "image_size", "channels", "latent_dim", "base_width", "squeeze_ratio", "pct_3x3",
                "defect_head")


def build_parser() -> argparse.ArgumentParser:
    p = parser("train", __doc__)
    p.add_argument("--data", required=True, help="URL of the image shards (local path, s3://, gs://, ...)")
    p.add_argument("--out", required=True, help="URL of the run folder (checkpoints, metrics, exported model)")
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHITECTURES, default=M.arch,
                       help="architecture: fire (squeeze) or plain (the baseline)")
    model.add_argument("--image-size", type=int, default=M.image_size,
                       help="side of the square images are decoded to: the model's input, or with --tile the "
                            "working resolution its tiles are cut from (up to 4096)")
    model.add_argument("--tile", type=int, default=0, metavar="T",
                       help="see images at --image-size through T px tiles, the model's input (a multiple of 16 "
                            "from 32 to 256): a thin crack that shrinking the whole image would erase stays visible. "
                            "Training samples --tiles-per-image tiles of each image; embed scores every tile and "
                            "assembles the anomaly maps at working resolution. 0 (the default): whole images")
    model.add_argument("--tile-stride", type=int, default=0, metavar="PX",
                       help="with --tile: pixels between neighbouring tiles when scoring (default: half a tile)"),
    model.add_argument("--channels", type=int, choices=[1, 3], default=M.channels, help="1 = grayscale, 3 = RGB")
    model.add_argument("--latent-dim", type=int, default=M.latent_dim, help="size of the latent vector")
    model.add_argument("--base-width", type=int, default=M.base_width, help="channels after the stem")
    model.add_argument("--squeeze-ratio", type=float, default=M.squeeze_ratio, help="Fire squeeze/expand ratio")
    model.add_argument("--pct-3x3", type=float, default=M.pct_3x3, help="share of 3x3 expand filters")
    model.add_argument("--defect-head", action="store_true",
                       help="also learn a defect map: a small Fire U-Net on (image, reconstruction) trained to find "
                            "synthetic corruptions (implies --defect-aware); gives the defect_* scores")
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
    p.add_argument("--placement-strategy", choices=PLACEMENT_STRATEGIES, default=D["placement_strategy"],
                   help="how workers are placed on nodes")
    p.add_argument("--keep-checkpoints", type=int, default=D["keep_checkpoints"],
                   help="best checkpoints kept by val_mse (the latest is always kept)")
    p.add_argument("--max-failures", type=int, default=D["max_failures"], help="worker failures to recover from")
    add_column_flags(p, D["id_column"], D["image_column"])
    p.add_argument("--resize", choices=RESIZE_POLICIES, default=D["resize"], help="how images reach the model size")
    p.add_argument("--loss", choices=TRAINING_LOSSES, default=D["loss"],
                   help="mse, or ssim_l1 (structure-aware: 0.85 (1 - SSIM) + 0.15 L1)")
    p.add_argument("--defect-aware", action="store_true",
                   help="learn to return the clean image from a copy with synthetic corruptions (texture blobs, "
                        "moved patches, strokes, shaded regions), so that defects light up the error map")
    p.add_argument("--corruptions", type=lambda text: tuple(k.strip() for k in text.split(",") if k.strip()),
                   default=D["corruptions"], metavar="KINDS",
                   help=f"with --defect-aware or --defect-head: the synthetic corruption kinds drawn, comma-separated "
                        f"(default all: {','.join(CORRUPTIONS)}); fewer to measure what the model finds of a kind it "
                        "never saw")
    p.add_argument("--corruption-share", type=float, default=D["corruption_share"],
                   help="with --defect-aware: share of each batch that is corrupted")
    p.add_argument("--invariance", type=float, default=D["invariance"], metavar="W",
                   help="weight of a contrastive term that maps each image and an edited view of it (a crop, "
                        "rescale, frame, box or noise) close together, so that near-duplicates share a latent "
                        "for the neighbours stage; 0 (the default) is off. Costs reconstruction quality: see "
                        "docs/BENCHMARKS.md#near-duplicates")
    p.add_argument("--patch-bank", type=int, default=D["patch_bank"], metavar="N",
                   help="remember N local features of the training images (a patch memory, PatchCore's idea on "
                        "this model's encoder) and give the patch_knn_* scores: each place's distance to its "
                        "nearest training patch. 0 (the default) is off; costs embedding time, see "
                        "docs/BENCHMARKS.md#real-surfaces")
    p.add_argument("--patch-sampler", choices=SAMPLERS, default=D["patch_sampler"],
                   help="how the N are chosen: coreset (greedy k-centre, keeps rare normal patches) or random")
    p.add_argument("--patch-features", choices=DESCRIPTIONS, default=D["patch_features"],
                   help="what describes a place in the patch memory: stages (the encoder's mid-level maps, a local "
                        "mean) or texture (how the first layer's responses vary over a window around the place: "
                        "each channel's mean and spread over a quarter and a half of the model's input side, and "
                        "how far its largest response in the smaller square stands above the mean)")
    p.add_argument("--fuse", type=lambda text: tuple(k.strip() for k in text.split(",") if k.strip()),
                   default=D["fuse"], metavar="SCORES",
                   help=f"the parts of the fused score (the score the model flags by): each as a robust z on its "
                        f"held-out spread, fused by their largest; comma-separated (default {','.join(D['fuse'])}). "
                        "A patch or defect score needs --patch-bank or --defect-head. On textured surfaces, "
                        "--patch-bank 4096 --patch-features texture --patch-sampler random with patch_knn_max added "
                        "ranked better on every real surface measured, but found fewer synthetic colour shifts: "
                        "see docs/BENCHMARKS.md#fusing-the-texture-memory")
    p.add_argument("--cache-mb", type=int, default=D["cache_mb"], metavar="MB",
                   help="per worker: when its decoded training and held-out rows fit in MB, they are kept after "
                        "the first epoch and later epochs shuffle them in memory instead of reading and decoding "
                        "the shards again (briefly twice MB while they are put in order); larger splits stream "
                        f"every epoch. 0: always stream (default {D['cache_mb']})")
    p.add_argument("--tiles-per-image", type=int, default=D["tiles_per_image"], metavar="K",
                   help="with --tile: random tiles of each image per training step (a step trains on "
                        "--batch-size x K tiles)")
    p.add_argument("--inject-crash", default=None, help=argparse.SUPPRESS)  # tests: marker file, crash once
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = arguments(build_parser(), argv)
    try:
        values = {name: args.pop(name) for name in MODEL_FIELDS}
        tile, stride = args.pop("tile"), args.pop("tile_stride")
        if tile:  # the model's input is the tile; the images' size is the working resolution
            values.update(image_size=tile, working_size=values["image_size"])
        model = AutoencoderConfig(**values, tile_stride=stride)
    except ValueError as e:
        raise InputError(str(e)) from e
    return TrainConfig(data_url=args.pop("data"), out_url=args.pop("out"), model=model, **args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("train", argv, parse_args, prepare=train.prepare, run=train.run)


if __name__ == "__main__":
    sys.exit(main())
