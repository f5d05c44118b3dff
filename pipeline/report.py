"""Anomaly report: latent dataset -> summary.json, index.html, figures and the worst images.

Reads a latent dataset (the embed job's output) with Ray Data in two streaming passes over
its small score columns; each Ray task reduces one block to a small partial and the driver
merges the partials, so no step ever holds the dataset:

1. scores: counts, error reasons, log-spaced histograms of mse and ssim_error, per-shard and
   per-kind sums, the top-K rows by mse, and the score/label arrays the exact quantiles and
   the label metrics use (every row up to `max_exact_rows`; above that a uniform sample
   chosen by a hash of the id, and quantiles come from the histogram).
2. flags, under the threshold the chosen policy gives: flagged rows overall, per shard and
   per kind, the confusion matrix against the label column, and the rows nearest the median
   (the "typical" gallery).

Then the galleries: the worst K and the typical rows are fetched from the image shards by id
with a filtered read (`pc.field(id).isin(ids)`), reconstructed with the model, and shown as
original | reconstruction | error heat map.

Precision: counts, sums, flags, means and the confusion matrix are exact at any size. With at
most `max_exact_rows` scored rows, quantiles (numpy's linear interpolation) and the label
metrics are exact too. Above it, quantiles come from a histogram of HIST_BINS log-spaced bins
over [1e-9, 2]: a reported quantile is within a factor HIST_RATIO (relative error < 0.53%)
of an order statistic next to its rank, and values below 1e-9 read as at most 1e-9; AUROC,
AP and best F1 then come from the hash sample of about `max_exact_rows` rows.

Thresholds (flag rule: mse > threshold, the same as the embed job's is_anomaly):
- `quantile:Q`: the Q-quantile of the model's calibration (held-out normal data); needs
  --model, or the latent files' metadata (the embed job's threshold when its spec was the
  same, else the calibration of the model it names).
- `contamination:X`: flag the top X share of this corpus's scored rows.
- `value:X`: a fixed mse.
The latent dataset's own `is_anomaly` came from the embed job's threshold; the report
recomputes every flag under its own policy and shows both counts.

Labels: a numeric or boolean column, 1 (non-zero) = anomaly, 0 = normal, null = unknown.

Output folder (any fsspec URL; every file written atomically; no file name comes from data):
    index.html               the report a person opens (relative links only, no script)
    summary.json             machine-readable, keys below
    top_anomalies.parquet    rank, id, mse, ssim_error, [label], [anomaly_kind], shard, flagged
    histogram_mse.png, histogram_ssim_error.png, [roc_pr.png], [interpolation.png]
    images/worst-0001-original.png | -reconstruction.png | -error.png, images/typical-0001-...

summary.json keys:
    format, format_version    "squeeze-report", 1
    created                   UTC time, ISO 8601
    config                    the ReportConfig the report was made with
    latents                   {url, files, rows, metadata: the latent files' "squeeze" metadata or null}
    counts                    {rows, scored_rows, error_rows, errors_by_reason, unscored_rows,
                               embed_flagged_rows (the latent dataset's own is_anomaly)}
    scores                    {mse|ssim_error: {count, min, max, mean, quantiles {"0.5": ...}},
                               quantile_method "exact"|"log-histogram", quantile_relative_error}
    histogram                 {score "mse", edges, counts, [counts_label_0, counts_label_1]}
    threshold                 {spec, policy, parameter, value, source, rule, flagged_rows, flagged_share}
    metrics (labels only)     {label_column, positives, negatives, unlabelled_scored_rows,
                               sampled, rows_used, auroc, average_precision, best_f1,
                               best_f1_threshold, best_f1_precision, best_f1_recall,
                               ssim_error {auroc, average_precision},
                               at_threshold {confusion_matrix [[tn, fp], [fn, tp]], tn, fp, fn, tp,
                                             precision, recall, f1}}
    by_kind (anomaly_kind only) [{kind, rows, scored_rows, flagged_rows, flag_rate, mean_mse}]
    shards                    [{shard, rows, error_rows, scored_rows, flagged_rows, flag_rate, mean_mse, max_mse}]
    top_anomalies             [{rank, id, mse, ssim_error, label, anomaly_kind, shard, flagged}]
    typical_rows              [{rank, id, mse, ssim_error, label, anomaly_kind, shard}]: nearest the median mse
    galleries                 {worst: [...], typical: [...], error_scale} or null when omitted;
                              each entry {rank, id, mse, ssim_error, label, anomaly_kind,
                              recomputed_mse, images {original, reconstruction, error}, note}
    interpolation             {id_a, id_b, steps, image} or null
    files                     every file the report wrote, relative to the output folder
    notes                     what was left out and why, model mismatches, sampling
    seconds                   how long the report took
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import posixpath
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.datasets import read_parquet

FORMAT = "squeeze-report"
FORMAT_VERSION = 1
METADATA_KEY = b"squeeze"  # as pipeline.embed writes it
PATH_COLUMN = "path"  # the latent file a row came from (read_parquet(include_paths=True))
KIND_COLUMN = "anomaly_kind"
DEFAULT_LABEL_COLUMN = "label"
THRESHOLD_POLICIES = ("quantile", "contamination", "value")
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)

# Log-spaced histogram: bin i (1..HIST_BINS) covers [EDGES[i-1], EDGES[i]); bin 0 holds values
# below HIST_LOW (zeros included), bin HIST_BINS + 1 values at or above HIST_HIGH.
HIST_LOW, HIST_HIGH, HIST_BINS = 1e-9, 2.0, 4096
HIST_EDGES = np.geomspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)
HIST_RATIO = float(HIST_EDGES[1] / HIST_EDGES[0])  # 1.00524: a value is known to within this factor
DISPLAY_BARS = 60
MAX_SHARDS_SHOWN = 100
IMAGE_WRITE_THREADS = 8
_OUR_IMAGE_NAME = re.compile(r"^(worst|typical)-\d{4,}-(original|reconstruction|error)\.png$")
IMAGES_DIR = "images"
_OPTIONAL_FILES = ("histogram_ssim_error.png", "roc_pr.png", "interpolation.png")


class ReportInputError(ValueError):
    """The report cannot be made as asked; raised before (or instead of) writing anything."""


@dataclass(frozen=True)
class ReportConfig:
    latents: str
    out: str
    model: str | None = None
    data: str | None = None
    label_column: str | None = None  # None: "label" when the latent dataset has one
    threshold: str = "quantile:0.99"
    top_k: int = 50
    typical_k: int = 8
    id_column: str = "id"  # in the image shards (--data); the latent dataset's is "id"
    image_column: str = "image"
    interpolate: tuple[str, str] | None = None
    interpolation_steps: int = 8
    max_exact_rows: int = 10_000_000


def parse_threshold_spec(spec: str) -> tuple[str, float]:
    """'quantile:0.99' | 'contamination:0.05' | 'value:0.02' -> (policy, number)."""
    policy, _, number = str(spec).partition(":")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if policy not in THRESHOLD_POLICIES or not math.isfinite(value):
        raise ReportInputError(f"--threshold must be quantile:Q, contamination:X or value:X, got {spec!r}")
    if policy == "quantile" and not 0.0 <= value <= 1.0:
        raise ReportInputError(f"quantile threshold must be in [0, 1], got {value}")
    if policy == "contamination" and not 0.0 <= value <= 1.0:
        raise ReportInputError(f"contamination must be a share in [0, 1], got {value}")
    return policy, value


def _check_config(cfg: ReportConfig) -> None:
    parse_threshold_spec(cfg.threshold)
    if not 1 <= cfg.top_k <= 10_000:
        raise ReportInputError(f"--top-k must be from 1 to 10000, got {cfg.top_k}")
    if not 0 <= cfg.typical_k <= 1_000:
        raise ReportInputError(f"--typical-k must be from 0 to 1000, got {cfg.typical_k}")
    if cfg.max_exact_rows < 1:
        raise ReportInputError(f"max_exact_rows must be positive, got {cfg.max_exact_rows}")
    if cfg.interpolate is not None:
        if len(cfg.interpolate) != 2 or not all(cfg.interpolate):
            raise ReportInputError(f"--interpolate needs two ids, ID_A,ID_B; got {cfg.interpolate!r}")
        if not cfg.model:
            raise ReportInputError("--interpolate needs --model (the decoder that renders the latents)")
        if cfg.interpolation_steps < 2:
            raise ReportInputError(f"interpolation steps must be at least 2, got {cfg.interpolation_steps}")


# ---------------------------------------------------------------- the latent dataset's shape


@dataclass(frozen=True)
class LatentInfo:
    paths: tuple[str, ...]  # inside `fs`
    fs: Any  # pyarrow filesystem
    root: str
    rows: int
    schema: pa.Schema
    metadata: dict[str, Any] | None
    id_column: str
    label_column: str | None
    kind_column: str | None
    has_ssim: bool
    has_error: bool
    has_flag: bool


def inspect_latents(cfg: ReportConfig, notes: list[str]) -> LatentInfo:
    """Footers only: the files, row count, columns, and the embed job's metadata; refusals."""
    try:
        urls = storage.list_files(cfg.latents)
    except (OSError, ValueError) as e:
        raise ReportInputError(f"cannot list the latent dataset {cfg.latents}: {e}") from e
    if not urls:
        raise ReportInputError(f"no latent dataset at {cfg.latents}: no Parquet files (*.parquet) found there")
    fs, root = storage.arrow_filesystem(cfg.latents)
    paths = tuple(storage.filesystem(u)[1] for u in urls)
    try:
        dataset = pads.dataset(list(paths), filesystem=fs, format="parquet")
        schema = dataset.schema
        rows = dataset.count_rows()
        with fs.open_input_file(paths[0]) as f:
            first_meta = pq.read_schema(f).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise ReportInputError(f"{cfg.latents} is not a readable Parquet dataset: {e}") from e
    metadata = None
    if METADATA_KEY in first_meta:
        try:
            metadata = json.loads(first_meta[METADATA_KEY])
        except (UnicodeDecodeError, json.JSONDecodeError):
            notes.append("the latent files' 'squeeze' metadata is not valid JSON; ignored")
    names = set(schema.names)
    id_column = "id" if "id" in names else cfg.id_column
    missing = [c for c in (id_column, "mse") if c not in names]
    if missing:
        raise ReportInputError(
            f"{cfg.latents} is not a latent dataset: no {', '.join(repr(m) for m in missing)} column; "
            f"columns found: {', '.join(schema.names)}")
    if not pa.types.is_floating(schema.field("mse").type):
        raise ReportInputError(f"column 'mse' of {cfg.latents} has type {schema.field('mse').type}, expected float")

    label_column = cfg.label_column
    if label_column is not None:
        if label_column not in names:
            raise ReportInputError(
                f"--label-column {label_column!r} is not a column of {cfg.latents}; columns found: "
                f"{', '.join(schema.names)} (pass it through at embed time with --passthrough {label_column})")
        if not _is_label_type(schema.field(label_column).type):
            raise ReportInputError(
                f"label column {label_column!r} has type {schema.field(label_column).type}; "
                "expected integers or booleans (1 = anomaly, 0 = normal)")
    elif DEFAULT_LABEL_COLUMN in names:
        if _is_label_type(schema.field(DEFAULT_LABEL_COLUMN).type):
            label_column = DEFAULT_LABEL_COLUMN
        else:
            notes.append(f"column {DEFAULT_LABEL_COLUMN!r} is not numeric or boolean: no label metrics")
    kind_column = KIND_COLUMN if KIND_COLUMN in names else None
    return LatentInfo(
        paths=paths, fs=fs, root=root, rows=rows, schema=schema, metadata=metadata, id_column=id_column,
        label_column=label_column, kind_column=kind_column, has_ssim="ssim_error" in names,
        has_error="error" in names, has_flag="is_anomaly" in names)


