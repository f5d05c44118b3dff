"""Write a deterministic synthetic image corpus with labelled anomalies as Parquet image shards.

Local:
    python -m jobs.synth --out demo-output/shards --n 2000 --image-size 64 --anomaly-fraction 0.05

On a cluster (runs on the head node as the job's driver; the output must be shared storage):
    ray job submit --working-dir . -- python -m jobs.synth \\
        --out s3://bucket/synth/v1 --n 100000 --image-size 64 --seed 0

The same arguments give byte-identical shards. Generating needs no Ray, so this job does
not start one. Columns: id, image (PNG), label (1 = anomaly), anomaly_kind ("" if normal).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields

from jobs.cli import HelpFormatter
from pipeline.synth import SynthConfig, write_synthetic_corpus

D = {f.name: f.default for f in fields(SynthConfig)}


def parse_args(argv: list[str] | None = None) -> SynthConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.synth", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="URL to write the shards under (any fsspec URL)")
    p.add_argument("--n", type=int, default=D["n"], help="number of images")
    p.add_argument("--image-size", type=int, default=D["image_size"], help="side of the square images, pixels")
    p.add_argument("--anomaly-fraction", type=float, default=D["anomaly_fraction"],
                   help="share of images with a defect (scratch, blot, noise, colour_shift, foreign_object)")
    p.add_argument("--seed", type=int, default=D["seed"], help="random seed; same seed, same bytes")
    p.add_argument("--rows-per-shard", type=int, default=D["rows_per_shard"], help="images per Parquet shard")
    p.add_argument("--channels", type=int, choices=(1, 3), default=D["channels"], help="1 = grayscale, 3 = RGB")
    return SynthConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    print("synth config:", json.dumps(asdict(cfg)), flush=True)
    try:
        summary = write_synthetic_corpus(
            cfg.out, cfg.n, image_size=cfg.image_size, anomaly_fraction=cfg.anomaly_fraction,
            seed=cfg.seed, rows_per_shard=cfg.rows_per_shard, channels=cfg.channels,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
