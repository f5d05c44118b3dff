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
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.cli import arguments, parser, run_job
from pipeline import synth
from pipeline.synth import ANOMALY_KINDS, SynthConfig

D = {f.name: f.default for f in fields(SynthConfig)}


def build_parser() -> argparse.ArgumentParser:
    p = parser("synth", __doc__)
    p.add_argument("--out", required=True, help="URL to write the shards under (any fsspec URL)")
    p.add_argument("--n", type=int, default=D["n"], help="number of images")
    p.add_argument("--image-size", type=int, default=D["image_size"], help="side of the square images, pixels")
    p.add_argument("--anomaly-fraction", type=float, default=D["anomaly_fraction"],
                   help=f"share of images with a defect ({', '.join(ANOMALY_KINDS)})")
    p.add_argument("--seed", type=int, default=D["seed"], help="random seed; same seed, same bytes")
    p.add_argument("--rows-per-shard", type=int, default=D["rows_per_shard"], help="images per Parquet shard")
    p.add_argument("--channels", type=int, choices=(1, 3), default=D["channels"], help="1 = grayscale, 3 = RGB")
    return p


def parse_args(argv: Sequence[str] | None = None) -> SynthConfig:
    args = arguments(build_parser(), argv)
    return SynthConfig(out_url=args.pop("out"), **args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("synth", argv, parse_args, prepare=synth.prepare, run=synth.run, needs_ray=False)


if __name__ == "__main__":
    sys.exit(main())