def _is_label_type(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_boolean(data_type) or pa.types.is_floating(data_type)


# ---------------------------------------------------------------- the log histogram sketch


def histogram_counts(values: np.ndarray) -> np.ndarray:
    """Finite values -> counts in the HIST_BINS + 2 bins (underflow, HIST_BINS, overflow)."""
    values = values[np.isfinite(values)]
    index = np.searchsorted(HIST_EDGES, values, side="right")  # 0: < LOW, BINS+1: >= HIGH
    return np.bincount(index, minlength=HIST_BINS + 2).astype(np.int64)


def sketch_quantile(counts: np.ndarray, q: float, lowest: float, highest: float) -> float:
    """The q-quantile (numpy's linear definition, rank q * (n - 1)) read off the histogram.

    The answer lies in the bin holding the order statistic at floor(rank), interpolated
    geometrically inside it, and clamped to the exact [lowest, highest].
    """
    n = int(counts.sum())
    if n == 0:
        return math.nan
    rank = q * (n - 1)
    below = np.cumsum(counts)
    b = int(np.searchsorted(below, math.floor(rank), side="right"))
    if b == 0:
        value = min(HIST_LOW, highest)
    elif b == HIST_BINS + 1:
        value = highest
    else:
        start = below[b] - counts[b]
        inside = (rank - start + 0.5) / counts[b]
        lo, hi = HIST_EDGES[b - 1], HIST_EDGES[b]
        value = float(lo * (hi / lo) ** min(max(inside, 0.0), 1.0))
    return float(min(max(value, lowest), highest))


# ---------------------------------------------------------------- per-block partials (Ray tasks)


@dataclass(frozen=True)
class ScanPlan:
    """What the per-block functions need to know; small and picklable."""

    id_column: str
    label_column: str | None
    kind_column: str | None
    has_ssim: bool
    has_error: bool
    has_flag: bool
    top_k: int
    sample_fraction: float  # 1.0: keep every scored row's scores
    threshold: float = math.nan  # pass 2
    median: float = math.nan  # pass 2
    typical_k: int = 0  # pass 2

    @property
    def columns(self) -> list[str]:
        optional = [("ssim_error", self.has_ssim), ("error", self.has_error), ("is_anomaly", self.has_flag)]
        cols = [self.id_column, "mse", *[name for name, present in optional if present]]
        cols += [c for c in (self.label_column, self.kind_column) if c and c not in cols]
        return cols


_ARRAY_DTYPES = {"hist_mse": np.int64, "hist_mse_pos": np.int64, "hist_mse_neg": np.int64, "hist_ssim": np.int64,
                 "sample_mse": np.float32, "sample_ssim": np.float32, "sample_label": np.int8}


def _pack(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> pa.Table:
    """One partial as a one-row table: JSON for the small, structured part, raw bytes for arrays."""
    columns = {"meta": pa.array([json.dumps(meta)], pa.string())}
    for name, array in arrays.items():
        columns[name] = pa.array([np.ascontiguousarray(array, dtype=_ARRAY_DTYPES[name]).tobytes()], pa.binary())
    return pa.table(columns)


def _unpack(row: pa.Table) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = json.loads(row.column("meta")[0].as_py())
    arrays = {name: np.frombuffer(row.column(name)[0].as_py(), dtype=_ARRAY_DTYPES[name])
              for name in row.column_names if name != "meta"}
    return meta, arrays


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as float64 with NaN for null."""
    column = table.column(name)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    return column.to_numpy().astype(np.float64) if column.null_count == 0 else \
        pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def _codes(table: pa.Table, name: str) -> tuple[np.ndarray, list]:
    """Dictionary codes of a column (nulls get their own code) and the values they stand for."""
    encoded = table.column(name).combine_chunks().dictionary_encode(null_encoding="encode")
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _label_codes(table: pa.Table, name: str) -> np.ndarray:
    """(N,) int8: 1 anomaly (non-zero), 0 normal, -1 unknown (null or NaN)."""
    values = _floats(table, name)
    return np.where(np.isnan(values), -1, (values != 0).astype(np.int8)).astype(np.int8)


def _sample_mask(ids: Sequence[str], fraction: float) -> np.ndarray:
    """A uniform, layout-independent sample: keyed hash of the id < fraction."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    limit = int(fraction * 2**32)
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=4,
                                                    key=b"squeeze-report").digest(), "big") < limit for i in ids],
                    dtype=bool)


