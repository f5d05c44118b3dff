"""Nearest neighbours and near-duplicates of a latent dataset: an index, every row's k nearest, duplicate clusters.

Local (embedded Ray):
    python -m jobs.neighbours --latents demo-output/latents --out demo-output/neighbours \\
        --model demo-output/run/model --data demo-output/shards

On a cluster:
    ray job submit --working-dir . -- python -m jobs.neighbours \\
        --latents s3://bucket/latents/r1 --out s3://bucket/neighbours/r1 \\
        --model s3://bucket/runs/r1/model --data s3://bucket/shards

The duplicate threshold is calibrated with --model and --data (copies of sampled images, each
cropped, rescaled, JPEG re-encoded, framed or watermarked, against the nearest other image;
_neighbours.json gives the recall on each kind of edit), or given with
--duplicate-threshold value:X. Output: index.faiss + index.json, part-*.parquet (id,
neighbour_ids, distances, error), duplicates/pairs.parquet and duplicates/clusters.parquet,
_neighbours.json, and _SUCCESS.json last. Exactly once: rerunning the same command after an
interruption reuses the index and searches only the rows not yet written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from jobs.cli import arguments, parser, run_job
from pipeline.neighbours import job
from pipeline.neighbours.edits import EDIT_KINDS
from pipeline.neighbours.index import INDEX_KINDS
from pipeline.neighbours.job import SEARCH_BATCH_SIZE, NeighboursConfig

D = {f.name: f.default for f in fields(NeighboursConfig)}


def _range(kind):
    def parse(text: str) -> tuple:
        low, _, high = text.partition(",")
        try:
            return kind(low), kind(high)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None

    return parse


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    p = parser("neighbours", __doc__)
    p.add_argument("--latents", dest="latents_url", required=True,
                   help="URL of a finished latent dataset (the embed job's --out)")
    p.add_argument("--out", dest="out_url", required=True, help="URL of the folder to write (not inside --latents)")
    p.add_argument("--k", type=int, default=D["k"], help="neighbours written per row")
    p.add_argument("--model", dest="model_url", default=None,
                   help="the model that made the latents (calibrates the duplicate threshold, with --data)")
    p.add_argument("--data", dest="data_url", default=None,
                   help="image shards to calibrate the duplicate threshold on (e.g. the model's training data)")
    p.add_argument("--duplicate-threshold", default=D["duplicate_threshold"],
                   help="'calibrate' (needs --model and --data) or value:X, a Euclidean distance between latents")
    p.add_argument("--calibration-images", type=int, default=D["calibration_images"],
                   help="images sampled (by id hash) from --data, each with one edited copy")
    p.add_argument("--max-false-positive-rate", type=float, default=D["max_false_positive_rate"],
                   help="the calibrated threshold admits at most this share of distinct-image pairs")
    p.add_argument("--positive-quantile", type=float, default=D["positive_quantile"],
                   help="the threshold is never above this quantile of the copies' distances")
    p.add_argument("--calibration-edits", type=_names, default=D["calibration_edits"], metavar="KIND,...",
                   help=f"the edits calibration copies get, one per copy, from {', '.join(EDIT_KINDS)} "
                        f"(default: {','.join(D['calibration_edits'])}; flip is opt-in)")
    p.add_argument("--calibration-crop", type=_range(float), default=D["calibration_crop"], metavar="LOW,HIGH",
                   help="crop copies lose this share of width and of height")
    p.add_argument("--calibration-rescale", type=_range(float), default=D["calibration_rescale"], metavar="LOW,HIGH",
                   help="rescale copies are stored at this factor of the original size")
    p.add_argument("--calibration-quality", type=_range(int), default=D["calibration_quality"], metavar="LOW,HIGH",
                   help="jpeg copies are re-encoded at a quality in this range")
    p.add_argument("--calibration-border", type=_range(float), default=D["calibration_border"], metavar="LOW,HIGH",
                   help="border copies get a frame or letterbox bars, each this share of the side")
    p.add_argument("--calibration-overlay", type=_range(float), default=D["calibration_overlay"], metavar="LOW,HIGH",
                   help="overlay copies get a watermark box with text over this share of the area")
    p.add_argument("--seed", type=int, default=D["seed"], help="seed of the calibration sample and its copies")
    p.add_argument("--index", choices=INDEX_KINDS, default=D["index"],
                   help="index kind; auto: flat (exact) up to --flat-max-rows rows, IVF-PQ above")
    p.add_argument("--flat-max-rows", type=int, default=D["flat_max_rows"],
                   help="the largest latent dataset that --index auto searches exactly")
    p.add_argument("--target-recall", type=float, default=D["target_recall"],
                   help="IVF-PQ: nprobe is raised until recall@10 against exact search reaches this")
    p.add_argument("--allow-partial", action="store_true",
                   help="index a latent dataset whose embed job has not finished (no _SUCCESS.json)")
    # Not jobs.inputs' flags: the calibration reads Parquet shards by a real id column only (no tar, no derived ids).
    p.add_argument("--id-column", default=D["id_column"], help="id column of the --data shards (Parquet)")
    p.add_argument("--image-column", default=D["image_column"],
                   help="image column of the --data shards (binary or the Hugging Face image struct)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per index search (default: {SEARCH_BATCH_SIZE})")
    p.add_argument("--actors", type=int, default=None, help="search actors (default: from the cluster's resources)")
    p.add_argument("--threads", type=int, default=None, help="faiss threads per actor (default: from CPUs)")
    p.add_argument("--rows-per-file", type=int, default=D["rows_per_file"], help="target rows per output file")
    return p


def parse_args(argv: Sequence[str] | None = None) -> NeighboursConfig:
    return NeighboursConfig(**arguments(build_parser(), argv))


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("neighbours", argv, parse_args, prepare=job.prepare, run=job.run)


if __name__ == "__main__":
    sys.exit(main())
