"""Image shards: the layouts we read, and checks that run on footers or headers before any work.

An image shard has an id column and an image column (README, "Data contracts"). The
image column is either plain `binary` / `large_binary` bytes, or the Hugging Face datasets
image struct `struct<bytes: binary, path: string>`. Column names are configurable with
`Columns`; img2dataset's layout is `Columns(id="key", image="jpg")`.

Shards are Parquet (`*.parquet`) or WebDataset tar (`*.tar`, pipeline.tars), one format per
prefix (`ShardList.format`). Tar input has no columns: its id is the sample key `__key__` (or
`json:<field>`), and every check here reads the tar headers instead of Parquet footers.

Derived ids, for Parquet without an id column (a Hugging Face export): `--id-column image.path`
takes the image struct's `path` field (`<image column>.path`), and `--id-column @row` the shard
file's name relative to the prefix and the row's number in that file,
`train-00000-of-00002.parquet:17`. Both come from the data, never from run order, so every stage
and every rerun gives the same ids; readers derive them as they read (pipeline.sources).

- `image_bytes(column)` turns any of those column forms (pyarrow, or the NumPy object arrays
  Ray Data hands to `map_batches`) into a list of bytes-or-None.
- `ShardList` lists a prefix once and reads its footers (or tar headers) once; `check_columns` reads only
  the shards' schemas and fails before any work with the columns it did find;
  `check_unique_ids` reads only the id column; `fingerprint` names a dataset from its
  footers alone.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage, tars
from pipeline.errors import InputError

# Output shards are named <SHARD_PREFIX><number>.parquet; only such names are ever cleaned up.
SHARD_PREFIX = "part-"
# Footers are small reads dominated by latency on object stores: fetch many at once.
_FOOTER_THREADS = 16


@dataclass(frozen=True)
class Columns:
    """Names of the id and image columns of an image shard."""

    id: str = "id"
    image: str = "image"


IMG2DATASET = Columns(id="key", image="jpg")
FORMATS = {storage.PARQUET_SUFFIX: "parquet", storage.TAR_SUFFIX: "tar"}
ROW_ID = "@row"  # derived id: <shard file relative to the prefix>:<row number in it>
PATH_FIELD = "path"  # the Hugging Face image struct's field a derived id may come from


def derived_id(columns: Columns) -> str | None:
    """"row" for `@row`, "path" for `<image column>.path`, None when the id is a real column."""
    if columns.id == ROW_ID:
        return "row"
    if columns.id == f"{columns.image}.{PATH_FIELD}":
        return "path"
    return None


class ColumnError(InputError):
    """A shard lacks a needed column, or its image column has a type we cannot read."""


class DuplicateIdError(InputError):
    """The id column is not unique across the corpus."""


def derive_ids(image_column: pa.Array | pa.ChunkedArray, kind: str, shard_name: str, first_row: int) -> pa.Array:
    """The derived ids of a batch: "<shard_name>:<row>" from `first_row` on, or the image struct's path."""
    if kind == "row":
        return pa.array([f"{shard_name}:{first_row + i}" for i in range(len(image_column))], pa.string())
    paths = pc.struct_field(image_column, PATH_FIELD)
    return paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths


# --- reading the image column ------------------------------------------------------------


def _is_binary(data_type: pa.DataType) -> bool:
    return (
        pa.types.is_binary(data_type)
        or pa.types.is_large_binary(data_type)
        or pa.types.is_fixed_size_binary(data_type)
        or pa.types.is_binary_view(data_type)
    )


def _is_image_struct(data_type: pa.DataType) -> bool:
    if not pa.types.is_struct(data_type):
        return False
    index = data_type.get_field_index("bytes")
    return index >= 0 and _is_binary(data_type.field(index).type)


def is_image_type(data_type: pa.DataType) -> bool:
    """Whether a column of this type can hold encoded images (binary, or the HF struct)."""
    return _is_binary(data_type) or _is_image_struct(data_type)


def _object_to_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):  # Hugging Face struct as Ray Data's numpy format gives it
        return _object_to_bytes(value.get("bytes"))
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    if isinstance(value, float) and value != value:  # NaN: pandas' null
        return None
    raise TypeError(f"image column holds {type(value).__name__} values, not encoded image bytes")


