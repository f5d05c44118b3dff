"""Turn an image folder tree, Parquet in any supported layout, or WebDataset tar shards into image shards.

Local (embedded Ray):
    python -m jobs.ingest --source ~/photos --out demo-output/ingested --labels-from-folders

On a cluster (both URLs must be reachable from every node):
    ray job submit --working-dir . -- python -m jobs.ingest \\
        --source s3://bucket/img2dataset/ --out s3://bucket/shards/v1 --id-column key --image-column jpg

Without Ray (one process; the only way for memory:// URLs):
    python -m jobs.ingest --source memory://in --out memory://out --no-ray

Output: <out>/part-*.parquet (id, image, width, height, format, source, label when known),
<out>/_rejects/*.parquet (path, id, reason) and <out>/_ingest_summary.json. A rerun with
the same arguments replaces the shards (same names, same bytes) rather than adding to them.
Exit status: 0 done (rejects are listed, not fatal), 1 nothing could be ingested,
2 unusable input (missing columns, duplicate ids, no source).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.cli import arguments, csv, parser, run_job
from jobs.inputs import PASSTHROUGH_HELP, add_column_flags
from pipeline import ingest
from pipeline.ingest import SOURCE_FORMATS, IngestConfig

D = {f.name: f.default for f in fields(IngestConfig)}


def build_parser() -> argparse.ArgumentParser:
    p = parser("ingest", __doc__)
    p.add_argument("--source", required=True,
                   help="URL of an image folder tree, Parquet shards or WebDataset .tar shards")
    p.add_argument("--out", required=True, help="URL to write the normalised shards under")
    p.add_argument("--source-format", choices=SOURCE_FORMATS, default=D["source_format"],
                   help="auto: shards if the source holds *.parquet or *.tar files, else a folder tree")
    add_column_flags(p, D["id_column"], D["image_column"], "of shard input")
    p.add_argument("--passthrough", type=csv, default=D["passthrough"],
                   help=PASSTHROUGH_HELP + " (Parquet: label is copied when present)")
    p.add_argument("--labels-from-folders", action="store_true", help="folder input: label = first sub-folder name")
    p.add_argument("--normal-label", default=D["normal_label"],
                   help="folder input: this folder is label 0, the others 1 (folder name in anomaly_kind)")
    p.add_argument("--extensions", type=csv, default=D["extensions"],
                   help="folder input: comma-separated file extensions taken as images")
    p.add_argument("--rows-per-shard", type=int, default=D["rows_per_shard"], help="close a shard at this many rows")
    p.add_argument("--mib-per-shard", type=float, default=D["mib_per_shard"],
                   help="close a shard at this many MiB of image bytes (0: no limit)")
    p.add_argument("--max-pixels", type=int, default=D["max_pixels"], help="refuse images with more pixels")
    p.add_argument("--no-ray", dest="use_ray", action="store_false", help="run in this process, without Ray")
    return p


def parse_args(argv: Sequence[str] | None = None) -> IngestConfig:
    args = arguments(build_parser(), argv)
    args["mib_per_shard"] = args["mib_per_shard"] or None
    return IngestConfig(source_url=args.pop("source"), out_url=args.pop("out"), **args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("ingest", argv, parse_args, prepare=ingest.prepare, run=ingest.run,
                   needs_ray=lambda cfg: cfg.use_ray)


if __name__ == "__main__":
    sys.exit(main())
