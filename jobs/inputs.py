"""The flags that say what to read from image shards, worded once for every job that reads them.

Parquet shards name columns; WebDataset tar shards name a sample's fields (pipeline.tars);
a Parquet without an id column (a Hugging Face export) takes a derived id (pipeline.shards).
"""

from __future__ import annotations

import argparse

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
