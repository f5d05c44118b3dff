"""Ray Data readers for shards whose id is not a column Ray's Parquet reader can give.

Ray Data's exactly-once writes (`CheckpointConfig`) filter rows right after the read, by a
column of the read's own output: a map after the read is too late. So the readers here make
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

PARQUET_BATCH_ROWS = 1024  # rows per block: bounded memory for any shard size


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


class DerivedIdParquet(FileBasedDatasource):
    """Parquet shards -> blocks of their columns plus the derived id column, rows in file order."""

    _FILE_EXTENSIONS = ["parquet"]

    def __init__(self, paths: Sequence[str], *, root: str, columns: Columns, kind: str, extra: Sequence[str] = (),
                 **kwargs):
        super().__init__(list(paths), **kwargs)
        self._root = root
        self._columns = columns
        self._kind = kind  # "row" or "path"
        self._read = list(dict.fromkeys([columns.image, *(c for c in extra if c != columns.id)]))

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # Parquet needs random access, not a stream

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        name = posixpath.relpath(path, self._root) if path != self._root else posixpath.basename(path)
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=self._read):
            table = pa.Table.from_batches([batch])
            ids = derive_ids(table.column(self._columns.image), self._kind, name, row)
            row += table.num_rows
            yield table.append_column(self._columns.id, ids)