def _row_records(table: pa.Table, rows: np.ndarray, plan: ScanPlan) -> list[dict]:
    """Selected rows as small dicts (original values, exact strings) for galleries and top lists."""
    picked = table.take(pa.array(rows, pa.int64())) if len(rows) else table.slice(0, 0)
    names = [plan.id_column, "mse", "ssim_error" if plan.has_ssim else None, plan.label_column, plan.kind_column,
             PATH_COLUMN]
    values = {n: picked.column(n).to_pylist() for n in names if n and n in picked.column_names}
    records = []
    for i in range(len(rows)):
        label = values[plan.label_column][i] if plan.label_column else None
        records.append({
            "id": str(values[plan.id_column][i]),
            "mse": values["mse"][i],
            "ssim_error": values["ssim_error"][i] if plan.has_ssim else None,
            "label": int(label) if isinstance(label, (bool, int)) or (isinstance(label, float) and label.is_integer())
            else label,
            "anomaly_kind": values[plan.kind_column][i] if plan.kind_column else None,
            "shard": values[PATH_COLUMN][i] if PATH_COLUMN in values else None,
        })
    return records


def _smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k smallest keys (ties broken by id), in order; NaN keys never chosen."""
    valid = np.flatnonzero(~np.isnan(keys))
    if k <= 0 or valid.size == 0:
        return np.zeros(0, np.int64)
    if valid.size > k:
        kth = np.partition(keys[valid], k - 1)[k - 1]
        valid = valid[keys[valid] <= kth]  # every tie at the cut stays a candidate
    order = np.lexsort((ids[valid], keys[valid]))
    return valid[order[:k]]


def scan_scores(table: pa.Table, plan: ScanPlan) -> pa.Table:
    """Pass 1 over one block: counts, histograms, per-shard/kind sums, top-K, the score sample."""
    n = table.num_rows
    mse = _floats(table, "mse")
    scored = np.isfinite(mse)
    ssim = _floats(table, "ssim_error") if plan.has_ssim else np.full(n, np.nan)
    ids = table.column(plan.id_column).to_numpy(zero_copy_only=False).astype(str)
    meta: dict[str, Any] = {"rows": n, "scored": int(scored.sum())}
    meta["mse_sum"] = float(mse[scored].sum())
    meta["mse_min"] = float(mse[scored].min()) if scored.any() else None
    meta["mse_max"] = float(mse[scored].max()) if scored.any() else None
    ssim_ok = np.isfinite(ssim)
    meta["ssim_count"] = int(ssim_ok.sum())
    meta["ssim_sum"] = float(ssim[ssim_ok].sum())
    meta["ssim_min"] = float(ssim[ssim_ok].min()) if ssim_ok.any() else None
    meta["ssim_max"] = float(ssim[ssim_ok].max()) if ssim_ok.any() else None

    errors = np.zeros(n, dtype=bool)
    meta["reasons"] = []
    if plan.has_error:
        error_column = table.column("error")
        errors = ~error_column.is_null().to_numpy(zero_copy_only=False)
        counts = pc.value_counts(error_column.drop_null()) if errors.any() else None
        if counts is not None:
            meta["reasons"] = [[v, int(c)] for v, c in zip(counts.field("values").to_pylist(),
                                                           counts.field("counts").to_pylist())]
    meta["error_rows"] = int(errors.sum())
    meta["embed_flagged"] = int(pc.sum(table.column("is_anomaly")).as_py() or 0) if plan.has_flag else 0

    codes, shards = _codes(table, PATH_COLUMN)
    m = len(shards)
    highest = np.full(m, -np.inf)
    np.maximum.at(highest, codes[scored], mse[scored])
    per_shard = zip(shards, np.bincount(codes, minlength=m), np.bincount(codes, weights=errors, minlength=m),
                    np.bincount(codes, weights=scored, minlength=m),
                    np.bincount(codes[scored], mse[scored], minlength=m), highest)
    meta["shards"] = [[s, int(r), int(e), int(c), float(t), float(x) if c else None]
                      for s, r, e, c, t, x in per_shard]
    meta["kinds"] = []
    if plan.kind_column:
        codes, kinds = _codes(table, plan.kind_column)
        m = len(kinds)
        meta["kinds"] = [[k, int(r), int(c), float(t)] for k, r, c, t in zip(
            kinds, np.bincount(codes, minlength=m), np.bincount(codes, weights=scored, minlength=m),
            np.bincount(codes[scored], mse[scored], minlength=m))]

    arrays = {"hist_mse": histogram_counts(mse), "hist_ssim": histogram_counts(ssim)}
    labels = np.full(n, -1, np.int8)
    if plan.label_column:
        labels = _label_codes(table, plan.label_column)
        arrays["hist_mse_pos"] = histogram_counts(mse[labels == 1])
        arrays["hist_mse_neg"] = histogram_counts(mse[labels == 0])
        meta["labels"] = {"pos": int((scored & (labels == 1)).sum()), "neg": int((scored & (labels == 0)).sum()),
                          "unknown": int((scored & (labels == -1)).sum())}
    sample = scored & _sample_mask(ids, plan.sample_fraction)
    arrays["sample_mse"] = mse[sample]
    arrays["sample_ssim"] = ssim[sample]
    arrays["sample_label"] = labels[sample]

    top = _smallest(-mse, ids, plan.top_k)
    meta["top"] = _row_records(table, top, plan)
    return _pack(meta, arrays)


def scan_flags(table: pa.Table, plan: ScanPlan) -> pa.Table:
    """Pass 2 over one block: flags under the report's threshold, confusion matrix, typical rows."""
    mse = _floats(table, "mse")
    scored = np.isfinite(mse)
    flagged = scored & (mse > plan.threshold)
    ids = table.column(plan.id_column).to_numpy(zero_copy_only=False).astype(str)
    meta: dict[str, Any] = {"flagged": int(flagged.sum())}
    codes, shards = _codes(table, PATH_COLUMN)
    meta["shards"] = [[s, int(f)] for s, f in zip(shards, np.bincount(codes, weights=flagged, minlength=len(shards)))]
    meta["kinds"] = []
    if plan.kind_column:
        codes, kinds = _codes(table, plan.kind_column)
        meta["kinds"] = [[k, int(f)] for k, f in zip(kinds, np.bincount(codes, weights=flagged, minlength=len(kinds)))]
    if plan.label_column:
        from sklearn.metrics import confusion_matrix

        labels = _label_codes(table, plan.label_column)
        known = scored & (labels >= 0)
        matrix = confusion_matrix(labels[known], flagged[known].astype(np.int8), labels=[0, 1]) if known.any() \
            else np.zeros((2, 2), np.int64)  # scikit-learn refuses an empty block (all rows undecodable)
        meta["confusion"] = matrix.astype(int).tolist()
    typical = _smallest(np.abs(mse - plan.median), ids, plan.typical_k) if math.isfinite(plan.median) else []
    meta["typical"] = _row_records(table, np.asarray(typical, np.int64), plan)
    return _pack(meta, {})


# ---------------------------------------------------------------- merging partials on the driver


