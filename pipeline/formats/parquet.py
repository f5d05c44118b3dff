"""Parquet image shards with an id column (README, "Data contracts"): the format every stage writes.

`ParquetShards` holds what both Parquet readers share (footers read once, many at a time; the
column check; the first images; ingest's batches); `ParquetIdColumn` is the reader for a real
id column: ids are checked for type and uniqueness from that column alone, and a missing id
column names the columns that could serve. Derived ids (`@row`, `<image>.path`) are
pipeline.formats.derived.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.formats.base import REASON_COLUMN, ShardReader, register_format
from pipeline.formats.columns import (
    PATH_FIELD,
    ROW_ID,
    ColumnError,
    Columns,
    id_strings,
    image_bytes,
    is_id_type,
    is_image_type,
)
from pipeline.sampling import sample_keys

# Uniqueness of candidate id columns is checked only when there are at most this many (each
# check reads that column of every shard).
_CANDIDATES_CHECKED = 3


class ParquetShards(ShardReader):
    """What both Parquet readers share; a subclass says how a row gets its id."""

    kind = "parquet"
    suffix = storage.PARQUET_SUFFIX
    description = "Parquet shards (*.parquet)"

    @property
    def footers(self) -> list[tuple[int, pq.FileMetaData]]:
        """(size in bytes, Parquet footer) of each shard; InputError naming a shard that is not Parquet."""
        return self.cached("footers", lambda: self.per_shard(_read_footer))

    def sizes(self) -> list[tuple[int, int]]:
        return [(size, footer.num_rows) for size, footer in self.footers]

    # --- the column check: one loop, the id's part said by the subclass --------------------

    def _needed_id(self) -> dict[str, str]:
        return {self.columns.id: "id column"}

    def _missing_hint(self, schema: pa.Schema) -> str:
        return "Name the columns with --id-column / --image-column (img2dataset: --id-column key --image-column jpg)."

    def _check_id(self, shard_url: str, schema: pa.Schema) -> None:
        """ColumnError when this shard's columns cannot give the id."""

    def _with_id(self, schema: pa.Schema) -> pa.Schema:
        return schema

    def check(self, passthrough: Sequence[str] = ()) -> pa.Schema:
        """Check from the footers alone that every shard has the id (or what derives it), the image
        (binary or the Hugging Face image struct) and every passthrough column; the schema unified
        across shards, a derived id as a string column."""
        columns = self.columns
        needed = {**self._needed_id(), columns.image: "image column"}
        needed.update({name: "passthrough column" for name in passthrough if name not in needed})
        schemas = []
        for shard_url, (_, footer) in zip(self.shards.files, self.footers):
            schema = footer.schema.to_arrow_schema()
            missing = [f"{name!r} ({role})" for name, role in needed.items() if name not in schema.names]
            if missing:
                raise ColumnError(f"shard {shard_url} has no {', '.join(missing)}; columns found: "
                                  f"{', '.join(schema.names)}. {self._missing_hint(schema)}")
            self._check_id(shard_url, schema)
            image_type = schema.field(columns.image).type
            if not is_image_type(image_type):
                raise ColumnError(
                    f"shard {shard_url}: image column {columns.image!r} has type {image_type}; "
                    "expected binary (encoded image bytes) or struct<bytes: binary, path: string>"
                )
            schemas.append(schema.remove_metadata())
        try:
            unified = pa.unify_schemas(schemas)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ColumnError(f"the shards under {self.shards.url} have conflicting schemas: {error}") from error
        return self._with_id(unified)

    # --- reading ---------------------------------------------------------------------------

    def _id_read(self) -> list[str]:
        """The columns read for the id (besides the image)."""
        return [self.columns.id]

    def _batch_ids(self, batch: pa.RecordBatch, shard_name: str, first_row: int) -> pa.Array:
        return batch.column(self.columns.id).cast(pa.string())

    def first_images(self, limit: int) -> list[bytes | None]:
        found: list[bytes | None] = []
        fs = self.shards.arrow_fs
        for path in self.shards.paths:
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=limit - len(found),
                                                            columns=[self.columns.image]):
                    found.extend(image_bytes(batch.column(0)))
                    break
            if len(found) >= limit:
                break
        return found

    def ingest_batches(self, shard_url: str, shard_name: str, copied: Sequence[str],
                       batch_rows: int) -> Iterator[pa.Table]:
        arrow_fs, path = storage.arrow_filesystem(shard_url)
        image = self.columns.image
        wanted = list(dict.fromkeys([*self._id_read(), image, *copied]))
        seen = 0
        with arrow_fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=wanted):
                images = batch.column(image)
                if pa.types.is_struct(images.type):
                    images = pc.struct_field(images, "bytes")
                rows = batch.num_rows
                where = pa.array([f"{shard_url}#{seen + row}" for row in range(rows)], pa.string())
                table = {"id": self._batch_ids(batch, shard_name, seen), "image": images.cast(pa.binary()),
                         REASON_COLUMN: pa.nulls(rows, pa.string()), "__where__": where,
                         "__source__": pa.array([shard_url] * rows, pa.string())}
                seen += rows
                yield pa.table({**table, **{name: batch.column(name) for name in copied}})


    # --- ids read from a column ------------------------------------------------------------

    def id_candidates(self, schema: pa.Schema) -> str:
        """What could serve as ids when the id column is missing: string columns (unique or not, when
        few), the image struct's `path`, and the shard-file-plus-row-number id."""
        strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        check = len(strings) <= _CANDIDATES_CHECKED
        options = []
        for name in strings:
            if check:
                problem = self._id_problem(name)
                options.append(f"--id-column {name} ({problem or 'unique'})")
            else:
                options.append(f"--id-column {name}")
        image = self.columns.image
        if image in schema.names and has_path(schema.field(image).type):
            spec = f"{image}.{PATH_FIELD}"
            problem = self._id_problem(spec) if check else None
            verdict = f", {problem or 'unique'}" if check else ""
            options.append(f"--id-column {spec} (the image's path{verdict})")
        options.append(f"--id-column {ROW_ID} (shard file + row number, always unique)")
        return "Columns that could serve as ids: " + "; ".join(options) + "."

    def _id_problem(self, id_column: str) -> str | None:
        """None when the column's values are unique and never null, else what is wrong with them."""
        ids = self.id_column_data(id_column)
        if ids.null_count:
            return f"{ids.null_count} null"
        counts = pc.value_counts(ids)
        duplicated = len(counts.filter(pc.greater(counts.field("counts"), 1)))
        return f"not unique: {duplicated} values repeat" if duplicated else None

    def id_column_data(self, id_column: str) -> pa.ChunkedArray:
        """The id column of every shard, read alone (for `<image>.path` of a struct only its path leaf)."""
        derived = id_column.endswith(f".{PATH_FIELD}") and \
            id_column not in self.footers[0][1].schema.to_arrow_schema().names
        chunks = []
        for path in self.shards.paths:
            column = pq.read_table(path, columns=[id_column], filesystem=self.shards.arrow_fs).column(0)
            if derived and pa.types.is_struct(column.type):
                column = pc.struct_field(column, PATH_FIELD)
            chunks.extend(column.chunks)
        if not chunks:
            return pa.chunked_array([], pa.string())
        if len({c.type for c in chunks}) == 1:
            return pa.chunked_array(chunks)
        return pa.chunked_array([c.cast(pa.string()) for c in chunks])


