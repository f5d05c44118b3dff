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
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.cli import arguments, csv, parser, run_job
from jobs.inputs import PASSTHROUGH_HELP, add_actor_flags, add_column_flags
from pipeline import embed
from pipeline.embed import EmbedConfig
from pipeline.images import RESIZE_POLICIES
from pipeline.inference import PRECISIONS
from pipeline.latents import LATENT_DTYPES
from pipeline.scores import ALL, SCORE_COLUMNS

D = {f.name: f.default for f in fields(EmbedConfig)}


def build_parser() -> argparse.ArgumentParser:
    p = parser("embed", __doc__)
    p.add_argument("--data", required=True, help="URL of the image shards")
    p.add_argument("--model", required=True, help="URL of an exported model (a train run's <out>/model)")
    p.add_argument("--out", required=True, help="URL of the latent dataset to write")
    p.add_argument("--latent-dtype", choices=LATENT_DTYPES, default=D["latent_dtype"],
                   help="storage type of the latent vectors (int8 adds a per-row scale)")
    p.add_argument("--threshold", default=D["threshold"],
                   help="anomaly threshold on the score: quantile:Q of its calibration (the normal bulk of the "
                        "held-out scores), or value:X")
    p.add_argument("--score", default=None, choices=SCORE_COLUMNS, metavar="SCORE",
                   help="the score that sets is_anomaly: " + ", ".join(SCORE_COLUMNS) + " (default: the model's, "
                        "from its calibration: fused for models trained with this version, mse before)")
    p.add_argument("--scores", default=None, metavar="SCORES",
                   help=f"the score columns to compute: {ALL}, or a comma-separated list of "
                        + ", ".join(SCORE_COLUMNS) + " (a score's inputs come with it: fused brings its parts; "
                        "default: the --score and what it reads, plus mse; the SSIM and GMS maps are most of the "
                        "cost, and are made only when a chosen score reads them)")
    p.add_argument("--precision", choices=PRECISIONS, default=D["precision"],
                   help="the forward pass's: bfloat16 runs the convolutions in bfloat16 (scores and latents stay "
                        "float32); auto takes it where the CPU or GPU computes bfloat16 natively, float32 elsewhere")
    p.add_argument("--passthrough", type=csv, default=(), help=PASSTHROUGH_HELP)
    add_column_flags(p, D["id_column"], D["image_column"])
    p.add_argument("--resize", choices=RESIZE_POLICIES, default=None,
                   help="resize policy (default: the one the model was trained with)")
    add_actor_flags(p, D["rows_per_file"], batch_of="images", file_of="rows")
    return p


def parse_args(argv: Sequence[str] | None = None) -> EmbedConfig:
    args = arguments(build_parser(), argv)
    return EmbedConfig(data_url=args.pop("data"), model_url=args.pop("model"), out_url=args.pop("out"), **args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("embed", argv, parse_args, prepare=embed.prepare, run=embed.run)


if __name__ == "__main__":
    sys.exit(main())