@dataclass
class ScoreTotals:
    """Pass-1 partials merged."""

    rows: int = 0
    scored: int = 0
    error_rows: int = 0
    embed_flagged: int = 0
    mse_sum: float = 0.0
    mse_min: float = math.inf
    mse_max: float = -math.inf
    ssim_count: int = 0
    ssim_sum: float = 0.0
    ssim_min: float = math.inf
    ssim_max: float = -math.inf
    reasons: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list] = field(default_factory=dict)  # path -> [rows, errors, scored, mse_sum, mse_max]
    kinds: dict[Any, list] = field(default_factory=dict)  # kind -> [rows, scored, mse_sum]
    labels: dict[str, int] = field(default_factory=lambda: {"pos": 0, "neg": 0, "unknown": 0})
    hist: dict[str, np.ndarray] = field(default_factory=dict)
    samples: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"mse": [], "ssim": [], "label": []})
    top: list[dict] = field(default_factory=list)

    def add(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], top_k: int) -> None:
        for name in ("rows", "scored", "error_rows", "embed_flagged", "mse_sum", "ssim_count", "ssim_sum"):
            setattr(self, name, getattr(self, name) + meta[name])
        for name, pick in (("mse_min", min), ("mse_max", max), ("ssim_min", min), ("ssim_max", max)):
            if meta[name] is not None:
                setattr(self, name, pick(getattr(self, name), meta[name]))
        for reason, count in meta["reasons"]:
            self.reasons[reason] = self.reasons.get(reason, 0) + count
        for path, rows, errors, scored, total, highest in meta["shards"]:
            entry = self.shards.setdefault(path, [0, 0, 0, 0.0, None])
            entry[0] += rows
            entry[1] += errors
            entry[2] += scored
            entry[3] += total
            if highest is not None and scored:
                entry[4] = highest if entry[4] is None else max(entry[4], highest)
        for kind, rows, scored, total in meta["kinds"]:
            entry = self.kinds.setdefault(kind, [0, 0, 0.0])
            entry[0] += rows
            entry[1] += scored
            entry[2] += total
        for key, count in meta.get("labels", {}).items():
            self.labels[key] += count
        for name in ("hist_mse", "hist_ssim", "hist_mse_pos", "hist_mse_neg"):
            if name in arrays:
                self.hist[name] = self.hist.get(name, 0) + arrays[name]
        self.samples["mse"].append(arrays["sample_mse"])
        self.samples["ssim"].append(arrays["sample_ssim"])
        self.samples["label"].append(arrays["sample_label"])
        self.top = sorted([*self.top, *meta["top"]], key=lambda r: (-r["mse"], r["id"]))[:top_k]

    def sample(self, name: str) -> np.ndarray:
        parts = self.samples[name]
        dtype = {"mse": np.float32, "ssim": np.float32, "label": np.int8}[name]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)


@dataclass
class FlagTotals:
    """Pass-2 partials merged."""

    flagged: int = 0
    shards: dict[str, int] = field(default_factory=dict)
    kinds: dict[Any, int] = field(default_factory=dict)
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((2, 2), np.int64))
    typical: list[dict] = field(default_factory=list)

    def add(self, meta: dict[str, Any], median: float, typical_k: int) -> None:
        self.flagged += meta["flagged"]
        for path, flagged in meta["shards"]:
            self.shards[path] = self.shards.get(path, 0) + flagged
        for kind, flagged in meta["kinds"]:
            self.kinds[kind] = self.kinds.get(kind, 0) + flagged
        if "confusion" in meta:
            self.confusion += np.asarray(meta["confusion"], np.int64)
        self.typical = sorted([*self.typical, *meta["typical"]],
                              key=lambda r: (abs(r["mse"] - median), r["id"]))[:typical_k]


def _run_pass(info: LatentInfo, plan: ScanPlan, fn, label: str) -> Iterator[tuple[dict, dict]]:
    """Stream one Ray Data pass: read the small columns, reduce each block with `fn` in a
    Ray task, and yield the unpacked partials on the driver as they arrive."""
    ds = read_parquet(info.paths, info.fs, include_paths=True, partitioning=None)
    ds = ds.select_columns([*plan.columns, PATH_COLUMN])
    ds = ds.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan})
    rows = 0
    last = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for i in range(batch.num_rows):
            meta, arrays = _unpack(batch.slice(i, 1))
            rows += meta.get("rows", 0)
            yield meta, arrays
        if label and time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"report: {label}: {rows:,} of {info.rows:,} rows", flush=True)


# ---------------------------------------------------------------- thresholds and metrics


@dataclass(frozen=True)
class Threshold:
    spec: str
    policy: str
    parameter: float
    value: float
    source: str


def resolve_threshold(spec: str, totals: ScoreTotals | None, exact: bool, calibration: dict[str, Any] | None,
                      metadata: dict[str, Any] | None) -> Threshold:
    """The mse threshold a policy gives, and where it came from (`totals` only for contamination)."""
    from pipeline.train import threshold_from_calibration

    policy, parameter = parse_threshold_spec(spec)
    if policy == "value":
        return Threshold(spec, policy, parameter, parameter, "the value given")
    if policy == "contamination":
        n = totals.scored
        k = int(round(parameter * n))
        if n == 0:
            return Threshold(spec, policy, parameter, math.inf, "no scored rows")
        if not exact:
            value = sketch_quantile(totals.hist["hist_mse"], 1.0 - parameter, totals.mse_min, totals.mse_max)
            return Threshold(spec, policy, parameter, value,
                             f"the {1 - parameter:g}-quantile of this corpus's mse (log-histogram, within "
                             f"{(HIST_RATIO - 1) * 100:.2f}%)")
        ordered = np.sort(totals.sample("mse").astype(np.float64))
        if k <= 0:
            value = float(ordered[-1])
        elif k >= n:
            value = float(np.nextafter(ordered[0], -np.inf))
        else:
            # Midway between the last kept and the first flagged score: flags exactly k rows
            # unless scores tie at the cut.
            value = float((ordered[n - k - 1] + ordered[n - k]) / 2)
        return Threshold(spec, policy, parameter, value, f"the top {parameter:g} share ({k:,} of {n:,} scored rows)")
    # quantile of the model's calibration
    if calibration:
        return Threshold(spec, policy, parameter, threshold_from_calibration(calibration, parameter),
                         "calibration of --model (held-out normal data)")
    meta = metadata or {}
    recorded = meta.get("threshold_spec")
    if recorded and isinstance(meta.get("threshold"), (int, float)) and math.isfinite(meta["threshold"]):
        try:
            same = parse_threshold_spec(recorded) == (policy, parameter)
        except ReportInputError:
            same = False
        if same:
            return Threshold(spec, policy, parameter, float(meta["threshold"]),
                             "the embed job's threshold recorded in the latent metadata")
    model_url = meta.get("model")
    if model_url:
        from pipeline.checkpoint import CheckpointError, read_checkpoint_meta

        try:
            model_calibration = (read_checkpoint_meta(model_url).get("training") or {}).get("calibration")
        except (CheckpointError, OSError, ValueError):
            model_calibration = None
        if model_calibration:
            return Threshold(spec, policy, parameter, threshold_from_calibration(model_calibration, parameter),
                             f"calibration of the model named in the latent metadata ({model_url})")
    raise ReportInputError(
        f"--threshold {spec} needs the model's calibration: pass --model, or use contamination:X or value:X "
        f"(the latent metadata records {recorded or 'no threshold spec'} and no reachable model)")


def label_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUROC, average precision and the best-F1 threshold of `scores` against 0/1 `labels`."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    out: dict[str, Any] = {"positives": positives, "negatives": negatives, "auroc": None, "average_precision": None,
                           "best_f1": None, "best_f1_threshold": None, "best_f1_precision": None,
                           "best_f1_recall": None}
    if positives == 0:
        return out
    out["average_precision"] = float(average_precision_score(labels, scores))
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The curve's last point (precision 1, recall 0) has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = int(np.argmax(f1))
    out.update(best_f1=float(f1[best]), best_f1_threshold=float(thresholds[best]),
               best_f1_precision=float(p[best]), best_f1_recall=float(r[best]))
    if negatives:
        out["auroc"] = float(roc_auc_score(labels, scores))
    return out


def _at_threshold(confusion: np.ndarray) -> dict[str, Any]:
    (tn, fp), (fn, tp) = confusion.tolist()
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if tp + fp + fn else None)
    return {"confusion_matrix": [[tn, fp], [fn, tp]], "tn": tn, "fp": fp, "fn": fn, "tp": tp,
            "precision": precision, "recall": recall, "f1": f1}