def image_bytes(column) -> list[bytes | None]:
    """Encoded image bytes, one per row (None for a null), from any supported column form.

    `column`: a pyarrow Array / ChunkedArray of binary-like type or of the Hugging Face
    struct `struct<bytes: binary, path: string>`; or a NumPy object array / sequence whose
    elements are bytes, None, or dicts {"bytes": ..., "path": ...}.
    """
    if isinstance(column, pa.ChunkedArray):
        out: list[bytes | None] = []
        for chunk in column.chunks:
            out.extend(image_bytes(chunk))
        return out
    if isinstance(column, pa.Array):
        if _is_image_struct(column.type):
            # struct_field keeps the struct's own nulls (a plain .field() would not).
            column = pc.struct_field(column, "bytes")
        if not _is_binary(column.type):
            raise TypeError(
                f"image column has type {column.type}; expected binary or struct<bytes: binary, path: string>"
            )
        # One C++ pass to an object array of bytes; no per-row pyarrow scalars.
        return column.to_numpy(zero_copy_only=False).tolist()
    if isinstance(column, np.ndarray) and column.dtype.kind == "S":
        return [bytes(value) for value in column]
    return [_object_to_bytes(value) for value in column]


# --- ids ----------------------------------------------------------------------------------


def is_id_type(data_type: pa.DataType) -> bool:
    """Whether a column of this type can hold ids: strings, or integers (read as their decimal text)."""
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or \
        pa.types.is_string_view(data_type) or pa.types.is_integer(data_type)


def id_strings(values) -> np.ndarray:
    """Ids as an object array of Python `str`, byte-exact.

    Never through NumPy's fixed-width "U"/"S" types: pyarrow reads a "U" array as C strings
    and cuts an id at its first NUL, and NumPy drops trailing NULs. Python strings keep NULs,
    spaces, combining characters and direction marks as they are. Integer ids become their
    decimal text. `values`: a pyarrow array, a NumPy object array (Ray's numpy batches), or a
    sequence.
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    out = np.empty(len(values), dtype=object)
    out[:] = [value if isinstance(value, str) else str(value) for value in values]
    return out


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


# --- the shard list and footer-only checks ----------------------------------------------


@dataclass(frozen=True)
class ShardList:
    """The shards under one prefix, listed once and passed to every check.

    Listing an object-store prefix is a round trip per page; a job lists its input once and
    hands this on. Footers (or tar headers) are read once, on first use, many at a time.
    """

    url: str
    files: tuple[str, ...]  # shard URLs, sorted
    format: str = "parquet"  # "parquet" or "tar": one format per prefix
    _tar_indexes: dict = field(default_factory=dict, compare=False, repr=False)  # id spec -> [ShardIndex]

    @classmethod
    def under(cls, url: str) -> ShardList:
        """The shards under `url` (a prefix or one file); InputError when there are none, or a mix."""
        files, outputs = storage.list_files_detailed(url, tuple(FORMATS))
        if not files:
            skipped = f" (skipped {len(outputs)} folder(s) holding this project's outputs: {', '.join(outputs[:3])})" \
                if outputs else ""
            raise InputError(f"no Parquet shards (*.parquet) or WebDataset shards (*.tar) found under {url}"
                             f"{skipped}")
        return cls.of(url, files)

    @classmethod
    def of(cls, url: str, files: Sequence[str]) -> ShardList:
        """The shards `files` (listed under `url`), their one format found from their names."""
        by_format: dict[str, list[str]] = {}
        for file in files:
            by_format.setdefault(FORMATS.get(posixpath.splitext(file)[1], "parquet"), []).append(file)
        if len(by_format) > 1:
            found = "; ".join(f"{len(names)} {fmt} ({posixpath.basename(names[0])}, ...)"
                              for fmt, names in sorted(by_format.items()))
            raise InputError(f"{url} mixes shard formats: {found}; keep one format (Parquet or WebDataset tar) "
                             "per prefix")
        return cls(url, tuple(files), next(iter(by_format)))

    @property
    def names(self) -> list[str]:
        """Each shard's path relative to the prefix (its file name when the prefix is one file)."""
        root = storage.filesystem(self.url)[1]
        return [posixpath.relpath(path, root) if path != root else posixpath.basename(path) for path in self.paths]

    def tar_index(self, id_spec: str = tars.KEY_ID) -> list[tars.ShardIndex]:
        """Every tar shard's headers (rows, keys, ids by `id_spec`), read once, many shards at a time."""
        if id_spec not in self._tar_indexes:
            def read(shard_url: str) -> tars.ShardIndex:
                fs, path = storage.filesystem(shard_url)
                try:
                    with fs.open(path, "rb") as f:
                        return tars.index_shard(f, shard_url, id_spec)
                except FileNotFoundError as error:
                    raise InputError(f"shard {shard_url} is not a readable tar file ({error})") from error

            with ThreadPoolExecutor(min(_FOOTER_THREADS, len(self.files))) as pool:
                self._tar_indexes[id_spec] = list(pool.map(read, self.files))
        return self._tar_indexes[id_spec]

    def tar_sizes(self) -> list[tars.ShardIndex]:
        """The tar headers as already read for any id (rows and sizes are the same for every id)."""
        return next(iter(self._tar_indexes.values()), None) or self.tar_index()

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        return storage.arrow_filesystem(self.url)[0]

    @property
    def paths(self) -> list[str]:
        """The shards' paths inside `arrow_fs`."""
        return [storage.filesystem(shard)[1] for shard in self.files]

    @cached_property
    def footers(self) -> list[tuple[int, pq.FileMetaData]]:
        """(size in bytes, Parquet footer) of each shard; InputError naming a shard that is not Parquet."""
        assert self.format == "parquet", "tar shards have no footers: use tar_index()"
        fs = self.arrow_fs

        def read(item: tuple[str, str]) -> tuple[int, pq.FileMetaData]:
            shard_url, path = item
            try:
                with fs.open_input_file(path) as f:
                    return f.size(), pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowInvalid) as error:
                raise InputError(f"shard {shard_url} is not a readable Parquet file ({error}); "
                                 "remove or replace it and run again") from error

        with ThreadPoolExecutor(min(_FOOTER_THREADS, len(self.files))) as pool:
            return list(pool.map(read, zip(self.files, self.paths)))

    @property
    def rows(self) -> int:
        """Rows in all shards, from the footers (tar: samples, from the headers)."""
        if self.format == "tar":
            return sum(shard.rows for shard in self.tar_sizes())
        return sum(footer.num_rows for _, footer in self.footers)


