"""Decode stored latents back into images, written as image shards the pipeline can read again.

Local (embedded Ray):
    python -m jobs.decode --latents demo-output/latents --model demo-output/run/model \\
        --out demo-output/decoded --sample 64 --seed 0

On a cluster (GPUs are used when the cluster has them):
    ray job submit --working-dir . -- python -m jobs.decode \\
        --latents s3://bucket/latents/r1 --model s3://bucket/runs/r1/model --out s3://bucket/decoded/r1 \\
        --ids synth-00000001,synth-00000002 --format png

Output: <out>/part-*.parquet with id, image, width, height, format, source="decoded" (the
image-shard contract), and <out>/_decode.json with the config and summary. A rerun with
the same --out replaces that folder's shards. Rows whose latent is null (their image
failed to decode upstream) are skipped and counted in the summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.cli import arguments, csv, parser, run_job
from jobs.inputs import add_actor_flags
from pipeline import decode
from pipeline.decode import IMAGE_FORMATS, DecodeConfig

D = {f.name: f.default for f in fields(DecodeConfig)}


def build_parser() -> argparse.ArgumentParser:
    p = parser("decode", __doc__)
    p.add_argument("--latents", required=True, help="URL of a latent dataset (the embed job's --out)")
    p.add_argument("--model", required=True, help="URL of the model that made the latents")
    p.add_argument("--out", required=True, help="URL of the image shards to write (replaced on a rerun)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ids", type=csv, default=(),
                       help="comma-separated ids to decode (default: every row that has a latent)")
    which.add_argument("--sample", type=int, default=D["sample"],
                       help="decode N ids drawn deterministically from --seed among rows that have a latent "
                            "(default: off)")
    p.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default=D["image_format"],
                   help="encoding of the written images; png is lossless")
    p.add_argument("--quality", type=int, default=D["quality"], help="JPEG quality, 1-95")
    p.add_argument("--seed", type=int, default=D["seed"], help="seed of the --sample draw")
    add_actor_flags(p, D["rows_per_file"], batch_of="latents", file_of="images")
    p.add_argument("--allow-partial", action="store_true",
                   help="decode from a latent dataset whose embed job never finished")
    return p


def parse_args(argv: Sequence[str] | None = None) -> DecodeConfig:
    args = arguments(build_parser(), argv)
    return DecodeConfig(latents_url=args.pop("latents"), model_url=args.pop("model"), out_url=args.pop("out"),
                        **args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("decode", argv, parse_args, prepare=decode.prepare, run=decode.run)


if __name__ == "__main__":
    sys.exit(main())
