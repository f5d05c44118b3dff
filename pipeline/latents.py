"""The latent dataset: how the embed job stores vectors and scores, and how later stages read them.

A latent dataset (the README's "Latent dataset" contract) is a folder of Parquet files, one
row per input image:
    id, latent (fixed_size_list<float32|float16|int8>[latent_dim], null for a bad image),
    latent_scale (int8 only), the scores, is_anomaly, error, <passthrough columns>
The score columns are those the embed job was asked for (`--scores`), named and ordered as
`pipeline.scores.SCORE_COLUMNS`; the others are absent. Each file's Parquet metadata holds,
under `METADATA_KEY`, a JSON object naming the model (url, weights_sha256), the threshold and
its spec, and the scores present ("scores"). The folder also holds the embed job's
claim (`RUN_FILE`), Ray Data's write checkpoint (`CHECKPOINT_DIR`) and, once every row is
written, `SUCCESS_FILE`. Names starting with "_" are never read as data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError

METADATA_KEY = b"squeeze"
LATENT_DTYPES = ("float32", "float16", "int8")
# int8 (a per-row scale beside it): a fifth of float32 + snappy's bytes per row, with the same
# reconstructions and neighbours (bench/latent_storage.py); float32 stays a --latent-dtype away.
DEFAULT_LATENT_DTYPE = "int8"
LATENT_COLUMNS = ("id", "latent", "latent_scale")
RUN_FILE = "_embed.json"
SUCCESS_FILE = "_SUCCESS.json"
CHECKPOINT_DIR = "_checkpoint"
MISSING_SHOWN = 5  # missing ids named in an error


# ---------------------------------------------------------------- storing vectors


def quantize_latents(z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, D) float32 -> stored latents, and per-row scales for int8 (z ~= q * scale)."""
    if dtype == "float32":
        return z.astype(np.float32), None
    if dtype == "float16":
        return z.astype(np.float16), None
    if dtype == "int8":
        scale = np.abs(z).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return np.clip(np.rint(z / scale[:, None]), -127, 127).astype(np.int8), scale
    raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {dtype!r}")


def latent_write_options(latent_dtype: str, passthrough: Sequence[str] = ()) -> dict[str, Any]:
    """pyarrow Parquet writer options of a latent dataset's files.

    zstd for every column. Dictionary encoding only where values repeat: the error reasons,
    the passed-through columns and an int8 latent; never the ids, a float latent or the float
    scores, whose values almost never repeat (a dictionary there is overhead until pyarrow gives
    it up at 1 MiB). bench/latent_storage.py measures each choice.
    """
    dictionary = ["error", *passthrough, *(["latent.list.element"] if latent_dtype == "int8" else [])]
    return {"compression": "zstd", "use_dictionary": dictionary}


def dequantize_latents(latent: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored latents -> (N, D) float32."""
    z = latent.astype(np.float32)
    return z * scale[:, None].astype(np.float32) if scale is not None else z


def fixed_size_list(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(N, D) array -> fixed_size_list<D>, null where `valid` is False."""
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(~valid))