def implied_id_column(shards: ShardList, id_column: str) -> str:
    """The id column a stage uses: for tar shards the default "id" means the sample key, `__key__`."""
    return tars.KEY_ID if shards.format == "tar" and id_column == Columns.id else id_column


def as_shards(shards: ShardList | str) -> ShardList:
    """A ShardList for a prefix URL; a ShardList as it is."""
    return shards if isinstance(shards, ShardList) else ShardList.under(shards)


def count_rows(shards: ShardList | str) -> int:
    """Rows in all shards under a prefix, from the Parquet footers only."""
    return as_shards(shards).rows


def check_columns(shards: ShardList | str, columns: Columns, passthrough: Sequence[str] = ()) -> pa.Schema:
    """Check from the footers alone that every shard has the needed columns.

    Needed: `columns.id`, `columns.image` (binary or the Hugging Face image struct) and every
    `passthrough` column. Returns the schema shared by the shards (unified across them), with a
    derived id (`@row`, `image.path`) as a string column. Raises ColumnError naming the shard and
    the columns it does have, and for a missing id the columns that could serve; InputError when
    there are no shards or one is not Parquet. Tar shards: the id and passthrough fields are
    checked as specs (pipeline.tars), the headers read, and the schema is the rows' own.
    """
    shards = as_shards(shards)
    if shards.format == "tar":
        return _check_tar_fields(shards, columns, passthrough)
    derived = derived_id(columns)
    needed = {columns.image: "image column"} if derived else {columns.id: "id column", columns.image: "image column"}
    needed.update({name: "passthrough column" for name in passthrough if name not in needed})
    schemas = []
    for shard_url, (_, footer) in zip(shards.files, shards.footers):
        schema = footer.schema.to_arrow_schema()
        missing = [f"{name!r} ({role})" for name, role in needed.items() if name not in schema.names]
        if missing:
            hint = id_candidates(shards, schema, columns) if columns.id not in schema.names and not derived else \
                "Name the columns with --id-column / --image-column (img2dataset: --id-column key --image-column jpg)."
            raise ColumnError(f"shard {shard_url} has no {', '.join(missing)}; columns found: "
                              f"{', '.join(schema.names)}. {hint}")
        if not derived:
            id_type = schema.field(columns.id).type
            if not is_id_type(id_type):
                raise ColumnError(f"shard {shard_url}: id column {columns.id!r} has type {id_type}; expected strings "
                                  "(or integers)")
        image_type = schema.field(columns.image).type
        if not is_image_type(image_type):
            raise ColumnError(
                f"shard {shard_url}: image column {columns.image!r} has type {image_type}; "
                "expected binary (encoded image bytes) or struct<bytes: binary, path: string>"
            )
        if derived == "path" and not _has_path(image_type):
            raise ColumnError(f"shard {shard_url}: --id-column {columns.id} needs the image column {columns.image!r} "
                              f"to be the struct<bytes, path> of a Hugging Face Image feature; it is {image_type}. "
                              f"Use --id-column {ROW_ID} (shard file + row number)")
        schemas.append(schema.remove_metadata())
    try:
        unified = pa.unify_schemas(schemas)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ColumnError(f"the shards under {shards.url} have conflicting schemas: {error}") from error
    return unified.append(pa.field(columns.id, pa.string())) if derived else unified


