"""Image shards: the listing every stage starts from, the checks that run before any work, and writing.

Shards are one input format per prefix (pipeline.formats: Parquet with an id column or a derived
id, WebDataset tar, or a registered format of your own), found from the files' suffix. A stage
lists its input once (`ShardList.under`) and asks the format's reader for everything else
(`ShardList.reader(columns)`); the functions here are the checks every stage runs, each one
reader call:

- `check_columns` reads only the shards' schemas (footers, tar headers) and fails before any work
  with the columns it did find; `check_unique_ids` reads only the ids; `fingerprint` names a
  dataset from its footers or headers alone; `first_images` reads a few images for a preflight.
- `write_shard` and `remove_stale_shards` write this project's own Parquet shards.

The row-level helpers (`Columns`, `image_bytes`, `id_strings`, ...) live in
pipeline.formats.columns and are importable from here too.
"""
from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage, tars
from pipeline.errors import InputError
from pipeline.formats import base as formats
from pipeline.formats.base import ShardReader, reader_for
from pipeline.formats.columns import (  # noqa: F401 - the row-level names every stage imports from here
    IMG2DATASET,
    PATH_FIELD,
    ROW_ID,
    ColumnError,
    Columns,
    DuplicateIdError,
    id_strings,
    image_bytes,
    is_id_type,
    is_image_type,
)
from pipeline.formats.tar import TarReader

# Output shards are named <SHARD_PREFIX><number>.parquet; only such names are ever cleaned up.
SHARD_PREFIX = "part-"


# --- writing ------------------------------------------------------------------------------


def write_shard(url: str, table: pa.Table, image_column: str = "image", row_group_rows: int = 1024) -> int:
    """Write `table` as one Parquet shard at `url`, atomically; returns the bytes written.

    Encoded images do not compress further, so their column is stored uncompressed and
    without dictionary encoding (both only cost CPU); other columns get zstd. Row groups
    of `row_group_rows` keep a reader's memory per batch small.
    """
    other = [name for name in table.column_names if name != image_column]
    compression = {name: "zstd" for name in other}
    if image_column in table.column_names:
        compression[image_column] = "none"
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression=compression, use_dictionary=other, row_group_size=row_group_rows)
    data = buffer.getvalue().to_pybytes()
    storage.write_bytes(url, data)
    return len(data)