def latents_from_batch(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's `latent` (and `latent_scale`) -> (valid (N,) bool, z (n_valid, D) float32).

    `latent` is an (N, D) array, or an object array of vectors and None (Ray's numpy form of
    a fixed_size_list with nulls, or a list from pyarrow's to_pylist).
    """
    raw = batch["latent"]
    if isinstance(raw, np.ndarray) and raw.dtype != object and raw.ndim == 2:
        valid = np.ones(len(raw), dtype=bool)
        stored = raw
    else:
        rows = list(raw)
        # A null may also arrive as a float NaN (pandas' null) rather than None.
        valid = np.array([r is not None and not (isinstance(r, float) and r != r) for r in rows], dtype=bool)
        kept = [np.asarray(r) for r, ok in zip(rows, valid) if ok]
        stored = np.stack(kept) if kept else np.zeros((0, 0), np.float32)
    # Only int8 latents have a scale column; lists from to_pylist() lose the int8 dtype.
    scale = batch.get("latent_scale")
    if scale is not None:
        scale = np.asarray([s for s, ok in zip(scale, valid) if ok], dtype=np.float32)
    return valid, dequantize_latents(stored, scale)


# ---------------------------------------------------------------- finished or not


@dataclass(frozen=True)
class Completion:
    """How much of a latent dataset is there: finished only when `SUCCESS_FILE` exists."""

    url: str
    finished: bool
    rows: int  # rows in the folder's Parquet files now
    expected: int | None  # rows of the input, as the embed job recorded them when it started
    command: str | None  # the command that finishes the folder, as the embed job recorded it

    @property
    def partial_note(self) -> str | None:
        """"partial: N of M rows" for a report's header; None when the dataset is finished."""
        if self.finished:
            return None
        of = f"{self.expected:,}" if self.expected is not None else "an unknown number of"
        return f"partial: {self.rows:,} of {of} rows (the embed job into {self.url} never finished)"


def write_success(url: str, summary: dict[str, Any]) -> None:
    """Mark the latent dataset at `url` finished: every row of the input is in it."""
    storage.write_text(storage.join(url, SUCCESS_FILE), json.dumps(summary, indent=2, sort_keys=True))


def completion(url: str) -> Completion:
    """Read the success marker and the embed job's claim (rows expected, finishing command)."""
    fs, paths = latent_files(url)
    rows = sum(pq.read_metadata(path, filesystem=fs).num_rows for path in paths) if paths else 0
    claim: dict[str, Any] = {}
    if storage.exists(storage.join(url, RUN_FILE)):
        try:
            claim = json.loads(storage.read_text(storage.join(url, RUN_FILE)))
        except (UnicodeDecodeError, json.JSONDecodeError):
            claim = {}
    return Completion(url=url, finished=storage.exists(storage.join(url, SUCCESS_FILE)), rows=rows,
                      expected=claim.get("rows_in"), command=claim.get("command"))


def require_finished(url: str, allow_partial: bool) -> Completion:
    """The dataset's completion; InputError for an unfinished one unless `allow_partial`."""
    state = completion(url)
    if state.finished or allow_partial:
        return state
    if state.expected is not None:
        told = f"{state.rows:,} of its {state.expected:,} rows are there"
    else:
        told = f"{state.rows:,} rows are there and no {RUN_FILE} says how many the input had"
    finish = f"finish it by running the embed job again: {state.command}" if state.command else \
        "finish it by running the embed job that made it again"
    raise InputError(f"the latent dataset {url} is not finished (no {SUCCESS_FILE}): {told}; {finish}; "
                     "or pass --allow-partial to use the rows that are there")


# ---------------------------------------------------------------- reading a latent dataset


def latent_files(url: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, paths inside it) of the latent dataset's Parquet files (maybe none)."""
    return storage.arrow_files(url)


def latent_dataset(url: str) -> pads.Dataset:
    """A pyarrow dataset over the latent files under `url`; InputError when there are none."""
    fs, paths = latent_files(url)
    if not paths:
        raise InputError(f"no latent dataset at {url}: no Parquet files (*.parquet) found there")
    return pads.dataset(paths, filesystem=fs, format="parquet")


def read_latents(url: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The latent dataset under `url` (small data and tests; jobs stream it with Ray Data)."""
    fs, paths = latent_files(url)
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)


def metadata_of(schema: pa.Schema) -> dict[str, Any] | None:
    """The embed job's record (model, threshold, ...) in a latent file's schema; None if absent.

    ValueError when it is there but is not a JSON object.
    """
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the '{METADATA_KEY.decode()}' metadata is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"the '{METADATA_KEY.decode()}' metadata is not a JSON object")
    return value


def recorded_metadata(schema: pa.Schema, url: str) -> dict[str, Any]:
    """`metadata_of` the latents under `url`, {} when absent; InputError naming the URL and cause
    when it is there but unreadable: the checks that read it (the weights' SHA-256 against the
    model's) must not be skipped without a word."""
    try:
        return metadata_of(schema) or {}
    except ValueError as e:
        raise InputError(f"the latents under {url} carry unreadable metadata ({e}), so they cannot be checked "
                         "against the model that made them: rerun the embed job into a fresh folder") from e


def check_model_fits(latents_url: str, model_meta: dict[str, Any], model_url: str) -> None:
    """Refuse a model whose decoder does not match the latents: another latent size, or other
    weights; and a tiled model, whose image latent is its tiles' mean and decodes to no image."""
    if (model_meta["model"].get("working_size") or 0) > 0:
        raise InputError(f"the model at {model_url} is tiled ({model_meta['model']['image_size']} px tiles of "
                         f"{model_meta['model']['working_size']} px images): an image's latent is the mean of its "
                         "tiles' latents, for search and neighbours, and does not decode back to the image")
    schema = latent_dataset(latents_url).schema
    for name in ("id", "latent"):
        if name not in schema.names:
            raise InputError(f"{latents_url} is not a latent dataset: no {name!r} column "
                             f"(columns: {', '.join(schema.names)})")
    latent_type = schema.field("latent").type
    dim = latent_type.list_size if pa.types.is_fixed_size_list(latent_type) else None
    if dim is not None and dim != model_meta["model"]["latent_dim"]:
        raise InputError(f"the latents have {dim} dimensions but the model at {model_url} has "
                         f"latent_dim {model_meta['model']['latent_dim']}")
    recorded = recorded_metadata(schema, latents_url)
    sha, model_sha = recorded.get("weights_sha256"), model_meta.get("weights_sha256")
    if sha and model_sha and sha != model_sha:
        raise InputError(f"the latents under {latents_url} were made by another model (weights {sha[:12]}, "
                         f"{model_url} has {model_sha[:12]}): its decoder would give noise")


def read_latent_rows(latents_url: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """{id: dequantized float32 latent} for `ids`; InputError naming any missing or null one."""
    dataset = latent_dataset(latents_url)
    columns = [c for c in LATENT_COLUMNS if c in dataset.schema.names]
    table = dataset.to_table(columns=columns, filter=pc.field("id").isin(list(ids)))
    found = dict(zip(table.column("id").to_pylist(), range(table.num_rows)))
    missing = [i for i in ids if i not in found]
    if missing:
        raise InputError(f"ids not in {latents_url}: {', '.join(repr(i) for i in missing[:MISSING_SHOWN])}")
    rows = table.take([found[i] for i in ids]).to_pydict()
    valid, z = latents_from_batch(rows)
    if not valid.all():
        null = [i for i, ok in zip(ids, valid) if not ok]
        raise InputError(f"ids with no latent (their image failed to decode upstream): {null}")
    return {i: z[k] for k, i in enumerate(ids)}
