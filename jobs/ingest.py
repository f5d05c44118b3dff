"""Turn an image folder tree, or Parquet in any supported layout, into normalised image shards.

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
import json
import sys
from dataclasses import fields

from jobs.cli import HelpFormatter
from pipeline.ingest import SOURCE_FORMATS, IngestConfig, ingest
from pipeline.shards import ColumnError, DuplicateIdError

D = {f.name: f.default for f in fields(IngestConfig)}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_args(argv: list[str] | None = None) -> IngestConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--source", required=True, help="URL of an image folder tree or of Parquet shards")
    p.add_argument("--out", required=True, help="URL to write the normalised shards under")
    p.add_argument("--source-format", choices=SOURCE_FORMATS, default=D["source_format"],
                   help="auto: Parquet if the source holds *.parquet files, else a folder tree")
    p.add_argument("--id-column", default=D["id_column"], help="Parquet input: column holding unique ids")
    p.add_argument("--image-column", default=D["image_column"], help="Parquet input: column holding image bytes")
    p.add_argument("--passthrough", type=_csv, default=D["passthrough"],
                   help="Parquet input: comma-separated columns to copy (label is copied when present)")
    p.add_argument("--labels-from-folders", action="store_true", help="folder input: label = first sub-folder name")
    p.add_argument("--normal-label", default=D["normal_label"],
                   help="folder input: this folder is label 0, the others 1 (folder name in anomaly_kind)")
    p.add_argument("--extensions", type=_csv, default=D["extensions"],
                   help="folder input: comma-separated file extensions taken as images")
    p.add_argument("--rows-per-shard", type=int, default=D["rows_per_shard"], help="close a shard at this many rows")
    p.add_argument("--mib-per-shard", type=float, default=D["mib_per_shard"],
                   help="close a shard at this many MiB of image bytes (0: no limit)")
    p.add_argument("--max-pixels", type=int, default=D["max_pixels"], help="refuse images with more pixels")
    p.add_argument("--no-ray", dest="use_ray", action="store_false", help="run in this process, without Ray")
    args = vars(p.parse_args(argv))
    args["mib_per_shard"] = args["mib_per_shard"] or None
    return IngestConfig(**args)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("ingest config:", json.dumps(cfg.to_dict()), flush=True)
    if cfg.use_ray:
        import ray

        if not ray.is_initialized():  # a test or notebook may already have started one
            ray.init()
    try:
        summary = ingest(**cfg.to_dict())
    except (ColumnError, DuplicateIdError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}), flush=True)
    if summary["rows"] == 0:
        print(f"error: no image could be ingested from {cfg.source} ({summary['rejected']} rejected, "
              f"skipped by extension: {summary['skipped_by_extension']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