def _score_summary(values: np.ndarray, counts: np.ndarray, count: int, total: float, lowest: float,
                   highest: float, exact: bool) -> dict[str, Any]:
    if count == 0:
        return {"count": 0, "min": None, "max": None, "mean": None, "quantiles": {}}
    if exact:
        quantiles = np.quantile(values.astype(np.float64), QUANTILES)
    else:
        quantiles = [sketch_quantile(counts, q, lowest, highest) for q in QUANTILES]
    return {"count": count, "min": lowest, "max": highest, "mean": total / count,
            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)}}


def display_histogram(counts: np.ndarray, bars: int = DISPLAY_BARS) -> tuple[np.ndarray, np.ndarray]:
    """The sketch's bins merged into at most `bars` log-spaced bars over the occupied range."""
    regular = counts[1:HIST_BINS + 1].copy()
    regular[0] += counts[0]
    regular[-1] += counts[HIST_BINS + 1]
    occupied = np.flatnonzero(regular)
    if occupied.size == 0:
        return HIST_EDGES[:2].copy(), np.zeros(1, np.int64)
    first, last = int(occupied[0]), int(occupied[-1])
    width = max(1, math.ceil((last - first + 1) / bars))
    starts = np.arange(first, last + 1, width)
    merged = np.add.reduceat(regular[first:last + 1], starts - first)
    edges = np.append(HIST_EDGES[starts], HIST_EDGES[min(starts[-1] + width, HIST_BINS)])
    return edges, merged


# ---------------------------------------------------------------- galleries


