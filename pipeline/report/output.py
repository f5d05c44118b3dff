"""The report folder: the names of its files, and writing them.

No file name comes from data: gallery images are named by gallery, rank and kind
(`gallery_file`), and only names of our own patterns are ever removed, so a rerun into
the same folder replaces a previous report without touching anything else there.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.hf_features import hf_image_column, with_hf_features

IMAGES_DIR = "images"
IMAGE_WRITE_THREADS = 8  # small PNGs: object stores are latency-bound, so write many at once
_OUR_IMAGE_NAME = re.compile(r"^((worst|typical)-\d{4,}-(original|reconstruction|error)|duplicates-\d{4,})\.png$")
_OPTIONAL_FILES = ("roc_pr.png", "interpolation.png")
_HISTOGRAM = re.compile(r"^histogram_[a-z_]+\.png$")


MARKER_FILE = "_report.json"


def histogram_file(score: str) -> str:
    """The histogram figure's name: one per report, named after the report's score."""
    return f"histogram_{score}.png"


def gallery_file(gallery: str, rank: int, kind: str) -> str:
    """images/<worst|typical>-<rank>-<original|reconstruction|error>.png"""
    return f"{IMAGES_DIR}/{gallery}-{rank:04d}-{kind}.png"


def duplicates_file(rank: int) -> str:
    """images/duplicates-<rank>.png: the thumbnail strip of the rank-th largest near-duplicate cluster."""
    return f"{IMAGES_DIR}/duplicates-{rank:04d}.png"


def json_clean(value: Any) -> Any:
    """NaN and infinities become null, NumPy scalars plain Python: summary.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def top_anomalies_parquet(top: list[dict], scores: tuple[str, ...], labelled: bool, has_kind: bool,
                          originals: dict[str, bytes | None] | None = None) -> bytes:
    """top_anomalies.parquet: rank, id, score, <every score>, [label], [anomaly_kind], shard, flagged, [image].

    With `originals` (the report had --data) `image` holds each row's original image as the
    Hugging Face Image feature, and the schema metadata is the one `datasets` writes, so
    `datasets.load_dataset("parquet", data_files=...)` gives PIL images (null where an id was
    not found in --data).
    """
    table = {"rank": pa.array([r["rank"] for r in top], pa.int32()),
             "id": pa.array([r["id"] for r in top], pa.string()),
             "score": pa.array([r["score"] for r in top], pa.float32()),
             **{name: pa.array([r[name] for r in top], pa.float32()) for name in scores}}
    if labelled:
        table["label"] = pa.array([r["label"] for r in top])
    if has_kind:
        table["anomaly_kind"] = pa.array([r["anomaly_kind"] for r in top], pa.string())
    table["shard"] = pa.array([r["shard"] for r in top], pa.string())
    table["flagged"] = pa.array([r["flagged"] for r in top], pa.bool_())
    result = pa.table(table)
    if originals is not None:
        result = result.append_column("image", hf_image_column([originals.get(r["id"]) for r in top]))
        result = result.replace_schema_metadata(with_hf_features(result.schema).metadata)
    buffer = pa.BufferOutputStream()
    pq.write_table(result, buffer)
    return buffer.getvalue().to_pybytes()


def _write_all(out_url: str, files: dict[str, bytes]) -> None:
    for name in files:  # names are ours (rank numbers, fixed words), never data: keep it that way
        assert not name.startswith("/") and ".." not in name.split("/"), name
    with ThreadPoolExecutor(IMAGE_WRITE_THREADS) as pool:
        list(pool.map(lambda item: storage.write_bytes(storage.join(out_url, item[0]), item[1]), files.items()))


def _remove_stale_files(out_url: str, keep: set[str]) -> None:
    """Remove what a previous report into `out_url` wrote and this one did not (gallery images of
    a larger K, a ROC figure or interpolation strip this run has no data for)."""
    fs, root = storage.filesystem(out_url)
    images = posixpath.join(root, IMAGES_DIR)
    fs.invalidate_cache(root)
    fs.invalidate_cache(images)
    candidates = [posixpath.join(root, name) for name in _OPTIONAL_FILES if name not in keep]
    if fs.isdir(root):  # a histogram of another score than this report's
        candidates += [entry for entry in fs.ls(root, detail=False)
                       if _HISTOGRAM.match(posixpath.basename(entry.rstrip("/")))
                       and posixpath.basename(entry.rstrip("/")) not in keep]
    if fs.isdir(images):
        candidates += [entry for entry in fs.ls(images, detail=False)
                       if _OUR_IMAGE_NAME.match(posixpath.basename(entry.rstrip("/")))
                       and f"{IMAGES_DIR}/{posixpath.basename(entry.rstrip('/'))}" not in keep]
    for path in candidates:
        if fs.exists(path):
            fs.rm(path)


def write_report(out_url: str, files: dict[str, bytes], summary: dict[str, Any], index_html: str) -> None:
    """Every file, each atomically; index.html last, so that a report a person can open is whole.

    `MARKER_FILE` comes first: it marks the folder as a report, so that a listing of a folder
    above it never reads top_anomalies.parquet as data.
    """
    storage.write_text(storage.join(out_url, MARKER_FILE), json.dumps({"format": summary["format"],
                                                                        "config": summary["config"]}) + "\n")
    _write_all(out_url, files)
    _remove_stale_files(out_url, set(files))
    storage.write_text(storage.join(out_url, "summary.json"), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    storage.write_text(storage.join(out_url, "index.html"), index_html)
