"""What every input format's rows hold: the id and image columns, image bytes, ids as strings.

An image shard has an id column and an image column (README, "Data contracts"). The image
column is either plain `binary` / `large_binary` bytes, or the Hugging Face datasets image
struct `struct<bytes: binary, path: string>`. Column names are configurable with `Columns`;
img2dataset's layout is `Columns(id="key", image="jpg")`.

- `image_bytes(column)` turns any of those column forms (pyarrow, or the NumPy object arrays
  Ray Data hands to `map_batches`) into a list of bytes-or-None.
- `id_strings(values)` gives ids as Python strings, byte-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError


@dataclass(frozen=True)
class Columns:
    """Names of the id and image columns of an image shard."""

    id: str = "id"
    image: str = "image"


IMG2DATASET = Columns(id="key", image="jpg")
ROW_ID = "@row"  # derived id: <shard file relative to the prefix>:<row number in it>
PATH_FIELD = "path"  # the Hugging Face image struct's field a derived id may come from


class ColumnError(InputError):
    """A shard lacks a needed column, or its image column has a type we cannot read."""


class DuplicateIdError(InputError):
    """The id column is not unique across the corpus."""


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