def remove_stale_shards(out_url: str, keep: Sequence[str], prefix: str = SHARD_PREFIX) -> list[str]:
    """Remove `<prefix>*.parquet` files directly under `out_url` whose names are not in `keep`.

    A writer with stable shard names calls this after a run: a rerun with a different
    sizing writes fewer (or other) names, and the previous run's extra shards would otherwise
    be read as data. Only names of our own pattern are touched: anything else stays.
    Returns the names removed, sorted.
    """
    fs, root = storage.filesystem(out_url)
    fs.invalidate_cache(root)  # object-store listings are cached, and other processes wrote here
    if not fs.isdir(root):
        return []
    keep_names = set(keep)
    removed = []
    for entry in fs.ls(root, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith(prefix) and name.endswith(storage.PARQUET_SUFFIX) and name not in keep_names:
            fs.rm(entry)
            removed.append(name)
    return sorted(removed)


# --- the shard list and the checks before any work ---------------------------------------


@dataclass(frozen=True)
class ShardList:
    """The shards under one prefix, listed once and passed to every check.

    Listing an object-store prefix is a round trip per page; a job lists its input once and
    hands this on. What a reader reads about the shards (footers, tar headers) it keeps here
    (`cached`), so it is read once, on first use.
    """

    url: str
    files: tuple[str, ...]  # shard URLs, sorted
    format: str = "parquet"  # the files' kind ("parquet", "tar", ...): one kind per prefix
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __reduce__(self):
        return type(self), (self.url, self.files, self.format)  # a task gets the listing, not what was read

    @classmethod
    def under(cls, url: str) -> ShardList:
        """The shards under `url` (a prefix or one file); InputError when there are none, or a mix."""
        files, outputs = storage.list_files_detailed(url, formats.suffixes())
        if not files:
            skipped = f" (skipped {len(outputs)} folder(s) holding this project's outputs: {', '.join(outputs[:3])})" \
                if outputs else ""
            raise InputError(f"no {formats.descriptions()} found under {url}{skipped}")
        return cls.of(url, files)

    @classmethod
    def of(cls, url: str, files: Sequence[str]) -> ShardList:
        """The shards `files` (listed under `url`), their one kind found from their suffix."""
        by_kind: dict[str, list[str]] = {}
        for file in files:
            by_kind.setdefault(formats.kind_of_suffix(posixpath.splitext(file)[1]) or "parquet", []).append(file)
        if len(by_kind) > 1:
            found = "; ".join(f"{len(names)} {kind} ({posixpath.basename(names[0])}, ...)"
                              for kind, names in sorted(by_kind.items()))
            raise InputError(f"{url} mixes shard formats: {found}; keep one format (Parquet or WebDataset tar) "
                             "per prefix")
        return cls(url, tuple(files), next(iter(by_kind)))

    def reader(self, columns: Columns = Columns()) -> ShardReader:
        """The reader of these shards for these columns (pipeline.formats)."""
        return reader_for(self, columns)

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def names(self) -> list[str]:
        """Each shard's path relative to the prefix (its file name when the prefix is one file)."""
        root = storage.filesystem(self.url)[1]
        return [posixpath.relpath(path, root) if path != root else posixpath.basename(path) for path in self.paths]

    def tar_index(self, id_spec: str = tars.KEY_ID) -> list[tars.ShardIndex]:
        """Every tar shard's headers (rows, keys, ids by `id_spec`), read once."""
        return TarReader(self, Columns(id=id_spec)).index(id_spec)

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        return storage.arrow_filesystem(self.url)[0]

    @property
    def paths(self) -> list[str]:
        """The shards' paths inside `arrow_fs`."""
        return [storage.filesystem(shard)[1] for shard in self.files]

    @property
    def rows(self) -> int:
        """Rows in all shards, from the footers (tar: samples, from the headers)."""
        return self.reader().rows


def implied_id_column(shards: ShardList, id_column: str) -> str:
    """The id column a stage uses: the default "id" means the format's own id where it has one (tar: `__key__`)."""
    return formats.implied_id(shards.format, id_column)


def as_shards(shards: ShardList | str) -> ShardList:
    """A ShardList for a prefix URL; a ShardList as it is."""
    return shards if isinstance(shards, ShardList) else ShardList.under(shards)


def count_rows(shards: ShardList | str) -> int:
    """Rows in all shards under a prefix, from the footers only."""
    return as_shards(shards).rows


def check_columns(shards: ShardList | str, columns: Columns, passthrough: Sequence[str] = ()) -> pa.Schema:
    """Check from the footers (or headers) alone that every shard has the needed columns.

    Needed: `columns.id` (or what derives it), `columns.image` (binary or the Hugging Face image
    struct) and every `passthrough` column. Returns the schema shared by the shards, with a derived
    id as a string column. Raises ColumnError naming the shard and the columns it does have, and
    for a missing id the columns that could serve; InputError when there are no shards or one
    cannot be read.
    """
    return as_shards(shards).reader(columns).check(passthrough)


def _id_columns(id_column: str) -> Columns:
    """The columns a check that names only the id stands for: `<image>.path` names its image column too."""
    image, dot, leaf = id_column.rpartition(".")
    return Columns(id=id_column, image=image) if dot and image and leaf == PATH_FIELD else Columns(id=id_column)


def find_duplicate_ids(shards: ShardList | str, id_column: str, max_examples: int = 5) -> tuple[int, list[str]]:
    """(how many distinct ids occur more than once, up to `max_examples` of them).

    Reads only the ids, one shard at a time. What is held is the ids themselves as Arrow data
    (about the ids' byte length plus 4-8 bytes each, far less than a Python set) and, at the end,
    Arrow's hash table of distinct ids. Null ids count as one value "None". Examples come in the
    order they first appear.
    """
    return as_shards(shards).reader(_id_columns(id_column)).duplicate_ids(max_examples)


def check_unique_ids(shards: ShardList | str, id_column: str) -> None:
    """Raise DuplicateIdError, naming examples, if any id occurs more than once in the shards."""
    as_shards(shards).reader(_id_columns(id_column)).check_unique_ids()


def fingerprint(shards: ShardList | str) -> str:
    """A stable 16-hex-digit name for the dataset under a prefix, from its footers (or headers) alone.

    Hashes each shard's path relative to the prefix, byte size and row count, so the same
    shards copied to another prefix or bucket keep their fingerprint, and any rewrite that
    changes a shard's size or rows changes it.
    """
    return as_shards(shards).reader().fingerprint()


def first_images(shards: ShardList, image_column: str, limit: int) -> list[bytes | None]:
    """Up to `limit` encoded images from the start of the shards (preflight checks of the data)."""
    return shards.reader(Columns(id=implied_id_column(shards, Columns.id), image=image_column)).first_images(limit)
