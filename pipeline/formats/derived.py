"""Parquet without an id column (a Hugging Face export): the id is derived from the data as it is read.

`--id-column image.path` takes the image struct's `path` field (`<image column>.path`), and
`--id-column @row` the shard file's name relative to the prefix and the row's number in that
file, `train-00000-of-00002.parquet:17`. Both come from the data, never from run order, so every
stage and every rerun gives the same ids. The Ray Data source makes the id column as it reads
(pipeline.formats.sources.DerivedIdParquet): Ray's write checkpoint filters by it right after
the read.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.formats.base import register_format
from pipeline.formats.columns import PATH_FIELD, ROW_ID, ColumnError, Columns, DuplicateIdError, image_bytes
from pipeline.formats.parquet import ParquetShards, has_path


def derive_ids(image_column: pa.Array | pa.ChunkedArray, kind: str, shard_name: str, first_row: int) -> pa.Array:
    """The derived ids of a batch: "<shard_name>:<row>" from `first_row` on, or the image struct's path."""
    if kind == "row":
        return pa.array([f"{shard_name}:{first_row + i}" for i in range(len(image_column))], pa.string())
    paths = pc.struct_field(image_column, PATH_FIELD)
    return paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths


@register_format
class ParquetDerivedId(ParquetShards):
    """`@row` ids (unique by construction) or `<image>.path` ids (checked: never null, unique)."""

    name = "parquet-derived-id"

    @classmethod
    def accepts(cls, columns: Columns) -> bool:
        return columns.id in (ROW_ID, f"{columns.image}.{PATH_FIELD}")

    @property
    def derived(self) -> str:
        """"row" for `@row`, "path" for `<image column>.path`."""
        return "row" if self.columns.id == ROW_ID else "path"

    def _needed_id(self) -> dict[str, str]:
        return {}

    def _check_id(self, shard_url: str, schema: pa.Schema) -> None:
        image_type = schema.field(self.columns.image).type
        if self.derived == "path" and not has_path(image_type):
            raise ColumnError(f"shard {shard_url}: --id-column {self.columns.id} needs the image column "
                              f"{self.columns.image!r} to be the struct<bytes, path> of a Hugging Face Image feature; "
                              f"it is {image_type}. Use --id-column {ROW_ID} (shard file + row number)")

    def _with_id(self, schema: pa.Schema) -> pa.Schema:
        return schema.append(pa.field(self.columns.id, pa.string()))

    def _id_read(self) -> list[str]:
        return []

    def _batch_ids(self, batch: pa.RecordBatch, shard_name: str, first_row: int) -> pa.Array:
        return derive_ids(batch.column(self.columns.image), self.derived, shard_name, first_row)

    def all_ids(self) -> pa.ChunkedArray:
        if self.derived == "path":
            return self.id_column_data(self.columns.id)
        return pa.chunked_array([pa.array([f"{name}:{row}" for row in range(footer.num_rows)], pa.string())
                                 for name, (_, footer) in zip(self.shards.names, self.footers)], pa.string())

    def duplicate_ids(self, max_examples: int = 5) -> tuple[int, list[str]]:
        if self.derived == "row":
            return 0, []  # unique by construction: (shard file, row number)
        return super().duplicate_ids(max_examples)

    def check_unique_ids(self) -> None:
        if self.derived == "path":
            nulls = self.all_ids().null_count
            if nulls:
                raise DuplicateIdError(f"--id-column {self.columns.id}: {nulls} rows of {self.shards.url} have a null "
                                       f"image path, so they have no id; use --id-column {ROW_ID} (shard file + row "
                                       "number)")
        super().check_unique_ids()

    def dataset(self, extra: Sequence[str] = (), override_num_blocks: int | None = None, num_cpus: float = 1.0):
        import ray.data

        from pipeline.formats.sources import DerivedIdParquet

        source = DerivedIdParquet(self.shards.paths, root=storage.filesystem(self.shards.url)[1],
                                  filesystem=self.shards.arrow_fs, columns=self.columns, kind=self.derived, extra=extra)
        ds = ray.data.read_datasource(source, override_num_blocks=override_num_blocks or len(self.shards.files),
                                      num_cpus=num_cpus)
        return ds.select_columns(list(dict.fromkeys([self.columns.id, self.columns.image, *extra])))

    def fetch(self, ids: Sequence[str]) -> dict[str, bytes | None]:
        """`<image>.path`: a filtered read on the struct's field; `@row`: only the row groups holding the rows."""
        if self.derived == "row":
            return self._fetch_rows(ids)
        image = self.columns.image
        dataset = pads.dataset(self.shards.paths, filesystem=self.shards.arrow_fs, format="parquet")
        table = dataset.to_table(columns=[image],
                                 filter=pc.field(image, PATH_FIELD).isin(pa.array(list(ids), pa.string())))
        paths = pc.struct_field(table.column(image), PATH_FIELD).to_pylist()
        return dict(zip(paths, image_bytes(table.column(image))))

    def _fetch_rows(self, ids: Sequence[str]) -> dict[str, bytes | None]:
        by_shard: dict[str, dict[int, str]] = {}
        for row_id in ids:
            name, _, row = row_id.rpartition(":")
            if row.isdigit():
                by_shard.setdefault(name, {})[int(row)] = row_id
        found: dict[str, bytes | None] = {}
        for name, path, (_, footer) in zip(self.shards.names, self.shards.paths, self.footers):
            rows = by_shard.get(name)
            if not rows:
                continue
            with self.shards.arrow_fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                start = 0
                for group in range(footer.num_row_groups):
                    size = footer.row_group(group).num_rows
                    mine = sorted(r for r in rows if start <= r < start + size)
                    if mine:
                        column = parquet.read_row_group(group, columns=[self.columns.image]).column(0)
                        taken = image_bytes(column.take(pa.array([r - start for r in mine], pa.int64())))
                        found.update({rows[r]: data for r, data in zip(mine, taken)})
                    start += size
        return found