def _has_path(data_type: pa.DataType) -> bool:
    return pa.types.is_struct(data_type) and data_type.get_field_index(PATH_FIELD) >= 0 and \
        pa.types.is_string(data_type.field(PATH_FIELD).type)


def _check_tar_fields(shards: ShardList, columns: Columns, passthrough: Sequence[str]) -> pa.Schema:
    tars.check_field(columns.id, "id", columns.image)
    if columns.image != tars.DEFAULT_IMAGE and columns.image.startswith(tars.JSON_PREFIX):
        raise ColumnError(f"--image-column {columns.image!r}: name an image member ({', '.join(tars.IMAGE_MEMBERS)}) "
                          f"or keep {tars.DEFAULT_IMAGE!r} (the first of them a sample has)")
    for name in passthrough:
        tars.check_field(name, "passthrough", columns.image)
    shards.tar_index(columns.id)  # reads the headers: an unreadable shard is named now
    fields = [(columns.id, pa.string()), (columns.image, pa.binary())]
    fields += [(name, pa.string()) for name in dict.fromkeys(passthrough) if name not in (columns.id, columns.image)]
    return pa.schema(fields)


# Uniqueness of candidate id columns is checked only when there are at most this many (each
# check reads that column of every shard).
_CANDIDATES_CHECKED = 3


def id_candidates(shards: ShardList, schema: pa.Schema, columns: Columns) -> str:
    """What could serve as ids when the id column is missing: string columns (unique or not, when
    few), the image struct's `path`, and the shard-file-plus-row-number id."""
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    check = len(strings) <= _CANDIDATES_CHECKED
    options = []
    for name in strings:
        if check:
            problem = _id_problem(shards, name)
            options.append(f"--id-column {name} ({problem or 'unique'})")
        else:
            options.append(f"--id-column {name}")
    if columns.image in schema.names and _has_path(schema.field(columns.image).type):
        spec = f"{columns.image}.{PATH_FIELD}"
        problem = _id_problem(shards, spec) if check else None
        verdict = f", {problem or 'unique'}" if check else ""
        options.append(f"--id-column {spec} (the image's path{verdict})")
    options.append(f"--id-column {ROW_ID} (shard file + row number, always unique)")
    return "Columns that could serve as ids: " + "; ".join(options) + "."


def _id_problem(shards: ShardList, id_column: str) -> str | None:
    """None when the column's values are unique and never null, else what is wrong with them."""
    ids = _id_column_data(shards, id_column)
    if ids.null_count:
        return f"{ids.null_count} null"
    counts = pc.value_counts(ids)
    duplicated = len(counts.filter(pc.greater(counts.field("counts"), 1)))
    return f"not unique: {duplicated} values repeat" if duplicated else None


def _is_path_id(shards: ShardList, id_column: str) -> bool:
    """Whether `id_column` is `<image>.path` of a struct rather than a column of that name."""
    return id_column.endswith(f".{PATH_FIELD}") and \
        id_column not in shards.footers[0][1].schema.to_arrow_schema().names


