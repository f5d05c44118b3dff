"""The flags every job of a kind shares, worded once: what to read from image shards, and how
a model actor pool is sized.

Parquet shards name columns; WebDataset tar shards name a sample's fields (pipeline.tars);
a Parquet without an id column (a Hugging Face export) takes a derived id (pipeline.shards).
"""

from __future__ import annotations

import argparse

from pipeline.resources import CPU_BATCH_SIZE, GPU_BATCH_SIZE

ID_COLUMN_HELP = ("column holding unique ids; WebDataset .tar: __key__ (the sample key, implied) or json:<field>; "
                  "Parquet without one (a Hugging Face export): image.path (the image struct's path) or @row "
                  "(shard file + row number)")
IMAGE_COLUMN_HELP = ("column holding encoded image bytes (binary or the Hugging Face image struct); "
                     ".tar: 'image' takes the first of jpg, jpeg, png, webp, a member name takes that member")
PASSTHROUGH_HELP = ("comma-separated input columns copied to the output; .tar: a text member (txt, json) or "
                    "json:<field>, as string columns named as given")


def add_column_flags(p: argparse.ArgumentParser, id_default: str, image_default: str, where: str = "") -> None:
    """--id-column and --image-column; `where` says whose columns they are ("of the --data shards")."""
    suffix = f" {where}" if where else ""
    p.add_argument("--id-column", default=id_default, help=ID_COLUMN_HELP.replace(";", f"{suffix};", 1))
    p.add_argument("--image-column", default=image_default, help=IMAGE_COLUMN_HELP.replace(";", f"{suffix};", 1))


def add_actor_flags(p: argparse.ArgumentParser, rows_per_file: int, batch_of: str, file_of: str) -> None:
    """The model actor pool's flags (pipeline.resources.plan_actor_pool) of the inference jobs (embed,
    decode): --batch-size (`batch_of`: what one model call takes), --actors, --gpu/--cpu, --torch-threads,
    and --rows-per-file (`file_of`: what an output file holds)."""
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"{batch_of} per model call (default: {CPU_BATCH_SIZE} on CPUs, {GPU_BATCH_SIZE} on GPUs)")
    p.add_argument("--actors", type=int, default=None, help="model actors (default: from the cluster's resources)")
    p.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                   help="force GPU actors (default: GPUs when the cluster has them)")
    p.add_argument("--cpu", dest="gpu", action="store_false", help="force CPU actors even if GPUs exist")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: from CPUs)")
    p.add_argument("--rows-per-file", type=int, default=rows_per_file, help=f"target {file_of} per output file")