def fetch_images(data_url: str, id_column: str, image_column: str, ids: Sequence[str]) -> dict[str, bytes | None]:
    """Encoded images of `ids` from the image shards, by a filtered read (never a full scan into memory)."""
    from pipeline.shards import Columns, check_columns, image_bytes

    schema = check_columns(data_url, Columns(id=id_column, image=image_column))
    fs, paths = storage.arrow_files(data_url)
    id_type = schema.field(id_column).type
    wanted = pa.array(list(ids), pa.string())
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        # The embed job writes ids as str(); compare in the data's own type where the ids parse.
        try:
            wanted = pc.cast(wanted, id_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            wanted = pa.array([], id_type)
    dataset = pads.dataset(paths, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=[id_column, image_column], filter=pc.field(id_column).isin(wanted))
    found: dict[str, bytes | None] = {}
    for row_id, data in zip(table.column(id_column).to_pylist(), image_bytes(table.column(image_column))):
        found.setdefault(str(row_id), data)
    return found


def _heat_map(error: np.ndarray, scale: float) -> np.ndarray:
    """(S, S) squared error -> (S, S, 3) uint8 through the 'inferno' colour map, 0..scale."""
    import matplotlib

    colours = matplotlib.colormaps["inferno"](np.clip(error / scale, 0.0, 1.0))
    return (colours[..., :3] * 255).round().astype(np.uint8)


def build_galleries(model_url: str, data_url: str, id_column: str, image_column: str,
                    galleries: dict[str, list[dict]], notes: list[str],
                    ) -> tuple[dict[str, list[dict]], dict[str, bytes], float]:
    """Reconstruct each gallery row; returns entries, {relative file name: PNG bytes}, heat scale."""
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.images import decode_batch, encode_image
    from pipeline.reconstruction import mse_per_image

    checkpoint = load_checkpoint(model_url)
    config = checkpoint.config
    resize = (checkpoint.training.get("preprocessing") or {}).get("resize") or "pad"
    ids = list(dict.fromkeys(r["id"] for rows in galleries.values() for r in rows))
    images = fetch_images(data_url, id_column, image_column, ids)
    missing = [i for i in ids if i not in images]
    if missing:
        notes.append(f"{len(missing)} gallery ids were not found in --data (e.g. {missing[0]!r})")
    present = [i for i in ids if i in images]
    pixels, reasons = decode_batch([images[i] for i in present], config.image_size, config.channels, resize)
    decoded = {i: (pixels[n], reasons[n]) for n, i in enumerate(present)}
    recon: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    good = [i for i in present if decoded[i][1] is None]
    with torch.inference_mode():
        for start in range(0, len(good), 64):
            chunk = good[start:start + 64]
            x = torch.from_numpy(np.stack([decoded[i][0] for i in chunk])).permute(0, 3, 1, 2).float() / 255.0
            x_hat = checkpoint.model(x)["x_hat"]  # (B, C, S, S)
            error = (x - x_hat).pow(2).mean(dim=1).numpy()  # (B, S, S)
            mse = mse_per_image(x, x_hat).numpy()
            out = (x_hat.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            for n, i in enumerate(chunk):
                recon[i] = (out[n], error[n], float(mse[n]))
    # One colour scale for the whole gallery, so maps compare; the 99.5th percentile rather than
    # the maximum, so that one glaring defect does not turn every other map black.
    all_errors = np.concatenate([e.ravel() for _, e, _ in recon.values()]) if recon else np.zeros(1)
    scale = max(float(np.percentile(all_errors, 99.5)), 1e-6)
    files: dict[str, bytes] = {}
    entries: dict[str, list[dict]] = {}
    for name, rows in galleries.items():
        entries[name] = []
        for rank, row in enumerate(rows, start=1):
            entry = {**row, "rank": rank, "recomputed_mse": None, "images": None, "note": None}
            if row["id"] not in images:
                entry["note"] = "not found in --data"
            elif decoded[row["id"]][1] is not None:
                entry["note"] = f"cannot decode: {decoded[row['id']][1]}"
            else:
                reconstruction, error, mse = recon[row["id"]]
                stem = f"{IMAGES_DIR}/{name}-{rank:04d}"
                entry["images"] = {kind: f"{stem}-{kind}.png" for kind in ("original", "reconstruction", "error")}
                files[entry["images"]["original"]] = encode_image(decoded[row["id"]][0])
                files[entry["images"]["reconstruction"]] = encode_image(reconstruction)
                files[entry["images"]["error"]] = encode_image(_heat_map(error, scale))
                entry["recomputed_mse"] = mse
            entries[name].append(entry)
    return entries, files, scale


# ---------------------------------------------------------------- figures (matplotlib, Agg)


def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def histogram_figure(totals: ScoreTotals, key: str, xlabel: str, threshold: float | None,
                     labelled: bool) -> tuple[bytes, dict[str, Any]]:
    """A log-x histogram (split by label when there are labels) with the threshold marked."""
    edges, counts = display_histogram(totals.hist[key])
    data: dict[str, Any] = {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}
    fig = _figure()
    ax = fig.add_subplot()
    if labelled and key == "hist_mse":
        for name, colour, text in (("hist_mse_neg", "tab:blue", "label 0 (normal)"),
                                   ("hist_mse_pos", "tab:red", "label 1 (anomaly)")):
            part = display_histogram_on(totals.hist[name], edges)
            data["counts_label_" + ("0" if name.endswith("neg") else "1")] = part.astype(int).tolist()
            ax.stairs(part, edges, fill=True, alpha=0.55, color=colour, label=text)
        ax.stairs(counts, edges, color="black", linewidth=0.8, label="all scored rows")
    else:
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.7, label="scored rows")
    if threshold is not None and math.isfinite(threshold) and threshold > 0:
        ax.axvline(threshold, color="tab:orange", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.4g}")
        lo, hi = min(edges[0], threshold), max(edges[-1], threshold)
        ax.set_xlim(lo / 1.2, hi * 1.2)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _png(fig), data


def display_histogram_on(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of sketch bins regrouped onto display `edges` (which are sketch edges)."""
    regular = counts[1:HIST_BINS + 1].copy()
    regular[0] += counts[0]
    regular[-1] += counts[HIST_BINS + 1]
    starts = np.searchsorted(HIST_EDGES, edges, side="left")
    cumulative = np.concatenate([[0], np.cumsum(regular)])
    return np.diff(cumulative[np.clip(starts, 0, HIST_BINS)])


def roc_pr_figure(labels: np.ndarray, scores: np.ndarray, metrics: dict[str, Any]) -> bytes:
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = _figure(8.0, 3.6)
    roc, pr = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(labels, scores)
    roc.plot(fpr, tpr, color="tab:blue")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC (AUROC {metrics['auroc']:.3f})")
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr.plot(recall, precision, color="tab:red")
    pr.set(xlabel="recall", ylabel="precision", title=f"PR (AP {metrics['average_precision']:.3f})",
           ylim=(0, 1.02))
    return _png(fig)


# ---------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    """Any data value as escaped HTML text."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return _e(value)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """`header` and `rows` hold HTML that is already escaped. No header: a key/value table
    whose first column is a row heading."""
    head = "<thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead>" if header else ""

    def cells(row: Sequence[str]) -> str:
        return "".join(f"<th>{c}</th>" if header is None and i == 0 else f"<td>{c}</td>" for i, c in enumerate(row))

    body = "".join(f"<tr>{cells(row)}</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:middle}th{background:#f4f4f4}code{white-space:pre-wrap;overflow-wrap:anywhere}
.gallery td:nth-child(2){min-width:9em;max-width:18em}
.gallery img{width:96px;height:96px;image-rendering:pixelated;display:block}
.figure{max-width:100%}.note{color:#8a4b00}.small{color:#666;font-size:12px}
"""


def render_html(summary: dict[str, Any]) -> str:
    """index.html from the summary; every data string passes through html.escape."""
    s, parts = summary, []
    counts, threshold = s["counts"], s["threshold"]
    parts.append(f"<h1>Anomaly report</h1><p class=small>latents <code>{_e(s['latents']['url'])}</code>"
                 f" &middot; made {_e(s['created'])} &middot; "
                 '<a href="summary.json">summary.json</a> &middot; <a href="top_anomalies.parquet">'
                 "top_anomalies.parquet</a></p>")
    meta = s["latents"]["metadata"] or {}
    parts.append("<h2>Inputs</h2>" + _table(None, [
        ["latent files", _num(s["latents"]["files"])],
        ["model (embed job)", f"<code>{_e(meta.get('model'))}</code>"],
        ["embed threshold", f"{_num(meta.get('threshold'))} ({_e(meta.get('threshold_spec'))})"],
        ["--model", f"<code>{_e(s['config']['model'])}</code>"],
        ["--data", f"<code>{_e(s['config']['data'])}</code>"],
    ]))
    reasons = "".join(f"<li><code>{_e(r)}</code>: {_num(n)}</li>" for r, n in counts["errors_by_reason"].items())
    parts.append("<h2>Counts</h2>" + _table(None, [
        ["rows", _num(counts["rows"])],
        ["scored rows", _num(counts["scored_rows"])],
        ["error rows (could not be scored)", _num(counts["error_rows"]) + (f"<ul>{reasons}</ul>" if reasons else "")],
        ["flagged by the embed job (is_anomaly)", _num(counts["embed_flagged_rows"])],
        ["flagged by this report", f"<b>{_num(threshold['flagged_rows'])}</b> "
                                   f"({_num(100 * (threshold['flagged_share'] or 0), 3)}% of scored rows)"],
    ]))
    parts.append("<h2>Threshold</h2>" + _table(None, [
        ["policy", f"<code>{_e(threshold['spec'])}</code>"],
        ["value", f"mse &gt; {_num(threshold['value'], 6)}"],
        ["source", _e(threshold["source"])],
        ["flagged rows", f"{_num(threshold['flagged_rows'])} ({_num(100 * (threshold['flagged_share'] or 0), 3)}%)"],
    ]))
    scores = s["scores"]
    names = [n for n in ("mse", "ssim_error") if scores.get(n, {}).get("count")]
    rows = [[_e(q)] + [_num(scores[n]["quantiles"].get(q), 5) for n in names] for q in (f"{q:g}" for q in QUANTILES)]
    rows.append(["mean"] + [_num(scores[n]["mean"], 5) for n in names])
    precision = ("exact" if scores["quantile_method"] == "exact" else
                 f"from a log histogram, within {_num(100 * scores['quantile_relative_error'], 2)}%")
    parts.append(f"<h2>Scores</h2><p class=small>quantiles {precision}</p>" + _table(["quantile", *names], rows))
    parts.append('<p><img class="figure" src="histogram_mse.png" alt="mse histogram with the threshold"></p>')
    if "ssim_error" in names:
        parts.append('<p><img class="figure" src="histogram_ssim_error.png" alt="ssim_error histogram"></p>')
    if "metrics" in s:
        parts.append(_metrics_html(s["metrics"]))
    if s.get("by_kind"):
        parts.append("<h2>By anomaly kind</h2>" + _table(
            ["kind", "rows", "scored", "flagged", "flag rate", "mean mse"],
            [[f"<code>{_e(k['kind'])}</code>" if k["kind"] else "<i>(none)</i>", _num(k["rows"]),
              _num(k["scored_rows"]), _num(k["flagged_rows"]), _num(k["flag_rate"], 3), _num(k["mean_mse"])]
             for k in s["by_kind"]]))
    shards = sorted(s["shards"], key=lambda r: (-(r["flag_rate"] or 0), r["shard"]))
    note = (f"<p class=small>{MAX_SHARDS_SHOWN} of {len(shards)} shards shown (highest flag rate first); "
            "all are in summary.json</p>" if len(shards) > MAX_SHARDS_SHOWN else "")
    parts.append("<h2>Per shard</h2>" + note + _table(
        ["shard", "rows", "errors", "flagged", "flag rate", "mean mse", "max mse"],
        [[f"<code>{_e(r['shard'])}</code>", _num(r["rows"]), _num(r["error_rows"]), _num(r["flagged_rows"]),
          _num(r["flag_rate"], 3), _num(r["mean_mse"]), _num(r["max_mse"])] for r in shards[:MAX_SHARDS_SHOWN]]))
    galleries = s.get("galleries")
    if galleries:
        parts.append(f"<p class=small>error heat maps: squared error per pixel (mean over channels) on one scale "
                     f"for every map, 0 (black) to {_num(galleries['error_scale'])} and above (yellow)</p>")
        parts.append(_gallery_html("Worst images", galleries["worst"], "worst"))
        if galleries["typical"]:
            parts.append(_gallery_html("Typical images (around the median mse)", galleries["typical"], "typical"))
    else:
        parts.append("<h2>Worst images</h2>" + _table(
            ["rank", "id", "mse", "ssim_error", "label"],
            [[_num(r["rank"]), f"<code>{_e(r['id'])}</code>", _num(r["mse"]), _num(r["ssim_error"]), _e(r["label"])]
             for r in s["top_anomalies"]]))
    if s.get("interpolation"):
        it = s["interpolation"]
        parts.append(f"<h2>Latent interpolation</h2><p><code>{_e(it['id_a'])}</code> &rarr; "
                     f"<code>{_e(it['id_b'])}</code>, {_num(it['steps'])} steps</p>"
                     f'<p><img class="figure gallery-strip" src="{_e(it["image"])}" alt="latent interpolation"></p>')
    if s["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{_e(n)}</li>' for n in s["notes"]) + "</ul>")
    csp = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
           "base-uri 'none'; form-action 'none'")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>Anomaly report</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _metrics_html(m: dict[str, Any]) -> str:
    t = m["at_threshold"]
    sampled = (f"<p class=small>AUROC, AP and best F1 on a uniform sample of {_num(m['rows_used'])} rows; "
               "the confusion matrix counts every row</p>" if m["sampled"] else "")
    rows = [["label column", f"<code>{_e(m['label_column'])}</code> (non-zero = anomaly)"],
            ["positives / negatives", f"{_num(m['positives'])} / {_num(m['negatives'])}"],
            ["AUROC (mse)", _num(m["auroc"])], ["average precision (mse)", _num(m["average_precision"])],
            ["best F1", f"{_num(m['best_f1'])} at mse &ge; {_num(m['best_f1_threshold'], 6)} (precision "
                        f"{_num(m['best_f1_precision'], 3)}, recall {_num(m['best_f1_recall'], 3)})"]]
    if m.get("ssim_error"):
        rows += [["AUROC (ssim_error)", _num(m["ssim_error"]["auroc"])],
                 ["average precision (ssim_error)", _num(m["ssim_error"]["average_precision"])]]
    confusion = _table(["", "flagged: no", "flagged: yes"], [
        ["label 0", _num(t["tn"]), _num(t["fp"])], ["label 1", _num(t["fn"]), _num(t["tp"])]])
    figure = '<p><img class="figure" src="roc_pr.png" alt="ROC and precision-recall curves"></p>' \
        if m["auroc"] is not None else ""
    return (f'<section id="metrics"><h2>Label metrics</h2>{sampled}' + _table(None, rows)
            + f"<h3>At the report's threshold</h3>{confusion}<p>precision {_num(t['precision'], 3)}, recall "
            f"{_num(t['recall'], 3)}, F1 {_num(t['f1'], 3)}</p>{figure}</section>")


def _gallery_html(title: str, entries: list[dict], cls: str) -> str:
    rows = []
    for r in entries:
        if r["images"]:
            cells = [f'<img src="{_e(r["images"][k])}" alt="{k}">' for k in ("original", "reconstruction", "error")]
        else:
            cells = [f'<span class="note">{_e(r["note"])}</span>', "", ""]
        rows.append([_num(r["rank"]), f"<code>{_e(r['id'])}</code>", _num(r["mse"]), _num(r["ssim_error"]),
                     _e(r["label"]) if r["label"] is not None else "", _e(r["anomaly_kind"] or ""), *cells])
    return f"<h2>{_e(title)}</h2>" + _table(
        ["rank", "id", "mse", "ssim_error", "label", "kind", "original", "reconstruction", "error"], rows,
        f"gallery {cls}")


# ---------------------------------------------------------------- the job


def _json_clean(value: Any) -> Any:
    """NaN and infinities become null, NumPy scalars plain Python: summary.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _relative_shard(path: str, root: str) -> str:
    rel = posixpath.relpath(path, root) if path.startswith(root.rstrip("/") + "/") else path
    return rel


def _check_interpolation(cfg: ReportConfig, info: LatentInfo):
    """Import the decoder and make sure both ids have latents, before any long work."""
    try:
        from pipeline.decode import interpolation_grid
    except ImportError as e:
        raise ReportInputError(f"--interpolate needs pipeline.decode.interpolation_grid, which is not "
                               f"available here: {e}") from e
    wanted = pc.field(info.id_column).isin(list(cfg.interpolate))
    if "latent" in info.schema.names:
        wanted = wanted & pc.field("latent").is_valid()
    found = pads.dataset(list(info.paths), filesystem=info.fs, format="parquet").to_table(
        columns=[info.id_column], filter=wanted)
    present = set(found.column(info.id_column).to_pylist())
    missing = [i for i in cfg.interpolate if i not in present]
    if missing:
        raise ReportInputError(f"--interpolate: no latent for id(s) {', '.join(repr(m) for m in missing)} in "
                               f"{cfg.latents}")
    return interpolation_grid


def _write_all(out: str, files: dict[str, bytes]) -> None:
    for name in files:  # names are ours (rank numbers, fixed words), never data: keep it that way
        assert not name.startswith("/") and ".." not in name.split("/"), name
    with ThreadPoolExecutor(IMAGE_WRITE_THREADS) as pool:
        list(pool.map(lambda item: storage.write_bytes(storage.join(out, item[0]), item[1]), files.items()))


def _remove_stale_files(out: str, keep: set[str]) -> None:
    """Remove what a previous report into `out` wrote and this one did not (gallery images of a
    larger K, a ROC figure or interpolation strip this run has no data for). Only our own
    names are touched."""
    fs, root = storage.filesystem(out)
    images = posixpath.join(root, IMAGES_DIR)
    fs.invalidate_cache(root)
    fs.invalidate_cache(images)
    candidates = [posixpath.join(root, name) for name in _OPTIONAL_FILES if name not in keep]
    if fs.isdir(images):
        candidates += [entry for entry in fs.ls(images, detail=False)
                       if _OUR_IMAGE_NAME.match(posixpath.basename(entry.rstrip("/")))
                       and f"{IMAGES_DIR}/{posixpath.basename(entry.rstrip('/'))}" not in keep]
    for path in candidates:
        if fs.exists(path):
            fs.rm(path)


@dataclass
class Inputs:
    """What `check_inputs` learned; everything the report needs before its passes."""

    info: LatentInfo
    calibration: dict[str, Any] | None
    threshold: Threshold | None  # None for contamination, which needs the scores first
    interpolation_grid: Any
    notes: list[str]


def check_inputs(cfg: ReportConfig) -> Inputs:
    """Every refusal that needs no pass over the data: footers, configs and checkpoint metadata only, no Ray."""
    notes: list[str] = []
    _check_config(cfg)
    info = inspect_latents(cfg, notes)
    calibration, model_sha = None, None
    if cfg.model:
        from pipeline.checkpoint import CheckpointError, read_checkpoint_meta

        try:
            model_meta = read_checkpoint_meta(cfg.model)
        except (CheckpointError, OSError) as e:
            raise ReportInputError(f"--model: {e}") from e
        calibration = (model_meta.get("training") or {}).get("calibration")
        model_sha = model_meta.get("weights_sha256")
    if cfg.data:
        from pipeline.shards import ColumnError, Columns, check_columns

        try:
            check_columns(cfg.data, Columns(id=cfg.id_column, image=cfg.image_column))
        except (ColumnError, FileNotFoundError) as e:
            raise ReportInputError(f"--data: {e}") from e
    interpolation_grid = _check_interpolation(cfg, info) if cfg.interpolate else None
    policy, _ = parse_threshold_spec(cfg.threshold)
    threshold = None if policy == "contamination" else \
        resolve_threshold(cfg.threshold, None, True, calibration, info.metadata)
    expected_sha = (info.metadata or {}).get("weights_sha256")
    if model_sha and expected_sha and model_sha != expected_sha:
        notes.append(f"--model's weights ({model_sha[:12]}) are not those the latents were made with "
                     f"({expected_sha[:12]}): calibration, reconstructions and recomputed mse come from --model")
    return Inputs(info=info, calibration=calibration, threshold=threshold, interpolation_grid=interpolation_grid,
                  notes=notes)


def report(cfg: ReportConfig, inputs: Inputs | None = None) -> dict[str, Any]:
    """Make the report `cfg` describes on the connected Ray cluster; returns summary.json's content."""
    started = time.perf_counter()
    inputs = inputs or check_inputs(cfg)
    info, calibration, threshold, notes = inputs.info, inputs.calibration, inputs.threshold, list(inputs.notes)
    interpolation_grid = inputs.interpolation_grid

    exact = info.rows <= cfg.max_exact_rows
    fraction = 1.0 if exact else cfg.max_exact_rows / info.rows
    plan = ScanPlan(id_column=info.id_column, label_column=info.label_column, kind_column=info.kind_column,
                    has_ssim=info.has_ssim, has_error=info.has_error, has_flag=info.has_flag, top_k=cfg.top_k,
                    sample_fraction=fraction)
    print(f"report: pass 1/2 (scores) over {info.rows:,} rows in {len(info.paths)} file(s) of {cfg.latents}"
          f"{'' if exact else f'; quantiles from a log histogram, metrics on a {fraction:.3g} sample'}", flush=True)
    totals = ScoreTotals()
    for meta, arrays in _run_pass(info, plan, scan_scores, "pass 1/2"):
        totals.add(meta, arrays, cfg.top_k)

    if threshold is None:
        threshold = resolve_threshold(cfg.threshold, totals, exact, calibration, info.metadata)
    scores = {"mse": _score_summary(totals.sample("mse"), totals.hist["hist_mse"], totals.scored, totals.mse_sum,
                                    totals.mse_min, totals.mse_max, exact)}
    if info.has_ssim:
        scores["ssim_error"] = _score_summary(totals.sample("ssim"), totals.hist["hist_ssim"], totals.ssim_count,
                                              totals.ssim_sum, totals.ssim_min, totals.ssim_max, exact)
    scores["quantile_method"] = "exact" if exact else "log-histogram"
    scores["quantile_relative_error"] = 0.0 if exact else HIST_RATIO - 1
    median = scores["mse"]["quantiles"].get("0.5", math.nan) if totals.scored else math.nan
    print(f"report: threshold mse > {threshold.value:.6g} ({threshold.spec}: {threshold.source}); "
          "pass 2/2 (flags)", flush=True)
    flag_plan = ScanPlan(**{**asdict(plan), "threshold": threshold.value, "median": median,
                            "typical_k": cfg.typical_k})
    flags = FlagTotals()
    for meta, _ in _run_pass(info, flag_plan, scan_flags, ""):
        flags.add(meta, median, cfg.typical_k)

    for row in [*totals.top, *flags.typical]:
        row["shard"] = _relative_shard(row["shard"], info.root) if row["shard"] else None
    files: dict[str, bytes] = {}
    labelled = info.label_column is not None
    files["histogram_mse.png"], histogram = histogram_figure(totals, "hist_mse", "reconstruction mse (log scale)",
                                                              threshold.value, labelled)
    histogram = {"score": "mse", **histogram}
    if info.has_ssim and totals.ssim_count:
        files["histogram_ssim_error.png"], _ = histogram_figure(totals, "hist_ssim", "1 - SSIM (log scale)", None,
                                                                False)
    summary: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "latents": {"url": cfg.latents, "files": len(info.paths), "rows": info.rows, "metadata": info.metadata},
        "counts": {"rows": totals.rows, "scored_rows": totals.scored, "error_rows": totals.error_rows,
                   "errors_by_reason": dict(sorted(totals.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
                   "unscored_rows": totals.rows - totals.scored,
                   "embed_flagged_rows": totals.embed_flagged if info.has_flag else None},
        "scores": scores,
        "histogram": histogram,
        "threshold": {"spec": threshold.spec, "policy": threshold.policy, "parameter": threshold.parameter,
                      "value": threshold.value, "source": threshold.source, "rule": "mse > value",
                      "flagged_rows": flags.flagged,
                      "flagged_share": flags.flagged / totals.scored if totals.scored else None},
    }
    if labelled:
        labels, mse_sample = totals.sample("label"), totals.sample("mse")
        known = labels >= 0
        metrics = {"label_column": info.label_column, **label_metrics(labels[known], mse_sample[known])}
        metrics.update(positives=totals.labels["pos"], negatives=totals.labels["neg"],
                       unlabelled_scored_rows=totals.labels["unknown"], sampled=not exact, rows_used=int(known.sum()))
        if info.has_ssim:
            ssim_sample = totals.sample("ssim")
            usable = known & np.isfinite(ssim_sample)
            ssim_metrics = label_metrics(labels[usable], ssim_sample[usable])
            metrics["ssim_error"] = {k: ssim_metrics[k] for k in ("auroc", "average_precision")}
        metrics["at_threshold"] = _at_threshold(flags.confusion)
        if not exact:
            notes.append(f"AUROC, AP and best F1 come from a uniform id-hash sample of {int(known.sum()):,} "
                         f"of {totals.scored:,} scored rows")
        if metrics["auroc"] is None:
            notes.append("the label column holds only one class among scored rows: no AUROC")
        else:
            files["roc_pr.png"] = roc_pr_figure(labels[known], mse_sample[known], metrics)
        summary["metrics"] = metrics
    if info.kind_column:
        summary["by_kind"] = [
            {"kind": kind, "rows": rows, "scored_rows": scored, "flagged_rows": flags.kinds.get(kind, 0),
             "flag_rate": flags.kinds.get(kind, 0) / scored if scored else None,
             "mean_mse": total / scored if scored else None}
            for kind, (rows, scored, total) in sorted(totals.kinds.items(), key=lambda kv: ("" if kv[0] is None
                                                                                            else str(kv[0])))]
    summary["shards"] = [
        {"shard": _relative_shard(path, info.root), "rows": rows, "error_rows": errors, "scored_rows": scored,
         "flagged_rows": flags.shards.get(path, 0), "flag_rate": flags.shards.get(path, 0) / scored if scored else None,
         "mean_mse": total / scored if scored else None, "max_mse": highest}
        for path, (rows, errors, scored, total, highest) in sorted(totals.shards.items())]
    top = [{"rank": rank, **{k: row[k] for k in ("id", "mse", "ssim_error", "label", "anomaly_kind", "shard")},
            "flagged": bool(row["mse"] > threshold.value)} for rank, row in enumerate(totals.top, start=1)]
    summary["top_anomalies"] = top
    summary["typical_rows"] = [{"rank": rank, **{k: row[k] for k in ("id", "mse", "ssim_error", "label",
                                                                     "anomaly_kind", "shard")}}
                               for rank, row in enumerate(flags.typical, start=1)]

    summary["galleries"] = None
    if cfg.model and cfg.data:
        print(f"report: galleries: fetching {len(totals.top) + len(flags.typical)} images from {cfg.data}", flush=True)
        entries, images, scale = build_galleries(
            cfg.model, cfg.data, cfg.id_column, cfg.image_column,
            {"worst": totals.top, "typical": flags.typical}, notes)
        summary["galleries"] = {**entries, "error_scale": scale}
        files.update(images)
    else:
        notes.append("galleries omitted: they need both --model (to reconstruct) and --data (the image shards)")

    summary["interpolation"] = None
    if interpolation_grid is not None:
        from pipeline.images import encode_image

        id_a, id_b = cfg.interpolate
        print(f"report: interpolating {id_a!r} -> {id_b!r}", flush=True)
        try:
            strip = interpolation_grid(cfg.model, cfg.latents, id_a, id_b, steps=cfg.interpolation_steps)
        except (KeyError, ValueError) as e:
            raise ReportInputError(f"--interpolate: {e}") from e
        strip = np.asarray(strip)
        if strip.dtype != np.uint8 or strip.ndim != 3:
            raise ReportInputError(f"interpolation_grid returned {strip.dtype} {strip.shape}, expected (H, W, C) uint8")
        files["interpolation.png"] = encode_image(strip)
        summary["interpolation"] = {"id_a": id_a, "id_b": id_b, "steps": cfg.interpolation_steps,
                                    "image": "interpolation.png"}

    table = {"rank": pa.array([r["rank"] for r in top], pa.int32()),
             "id": pa.array([r["id"] for r in top], pa.string()),
             "mse": pa.array([r["mse"] for r in top], pa.float32()),
             "ssim_error": pa.array([r["ssim_error"] for r in top], pa.float32())}
    if labelled:
        table["label"] = pa.array([r["label"] for r in top])
    if info.kind_column:
        table["anomaly_kind"] = pa.array([r["anomaly_kind"] for r in top], pa.string())
    table["shard"] = pa.array([r["shard"] for r in top], pa.string())
    table["flagged"] = pa.array([r["flagged"] for r in top], pa.bool_())
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table(table), buffer)
    files["top_anomalies.parquet"] = buffer.getvalue().to_pybytes()

    summary["notes"] = notes
    summary["files"] = sorted([*files, "summary.json", "index.html"])
    summary["seconds"] = time.perf_counter() - started
    summary = _json_clean(summary)
    print(f"report: writing {len(files) + 2} files to {cfg.out}", flush=True)
    _write_all(cfg.out, files)
    _remove_stale_files(cfg.out, set(files))
    storage.write_text(storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    storage.write_text(storage.join(cfg.out, "index.html"), render_html(summary))  # last: the report is whole
    return summary
