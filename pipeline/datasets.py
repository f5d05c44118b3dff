"""Ray Data edge: read image shards and decode them into pixel batches.

Every stage that needs pixels (training, embedding, reports) reads shards through
`read_shards` and decodes with `decode_rows`, so column layouts, the resize policy and
per-row failure reasons behave the same everywhere. Decoding runs as Ray Data CPU tasks.

Every shard format reads into the same columns (id, image, extras): its reader
(pipeline.formats) gives the Ray Data source, with the id column made by the read itself (Ray's
write checkpoint filters by it right after the read). A row the reader knows has no image also
carries the reason (`tars.REASON_COLUMN`: a tar sample without an image member), which
`decode_rows` puts in the row's error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline import tars
from pipeline.formats.columns import Columns, id_strings, image_bytes
from pipeline.images import DEFAULT_RESIZE, decode_batch
from pipeline.sampling import BANK_SAMPLE_KEY, hash_sample, id_hashes, split_of

if TYPE_CHECKING:
    from pipeline.shards import ShardList

PATH_COLUMN = "path"  # the file a row came from, added by read_parquet(include_paths=True)


def read_parquet(paths: Sequence[str], filesystem, columns: Sequence[str] | None = None, *,
                 include_paths: bool = False, override_num_blocks: int | None = None, num_cpus: float = 1.0):
    """A lazy Ray Dataset of `columns` (None: all) of explicit Parquet files, one read task per file
    (or several files a task), rows in file order; `include_paths` adds PATH_COLUMN.

    Every stage reads Parquet through here, with our reader (`pipeline.formats.sources.ParquetColumns`)
    rather than Ray's `read_parquet`: its V2 reader starts a listing task and 32 footer-reading actors
    on every execution and packs small files into one read task (on this 2-core machine each training
    epoch waited about 2 s for its first batch and read at half speed), and its V1 reader waits in the
    driver for a remote task that samples files before the dataset exists (docs/BENCHMARKS.md, "Our
    own Parquet reader"). We always pass the file list, so neither buys anything; ours reads each
    footer in the task that reads the file.
    """
    import ray.data

    from pipeline.formats.sources import ParquetColumns

    source = ParquetColumns(paths, columns=columns, filesystem=filesystem, include_paths=include_paths)
    return ray.data.read_datasource(source, override_num_blocks=override_num_blocks, num_cpus=num_cpus)


def read_shards(shards: ShardList, columns: Columns, extra: Sequence[str] = (), override_num_blocks: int | None = None,
                num_cpus: float = 1.0):
    """A lazy Ray Dataset over the listed shards, with only the columns needed (any shard format)."""
    return shards.reader(columns).dataset(extra, override_num_blocks=override_num_blocks, num_cpus=num_cpus)


def decode_rows(batch: dict[str, np.ndarray], columns: Columns, image_size: int, channels: int,
                resize: str = DEFAULT_RESIZE, keep: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Shard rows -> {"id", "pixels" (N, S, S, C) uint8, "error" (reason or None), *keep}."""
    ids = id_strings(batch[columns.id])
    pixels, reasons = decode_batch(image_bytes(batch[columns.image]), image_size, channels, resize)
    for row, reason in enumerate(batch.get(tars.REASON_COLUMN, ())):
        if isinstance(reason, str):  # the reader knew why there is no image: say that, not "missing image"
            reasons[row] = reason
    out = {"id": ids, "pixels": pixels, "error": np.array(reasons, dtype=object)}
    for name in keep:
        out[name] = batch[name]
    return out


def decode_for_calibration(batch: dict[str, np.ndarray], columns: Columns, image_size: int, channels: int,
                           resize: str, val_fraction: float, bank_fraction: float) -> dict[str, np.ndarray]:
    """The rows a model's calibration needs, decoded: every held-out row, and a `bank_fraction`
    id-hash sample of the training rows (its neighbour bank). {"id", "pixels", "ok", "val"}."""
    ids = id_strings(batch[columns.id])
    val = split_of(ids, val_fraction)
    wanted = val | (~val & hash_sample(ids, bank_fraction, key=BANK_SAMPLE_KEY))
    images = [img for img, w in zip(image_bytes(batch[columns.image]), wanted) if w]
    pixels, reasons = decode_batch(images, image_size, channels, resize)
    return {"id": ids[wanted], "pixels": pixels, "ok": np.array([r is None for r in reasons], dtype=bool),
            "val": val[wanted]}


def decode_split(batch: dict[str, np.ndarray], columns: Columns, image_size: int, channels: int,
                 resize: str, val_fraction: float, validation: bool) -> dict[str, np.ndarray]:
    """Training input: only the rows of one split, decoded; {"pixels", "ok", "key"} so it converts
    to tensors ("key": a 64-bit hash of the id, an order for the rows that no layout changes).

    Rows of the other split are dropped before decoding, so each split pays only for itself.
    """
    ids = id_strings(batch[columns.id])
    mine = split_of(ids, val_fraction) == validation
    images = [img for img, m in zip(image_bytes(batch[columns.image]), mine) if m]
    pixels, reasons = decode_batch(images, image_size, channels, resize)
    keys = id_hashes([i for i, m in zip(ids, mine) if m], digest_size=8).view(np.int64)
    return {"pixels": pixels, "ok": np.array([r is None for r in reasons], dtype=bool), "key": keys}
