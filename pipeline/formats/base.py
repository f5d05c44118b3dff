"""The one interface every input format implements, and the registry that names the formats.

A `ShardReader` reads one format of image shards under one prefix, for one choice of columns
(`Columns`: which id, which image). It checks the shards once (columns, ids, an unreadable
shard named up front, a fingerprint), gives the Ray Data source a stage reads, fetches rows by
id (the report's galleries), samples rows by id hash (calibrations), and gives ingest its rows
shard by shard. Stages ask the reader for all of it and never which format they hold.

`FORMATS` names every reader; `register_format` adds one (a test's throwaway format too).
`reader_for(shards, columns)` picks, among the readers of the listed files' kind (their
suffix: one kind per prefix), the first that `accepts` the columns: Parquet with an id column
and Parquet with a derived id share the kind "parquet".

What a reader may keep between calls (Parquet footers, tar headers) it keeps on the listing
(`shards.cached`), so every check of one job reads them once.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.formats.columns import PATH_FIELD, ROW_ID, Columns, DuplicateIdError, id_strings
from pipeline.sampling import sample_keys
from pipeline.tars import REASON_COLUMN  # noqa: F401 - what the readers and ingest call it

if TYPE_CHECKING:
    from pipeline.shards import ShardList

# Footers and headers are small reads dominated by latency on object stores: fetch many at once.
HEADER_THREADS = 16


class ShardReader(ABC):
    """One input format, read for one choice of columns. Subclasses set the class facts and the
    abstract methods; the rest follows from those."""

    name: ClassVar[str]  # the registry's key
    kind: ClassVar[str]  # the kind of file read ("parquet", "tar"): one kind per prefix, named in messages
    suffix: ClassVar[str]  # the files' suffix (".parquet")
    description: ClassVar[str]  # for "no ... found": "Parquet shards (*.parquet)"
    default_id: ClassVar[str | None] = None  # what the default id column "id" means here (tar: "__key__")

    def __init__(self, shards: ShardList, columns: Columns):
        self.shards = shards
        self.columns = columns

    @classmethod
    def accepts(cls, columns: Columns) -> bool:
        """Whether this reader reads its kind of shard with these columns (ids derived or not, ...)."""
        return True

    # --- checks, once per listing ----------------------------------------------------------

    @abstractmethod
    def sizes(self) -> list[tuple[int, int]]:
        """(bytes, rows) of each shard, read once; InputError naming a shard that cannot be read."""

    @abstractmethod
    def check(self, passthrough: Sequence[str] = ()) -> pa.Schema:
        """The rows' schema (id as it will be read, image, `passthrough`) after checking every shard
        has them; ColumnError naming the shard and what it does have."""

    @abstractmethod
    def all_ids(self) -> pa.ChunkedArray:
        """Every row's id, shard by shard (one or more chunks each), in file order."""

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.sizes())

    def fingerprint(self) -> str:
        """A stable 16-hex-digit name for the shards: each one's path relative to the prefix, byte size and
        rows, so a copy under another prefix keeps it and a rewrite changes it."""
        entries = [[name, size, rows] for name, (size, rows) in zip(self.shards.names, self.sizes())]
        return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode("utf-8")).hexdigest()[:16]

    def duplicate_ids(self, max_examples: int = 5) -> tuple[int, list[str]]:
        """(how many distinct ids occur more than once, up to `max_examples` of them, in order of first
        appearance). Null ids count as one value "None"."""
        ids = self.all_ids()
        if not len(ids):
            return 0, []
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        return len(repeated), [str(value) for value in repeated.field("values")[:max_examples].to_pylist()]

    def check_unique_ids(self) -> None:
        """DuplicateIdError, naming examples, when any id occurs more than once."""
        duplicated, examples = self.duplicate_ids()
        if duplicated:
            shown = ", ".join(repr(example) for example in examples)
            raise DuplicateIdError(
                f"{duplicated} ids occur more than once in column {self.columns.id!r} of {self.shards.url} "
                f"(e.g. {shown}); ids must be unique across the corpus"
                + (f" (use --id-column {ROW_ID}: shard file + row number)"
                   if self.columns.id.endswith(f".{PATH_FIELD}") else ""))

    # --- reading ---------------------------------------------------------------------------

    @abstractmethod
    def dataset(self, extra: Sequence[str] = (), override_num_blocks: int | None = None, num_cpus: float = 1.0):
        """A lazy Ray Dataset of {id, image, *extra} (and REASON_COLUMN where the reader knows why a row
        has no image). The id column is there straight after the read: Ray's write checkpoint filters by it."""

    @abstractmethod
    def fetch(self, ids: Sequence[str]) -> dict[str, bytes | None]:
        """{id: encoded image} of the rows with these ids (those found), without reading the rest."""

    def first_images(self, limit: int) -> list[bytes | None]:
        """Up to `limit` encoded images from the start of the shards (preflight checks of the data)."""
        first = id_strings(self.all_ids()[:limit]).tolist()
        found = self.fetch(first)
        return [found.get(row_id) for row_id in first]

    def sample(self, n: int, seed: int) -> list[tuple[str, bytes | None]]:
        """(id, image) of the seed's id-hash sample of `n` rows (the n smallest keyed hashes), in id order:
        the same rows on every run, whatever the file layout. Holds n candidates, then fetches them."""
        best: list[tuple[int, str]] = []
        for chunk in self.all_ids().chunks:
            ids = id_strings(chunk)
            best += zip(sample_keys(ids, seed).tolist(), ids)
            if len(best) > 4 * n:
                best = sorted(best)[:n]
        chosen = [row_id for _, row_id in sorted(best)[:n]]
        found = self.fetch(chosen)
        return sorted((row_id, found.get(row_id)) for row_id in chosen)

    @abstractmethod
    def ingest_batches(self, shard_url: str, shard_name: str, copied: Sequence[str],
                       batch_rows: int) -> Iterator[pa.Table]:
        """One shard's rows for ingest, in order, `batch_rows` at a time: "id" (string, null when a row has
        none), "image" (binary), REASON_COLUMN (why there is no image, else null), "where" (the row's place,
        for a reject), "source" (what the output's source column says), and the `copied` columns."""

    # --- helpers for subclasses ------------------------------------------------------------

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once per listing (and key): footers and headers are read once per job."""
        return self.shards.cached((self.kind, key), compute)

    def per_shard(self, read: Callable[[str], Any]) -> list:
        """`read(shard_url)` for every shard, many at a time, in order."""
        with ThreadPoolExecutor(min(HEADER_THREADS, len(self.shards.files))) as pool:
            return list(pool.map(read, self.shards.files))


FORMATS: dict[str, type[ShardReader]] = {}


def register_format(reader: type[ShardReader]) -> type[ShardReader]:
    """Name a reader in FORMATS (usable as a class decorator); a reader of the same name is replaced."""
    FORMATS[reader.name] = reader
    return reader


def kind_of_suffix(suffix: str) -> str | None:
    """The kind of shard files ending in `suffix`, None when no format reads them."""
    return next((reader.kind for reader in FORMATS.values() if reader.suffix == suffix), None)


def suffixes(kind: str | None = None) -> tuple[str, ...]:
    """The suffixes of the files a kind (or any format) reads."""
    return tuple(dict.fromkeys(r.suffix for r in FORMATS.values() if kind in (None, r.kind)))


def descriptions(kind: str | None = None) -> str:
    """"Parquet shards (*.parquet) or WebDataset shards (*.tar)": what "no shards found" names."""
    return " or ".join(dict.fromkeys(r.description for r in FORMATS.values() if kind in (None, r.kind)))


def kinds() -> tuple[str, ...]:
    return tuple(dict.fromkeys(reader.kind for reader in FORMATS.values()))


def implied_id(kind: str, id_column: str) -> str:
    """The id column a stage uses: the default "id" means the kind's own id where it has one (tar: the key)."""
    if id_column != Columns.id:
        return id_column
    return next((r.default_id for r in FORMATS.values() if r.kind == kind and r.default_id), id_column)


def reader_for(shards: ShardList, columns: Columns) -> ShardReader:
    """The reader of these shards for these columns: the first format of their kind that accepts them."""
    for reader in FORMATS.values():
        if reader.kind == shards.format and reader.accepts(columns):
            return reader(shards, columns)
    raise InputError(f"no input format reads {shards.format} shards with --id-column {columns.id} "
                     f"--image-column {columns.image}")