def _read_footer(shard_url: str) -> tuple[int, pq.FileMetaData]:
    fs, path = storage.arrow_filesystem(shard_url)
    try:
        with fs.open_input_file(path) as f:
            return f.size(), pq.ParquetFile(f).metadata
    except (OSError, pa.ArrowInvalid) as error:
        raise InputError(f"shard {shard_url} is not a readable Parquet file ({error}); "
                         "remove or replace it and run again") from error


@register_format
class ParquetIdColumn(ParquetShards):
    """Parquet whose id is a column of strings or integers (integers read as their decimal text)."""

    name = "parquet"

    @classmethod
    def accepts(cls, columns: Columns) -> bool:
        return columns.id != ROW_ID and columns.id != f"{columns.image}.{PATH_FIELD}"

    def _missing_hint(self, schema: pa.Schema) -> str:
        if self.columns.id in schema.names:
            return super()._missing_hint(schema)
        return self.id_candidates(schema)

    def _check_id(self, shard_url: str, schema: pa.Schema) -> None:
        id_type = schema.field(self.columns.id).type
        if not is_id_type(id_type):
            raise ColumnError(f"shard {shard_url}: id column {self.columns.id!r} has type {id_type}; expected "
                              "strings (or integers)")

    def all_ids(self) -> pa.ChunkedArray:
        return self.id_column_data(self.columns.id)

    def dataset(self, extra: Sequence[str] = (), override_num_blocks: int | None = None, num_cpus: float = 1.0):
        from pipeline.datasets import read_parquet  # the Ray Data edge, imported where a stage reads

        wanted = list(dict.fromkeys([self.columns.id, self.columns.image, *extra]))
        return read_parquet(self.shards.paths, self.shards.arrow_fs, wanted, override_num_blocks=override_num_blocks,
                            num_cpus=num_cpus)

    def fetch(self, ids: Sequence[str]) -> dict[str, bytes | None]:
        """A filtered read (`pc.field(id).isin(ids)`), in the data's own id type where the ids parse."""
        columns = self.columns
        id_type = self.check().field(columns.id).type  # footers read once, when --data was checked
        wanted = pa.array(list(ids), pa.string())
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            # The embed job writes ids as str(); compare in the data's own type where the ids parse.
            try:
                wanted = pc.cast(wanted, id_type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                wanted = pa.array([], id_type)
        dataset = pads.dataset(self.shards.paths, filesystem=self.shards.arrow_fs, format="parquet")
        table = dataset.to_table(columns=[columns.id, columns.image], filter=pc.field(columns.id).isin(wanted))
        found: dict[str, bytes | None] = {}
        for row_id, data in zip(table.column(columns.id).to_pylist(), image_bytes(table.column(columns.image))):
            found.setdefault(str(row_id), data)
        return found

    def sample(self, n: int, seed: int) -> list[tuple[str, bytes | None]]:
        """One pass over the id column (row group by row group, holding n candidates), then only the row
        groups that hold a chosen row are read for their images."""
        fs = self.shards.arrow_fs
        best: list[tuple[int, str, str, int, int]] = []  # (key, id, path, row group, row)
        for path in self.shards.paths:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                for group in range(parquet.num_row_groups):
                    ids = id_strings(parquet.read_row_group(group, columns=[self.columns.id]).column(0))
                    keys = sample_keys(ids, seed)
                    best += [(int(k), i, path, group, row) for row, (k, i) in enumerate(zip(keys, ids))]
                    if len(best) > 4 * n:
                        best = sorted(best)[:n]
        wanted: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for _, row_id, path, group, row in sorted(best)[:n]:
            wanted.setdefault((path, group), []).append((row, row_id))
        images: dict[str, bytes | None] = {}
        for (path, group), rows in wanted.items():
            with fs.open_input_file(path) as f:
                column = pq.ParquetFile(f).read_row_group(group, columns=[self.columns.image]).column(0)
            images.update({row_id: d for (_, row_id), d in zip(rows, image_bytes(column.take([r for r, _ in rows])))})
        return sorted(images.items())


def has_path(data_type: pa.DataType) -> bool:
    """Whether an image column's type is the Hugging Face struct with a string `path`."""
    return pa.types.is_struct(data_type) and data_type.get_field_index(PATH_FIELD) >= 0 and \
        pa.types.is_string(data_type.field(PATH_FIELD).type)
