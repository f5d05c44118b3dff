"""The project's Ray Data readers: Parquet files, and shards whose id is not a column of the file.

- `ParquetColumns`: Parquet files -> blocks of the named columns, one task per file, rows in
  file order. Every stage reads Parquet through it (`pipeline.datasets.read_parquet`): Ray's own
  `read_parquet` samples files in a remote task before the dataset even exists, the driver
  waiting for it (V1; docs/BENCHMARKS.md, "Our own Parquet reader"), or lists them and reads
  footers in 32 actors on every execution (V2). Ours reads each footer in the
  read task that reads the file, and sizes its blocks from it.

Ray Data's exactly-once writes (`CheckpointConfig`) filter rows right after the read, by a
column of the read's own output: a map after the read is too late. So the other readers make
the id column as they read, one task per shard file, reading the file in order:

- `TarShards`: WebDataset tar shards, streamed with `tarfile` (pipeline.tars): id (`__key__` or
  `json:<field>`), image bytes, the reason a sample has no image, passthrough fields. Ray's own
  `read_webdataset` keeps keys byte-exact, but with `decoder=None` it can give only member
  columns (no `json:<field>` id), and its blocks are pandas frames whose columns come and go with
  the members each block happens to hold; ours have one Arrow schema.
- `DerivedIdParquet`: Parquet whose id is derived (`@row`, `<image>.path`; pipeline.formats.derived): the
  file is read batch by batch in order, so a row's number is its place in the file, whatever its
  row groups.

This module imports Ray at the top: only the readers' `dataset()` import it, inside the method.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from pipeline import tars
from pipeline.formats.columns import Columns
from pipeline.formats.derived import derive_ids

PARQUET_BATCH_ROWS = 1024  # rows per block at most: bounded memory for any shard size


class TarShards(FileBasedDatasource):
    """Tar shards -> blocks of {id, image, tars.REASON_COLUMN, *extra} (pipeline.tars.rows_table)."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: Sequence[str], *, columns: Columns, extra: Sequence[str] = (), **kwargs):
        super().__init__(list(paths), **kwargs)
        self._columns = columns
        self._extra = tuple(extra)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        for chunk in tars.chunked(tars.iter_samples(f, path)):
            yield tars.rows_table(chunk, self._columns.id, self._columns.image, self._extra)


class ParquetColumns(FileBasedDatasource):
    """Parquet files -> blocks of `columns` (None: every column), rows in file order.

    A block holds at most PARQUET_BATCH_ROWS rows, and fewer where the footer says the rows are
    large, so that a block stays within the DataContext's target block size when the dataset was
    made (each stage sets its own before it reads: the embed job's is small, to commit often).
    A file with no rows gives one empty block, so the dataset still knows its columns.
    """

    _FILE_EXTENSIONS = ["parquet"]

    def __init__(self, paths: Sequence[str], *, columns: Sequence[str] | None = None, **kwargs):
        super().__init__(list(paths), **kwargs)
        self._read = list(dict.fromkeys(columns)) if columns is not None else None
        self._block_bytes = self._data_context.target_max_block_size  # None: no limit

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access, not a stream

    def _batch_rows(self, meta: pq.FileMetaData) -> int:
        """Rows per block: PARQUET_BATCH_ROWS, or fewer where the footer's sizes of the columns read
        say a block of that many would pass the target block size."""
        if not self._block_bytes or not meta.num_rows:
            return PARQUET_BATCH_ROWS
        wanted = set(self._read) if self._read is not None else None
        size = sum(group.column(i).total_uncompressed_size
                   for group in (meta.row_group(g) for g in range(meta.num_row_groups))
                   for i in range(group.num_columns)
                   if wanted is None or group.column(i).path_in_schema.split(".")[0] in wanted)
        return max(1, min(PARQUET_BATCH_ROWS, int(self._block_bytes * meta.num_rows // max(size, 1))))

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        parquet = pq.ParquetFile(f)
        empty = True
        for batch in parquet.iter_batches(batch_size=self._batch_rows(parquet.metadata), columns=self._read):
            empty = False
            yield pa.Table.from_batches([batch])
        if empty:
            schema = parquet.schema_arrow
            yield schema.empty_table() if self._read is None else schema.empty_table().select(self._read)


class DerivedIdParquet(ParquetColumns):
    """Parquet shards -> blocks of their columns plus the derived id column, rows in file order."""

    def __init__(self, paths: Sequence[str], *, root: str, columns: Columns, kind: str, extra: Sequence[str] = (),
                 **kwargs):
        super().__init__(paths, columns=[columns.image, *(c for c in extra if c != columns.id)], **kwargs)
        self._root = root
        self._columns = columns
        self._kind = kind  # "row" or "path"

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        name = posixpath.relpath(path, self._root) if path != self._root else posixpath.basename(path)
        row = 0
        for table in super()._read_stream(f, path):
            ids = derive_ids(table.column(self._columns.image), self._kind, name, row)
            row += table.num_rows
            yield table.append_column(self._columns.id, ids)
