"""Embed and score image shards with a trained model: latents, reconstruction errors, anomaly flags.

Local (embedded Ray):
    python -m jobs.embed --data demo-output/shards --model demo-output/run/model --out demo-output/latents

On a cluster (GPUs are used when the cluster has them):
    ray job submit --working-dir . -- python -m jobs.embed \\
        --data s3://bucket/shards --model s3://bucket/runs/r1/model --out s3://bucket/latents/r1

Exactly once: rerunning the same command after an interruption processes only the rows
not yet written; a finished output folder is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields

from jobs.cli import HelpFormatter
from pipeline.checkpoint import CheckpointError
from pipeline.embed import (
    CPU_BATCH_SIZE, GPU_BATCH_SIZE, LATENT_DTYPES, EmbedConfig, EmbedInputError, embed,
)
from pipeline.images import RESIZE_POLICIES
from pipeline.shards import ColumnError, DuplicateIdError

D = {f.name: f.default for f in fields(EmbedConfig)}


def parse_args(argv: list[str] | None = None) -> EmbedConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="URL of the image shards")
    p.add_argument("--model", required=True, help="URL of an exported model (a train run's <out>/model)")
    p.add_argument("--out", required=True, help="URL of the latent dataset to write")
    p.add_argument("--latent-dtype", choices=LATENT_DTYPES, default=D["latent_dtype"],
                   help="storage type of the latent vectors (int8 adds a per-row scale)")
    p.add_argument("--threshold", default=D["threshold"],
                   help="anomaly threshold on per-image MSE: quantile:Q of the model's calibration, or value:X")
    p.add_argument("--passthrough", default="", help="comma-separated input columns copied to the output")
    p.add_argument("--id-column", default=D["id_column"], help="column holding unique ids")
    p.add_argument("--image-column", default=D["image_column"], help="column holding encoded image bytes")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default=None,
                   help="resize policy (default: the one the model was trained with)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per model call (default: {CPU_BATCH_SIZE} on CPUs, {GPU_BATCH_SIZE} on GPUs)")
    p.add_argument("--actors", type=int, default=None, help="model actors (default: from the cluster's resources)")
    p.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="force GPU actors")
    p.add_argument("--cpu", dest="gpu", action="store_false", help="force CPU actors even if GPUs exist")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: from CPUs)")
    p.add_argument("--rows-per-file", type=int, default=D["rows_per_file"], help="target rows per output file")
    args = vars(p.parse_args(argv))
    args["passthrough"] = tuple(c for c in args["passthrough"].split(",") if c)
    return EmbedConfig(**args)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    import ray

    print("embed config:", json.dumps(asdict(cfg)), flush=True)
    ray.init()
    try:
        summary = embed(cfg)
    except (EmbedInputError, ColumnError, DuplicateIdError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict()), flush=True)
    if summary.rows_out != summary.rows_in:
        print(f"error: {summary.rows_in} rows in but {summary.rows_out} rows out", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
