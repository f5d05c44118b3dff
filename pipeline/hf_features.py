"""The Hugging Face Image feature: how `datasets` stores images in Parquet, for outputs other tools open.

`datasets` writes an Image column as `struct<bytes: binary, path: string>` and describes every
column in the schema metadata under the key "huggingface"
(`{"info": {"features": {"image": {"_type": "Image"}, "id": {"dtype": "string", "_type": "Value"}}}}`),
as `datasets.Dataset.to_parquet` writes it. With that metadata `datasets.load_dataset("parquet", ...)`
gives PIL images and the Hub's viewer shows them; without it they are plain structs. This project's
readers take the struct as an image column too (`pipeline.shards.image_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_METADATA_KEY = b"huggingface"


def hf_image_column(images: Sequence[bytes | None], paths: Sequence[str | None] | None = None) -> pa.Array:
    """Encoded images as the Hugging Face Image feature's `struct<bytes: binary, path: string>`."""
    paths = paths if paths is not None else [None] * len(images)
    return pa.StructArray.from_arrays([pa.array(images, pa.binary()), pa.array(paths, pa.string())],
                                      fields=list(HF_IMAGE), mask=pa.array([i is None for i in images]))


def _hf_feature(data_type: pa.DataType) -> dict:
    if data_type == HF_IMAGE:
        return {"_type": "Image"}
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary", pa.bool_(): "bool",
             pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}
    if data_type in names:
        return {"dtype": names[data_type], "_type": "Value"}
    if pa.types.is_integer(data_type) or pa.types.is_null(data_type):
        return {"dtype": str(data_type), "_type": "Value"}
    raise ValueError(f"no Hugging Face feature for Arrow type {data_type}")


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """`schema` with the metadata `datasets` writes for it (key "huggingface"): its Image-feature
    columns (`HF_IMAGE`) load as PIL images with `datasets.load_dataset("parquet", ...)`, and the
    Hub's viewer shows them."""
    features = {f.name: _hf_feature(f.type) for f in schema}
    return schema.with_metadata({**(schema.metadata or {}),
                                 HF_METADATA_KEY: json.dumps({"info": {"features": features}}).encode()})