def _id_column_data(shards: ShardList, id_column: str) -> pa.ChunkedArray:
    """The id column of every shard, read alone (for `<image>.path` only the struct's path leaf)."""
    derived = _is_path_id(shards, id_column)
    chunks = []
    for path in shards.paths:
        table = pq.read_table(path, columns=[id_column], filesystem=shards.arrow_fs)
        column = table.column(0)
        if derived and pa.types.is_struct(column.type):
            column = pc.struct_field(column, PATH_FIELD)
        chunks.extend(column.chunks)
    if not chunks:
        return pa.chunked_array([], pa.string())
    if len({c.type for c in chunks}) == 1:
        return pa.chunked_array(chunks)
    return pa.chunked_array([c.cast(pa.string()) for c in chunks])


def find_duplicate_ids(shards: ShardList | str, id_column: str, max_examples: int = 5) -> tuple[int, list[str]]:
    """(how many distinct ids occur more than once, up to `max_examples` of them).

    Reads only the id column, one shard at a time. What is held is the id column itself as
    Arrow data (about the ids' byte length plus 4-8 bytes each, far less than a Python set)
    and, at the end, Arrow's hash table of distinct ids. Null ids count as one value "None".
    Examples come in the order they first appear.
    """
    shards = as_shards(shards)
    if shards.format == "tar":
        ids = pa.chunked_array([pa.array(index.ids, pa.string()) for index in shards.tar_index(id_column)],
                               pa.string())
    elif id_column == ROW_ID:
        return 0, []  # unique by construction: (shard file, row number)
    else:
        ids = _id_column_data(shards, id_column)
    if not len(ids):
        return 0, []
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    examples = [str(value) for value in repeated.field("values")[:max_examples].to_pylist()]
    return len(repeated), examples


def check_unique_ids(shards: ShardList | str, id_column: str) -> None:
    """Raise DuplicateIdError, naming examples, if any id occurs more than once in the shards."""
    shards = as_shards(shards)
    if shards.format == "parquet" and id_column != ROW_ID and _is_path_id(shards, id_column):
        nulls = _id_column_data(shards, id_column).null_count
        if nulls:
            raise DuplicateIdError(f"--id-column {id_column}: {nulls} rows of {shards.url} have a null image path, "
                                   f"so they have no id; use --id-column {ROW_ID} (shard file + row number)")
    duplicated, examples = find_duplicate_ids(shards, id_column)
    if duplicated:
        shown = ", ".join(repr(example) for example in examples)
        raise DuplicateIdError(
            f"{duplicated} ids occur more than once in column {id_column!r} of {shards.url} (e.g. {shown}); "
            "ids must be unique across the corpus"
            + (f" (use --id-column {ROW_ID}: shard file + row number)" if id_column.endswith(f".{PATH_FIELD}") else "")
        )


def fingerprint(shards: ShardList | str) -> str:
    """A stable 16-hex-digit name for the dataset under a prefix, from its footers alone.

    Hashes each shard's path relative to the prefix, byte size and row count, so the same
    shards copied to another prefix or bucket keep their fingerprint, and any rewrite that
    changes a shard's size or rows changes it.
    """
    shards = as_shards(shards)
    if shards.format == "tar":
        sizes = [(index.size, index.rows) for index in shards.tar_sizes()]
    else:
        sizes = [(size, footer.num_rows) for size, footer in shards.footers]
    entries = [[name, size, rows] for name, (size, rows) in zip(shards.names, sizes)]
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode("utf-8"))
    return digest.hexdigest()[:16]


def first_images(shards: ShardList, image_column: str, limit: int) -> list[bytes | None]:
    """Up to `limit` encoded images from the start of the shards (preflight checks of the data)."""
    found: list[bytes | None] = []
    if shards.format == "tar":
        for shard_url in shards.files:
            fs, path = storage.filesystem(shard_url)
            with fs.open(path, "rb") as f:
                for sample in tars.iter_samples(f, shard_url):
                    found.append(sample.image(image_column))
                    if len(found) >= limit:
                        return found
        return found
    fs = shards.arrow_fs
    for path in shards.paths:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=limit - len(found), columns=[image_column]):
                found.extend(image_bytes(batch.column(0)))
                break
        if len(found) >= limit:
            break
    return found
