"""The neighbours output folder: its files, and how later stages (the report) read them.

The neighbours stage (pipeline/neighbours/) writes, under one folder (any fsspec URL):
    index.faiss                 the faiss index over every row that has a latent
    index_ids.parquet           `id`: row i of the index is the latent row with this id
    index.json                  the index's settings (kind, nlist, m, nbits, nprobe, metric,
                                dim, rows, bytes, measured recall@10, the latents' URL and
                                model); written after the two files above, so the index is
                                complete when it exists
    part-*.parquet              one row per latent row: id, neighbour_ids list<string>,
                                distances list<float32> (nearest first, the row itself left
                                out), error (null, or why the row has no neighbours)
    duplicates/pairs.parquet    id_a < id_b, distance: every neighbour pair at or under the
                                duplicate threshold
    duplicates/clusters.parquet cluster (1 = the largest), id, keeper, size, mse: the
                                connected components of the pairs, one suggested keeper each
    _neighbours.json            the config, the threshold and its calibration, the summary
    _SUCCESS.json               written last, when every row is there
Names starting with "_" are never read as data; the neighbour rows are the top-level
`part-*.parquet` files only. Distances are Euclidean (L2) between dequantized float32 latents.

This module is core: the stage writes these files and the report reads them, and neither
imports the other.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError

INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index_ids.parquet"
INDEX_SETTINGS_FILE = "index.json"
PART_PREFIX = "part-"
DUPLICATES_DIR = "duplicates"
PAIRS_FILE = f"{DUPLICATES_DIR}/pairs.parquet"
CLUSTERS_FILE = f"{DUPLICATES_DIR}/clusters.parquet"
RUN_FILE = "_neighbours.json"
SUCCESS_FILE = "_SUCCESS.json"
CHECKPOINT_DIR = "_checkpoint"

NEIGHBOUR_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("neighbour_ids", pa.list_(pa.string())),
    ("distances", pa.list_(pa.float32())),
    ("error", pa.string()),
])
PAIRS_SCHEMA = pa.schema([("id_a", pa.string()), ("id_b", pa.string()), ("distance", pa.float32())])
CLUSTERS_SCHEMA = pa.schema([("cluster", pa.int32()), ("id", pa.string()), ("keeper", pa.bool_()),
                             ("size", pa.int32()), ("mse", pa.float32())])


def neighbour_files(url: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, paths inside it) of the neighbour rows: top-level part-*.parquet only."""
    fs, paths = storage.arrow_files(url)
    _, root = storage.filesystem(url)
    return fs, [p for p in paths if posixpath.dirname(p) == root.rstrip("/")
                and posixpath.basename(p).startswith(PART_PREFIX)]


def table_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (small outputs written in one atomic put)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def read_table(url: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    fs, path = storage.arrow_filesystem(url)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filter)


def read_run(url: str, allow_partial: bool = False) -> dict[str, Any]:
    """`_neighbours.json` of a finished neighbours output; InputError when it is not one, or unfinished."""
    run_url = storage.join(url, RUN_FILE)
    if not storage.exists(run_url):
        raise InputError(f"{url} is not a neighbours output: no {RUN_FILE} there (make one with jobs.neighbours)")
    if not allow_partial and not storage.exists(storage.join(url, SUCCESS_FILE)):
        raise InputError(f"the neighbours output {url} is not finished (no {SUCCESS_FILE}): rerun the neighbours "
                         "job with the same arguments to complete it")
    try:
        record = json.loads(storage.read_text(run_url))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{run_url} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise InputError(f"{run_url} is not a JSON object")
    return record


def read_largest_clusters(url: str, largest: int) -> list[dict[str, Any]]:
    """The `largest` clusters of a finished output, largest first: {cluster, size, keeper, members}.

    Members are {id, keeper, mse}, the keeper first, then by id. Only those clusters' rows are
    read (clusters are numbered by size, so they are the lowest numbers).
    """
    table = read_table(storage.join(url, CLUSTERS_FILE), filter=pc.field("cluster") <= largest)
    clusters: dict[int, list[dict]] = {}
    for row in table.to_pylist():
        clusters.setdefault(row["cluster"], []).append(row)
    out = []
    for number in sorted(clusters):
        members = sorted(clusters[number], key=lambda r: (not r["keeper"], r["id"]))
        out.append({"cluster": number, "size": members[0]["size"], "keeper": members[0]["id"],
                    "members": [{"id": m["id"], "keeper": m["keeper"], "mse": m["mse"]} for m in members]})
    return out
