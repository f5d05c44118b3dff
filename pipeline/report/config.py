"""What a report is asked to do (`ReportConfig`) and every refusal that needs no pass over the data.

`check_inputs` reads footers, checkpoint metadata and the image shards' schemas only (no
Ray), so bad input fails in seconds with an `InputError`, before anything is written.

pipeline.scoring and pipeline.checkpoint load torch; this package imports them inside
functions so that the Ray tasks of the scan passes, which import the package, never load it
(the threshold policy, pipeline.thresholds, is NumPy only and imported at the top).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.latents import latent_files, metadata_of, require_finished
from pipeline.lease import Lease
from pipeline.neighbour_output import read_run
from pipeline.report.metrics import Threshold, report_threshold
from pipeline.report.scan import LatentColumns
from pipeline.scores import SCORE_COLUMNS, require_scores
from pipeline.shards import Columns, ShardList, check_columns, implied_id_column
from pipeline.thresholds import parse_threshold

KIND_COLUMN = "anomaly_kind"
DEFAULT_LABEL_COLUMN = "label"


@dataclass(frozen=True)
class ReportConfig:
    """Everything a report depends on; validated when built (InputError)."""

    latents_url: str
    out_url: str
    model_url: str | None = None
    data_url: str | None = None
    label_column: str | None = None  # None: "label" when the latent dataset has one
    score: str | None = None  # None: the score the embed job flagged by (its metadata), else "mse"
    threshold: str = "quantile:0.99"
    top_k: int = 50
    typical_k: int = 8
    id_column: str = "id"  # in the image shards (--data); the latent dataset's is "id"
    image_column: str = "image"
    interpolate: tuple[str, str] | None = None
    interpolation_steps: int = 8
    max_exact_rows: int = 10_000_000
    allow_partial: bool = False  # report on an unfinished latent dataset, and say so at the top
    neighbours_url: str | None = None  # a neighbours output: the near-duplicates section

    def __post_init__(self) -> None:
        if self.interpolate is not None:
            object.__setattr__(self, "interpolate", tuple(self.interpolate))
        parse_threshold(self.threshold)
        if not 1 <= self.top_k <= 10_000:
            raise InputError(f"--top-k must be from 1 to 10000, got {self.top_k}")
        if not 0 <= self.typical_k <= 1_000:
            raise InputError(f"--typical-k must be from 0 to 1000, got {self.typical_k}")
        if self.max_exact_rows < 1:
            raise InputError(f"max_exact_rows must be positive, got {self.max_exact_rows}")
        if self.interpolate is not None:
            if len(self.interpolate) != 2 or not all(self.interpolate):
                raise InputError(f"--interpolate needs two ids, ID_A,ID_B; got {self.interpolate!r}")
            if not self.model_url:
                raise InputError("--interpolate needs --model (the decoder that renders the latents)")
            if self.interpolation_steps < 2:
                raise InputError(f"interpolation steps must be at least 2, got {self.interpolation_steps}")

    @property
    def columns(self) -> Columns:
        """The id and image columns of the image shards (--data)."""
        return Columns(id=self.id_column, image=self.image_column)


# ---------------------------------------------------------------- the latent dataset's shape


@dataclass(frozen=True)
class LatentInfo(LatentColumns):
    """The latent dataset as its footers describe it: files, rows, columns, the embed job's metadata."""

    paths: tuple[str, ...]  # inside `fs`
    fs: Any  # pyarrow filesystem
    root: str
    rows: int
    schema: pa.Schema
    metadata: dict[str, Any] | None


def _read_footers(url: str) -> tuple[Any, tuple[str, ...], pa.Schema, int, pa.Schema]:
    """(filesystem, paths, dataset schema, rows, first file's schema) of the latent files."""
    try:
        fs, paths = latent_files(url)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot list the latent dataset {url}: {e}") from e
    if not paths:
        raise InputError(f"no latent dataset at {url}: no Parquet files (*.parquet) found there")
    try:
        dataset = pads.dataset(paths, filesystem=fs, format="parquet")
        with fs.open_input_file(paths[0]) as f:
            first = pq.read_schema(f)
        return fs, tuple(paths), dataset.schema, dataset.count_rows(), first
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{url} is not a readable Parquet dataset: {e}") from e


def _is_label_type(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_boolean(data_type) or pa.types.is_floating(data_type)


def _label_column(cfg: ReportConfig, schema: pa.Schema, notes: list[str]) -> str | None:
    """The label column asked for (refused when absent or not numeric), else "label" if usable."""
    name = cfg.label_column
    if name is None:
        if DEFAULT_LABEL_COLUMN not in schema.names:
            return None
        if _is_label_type(schema.field(DEFAULT_LABEL_COLUMN).type):
            return DEFAULT_LABEL_COLUMN
        notes.append(f"column {DEFAULT_LABEL_COLUMN!r} is not numeric or boolean: no label metrics")
        return None
    if name not in schema.names:
        raise InputError(
            f"--label-column {name!r} is not a column of {cfg.latents_url}; columns found: "
            f"{', '.join(schema.names)} (pass it through at embed time with --passthrough {name})")
    if not _is_label_type(schema.field(name).type):
        raise InputError(f"label column {name!r} has type {schema.field(name).type}; "
                         "expected integers or booleans (1 = anomaly, 0 = normal)")
    return name


def inspect_latents(cfg: ReportConfig, notes: list[str]) -> LatentInfo:
    """Footers only: the files, row count, columns, and the embed job's metadata; refusals."""
    fs, paths, schema, rows, first = _read_footers(cfg.latents_url)
    try:
        metadata = metadata_of(first)
    except ValueError as e:
        metadata = None
        notes.append(f"{e}; ignored")
    names = set(schema.names)
    id_column = "id" if "id" in names else cfg.id_column
    scores = tuple(name for name in SCORE_COLUMNS if name in names)
    if id_column not in names or not scores:
        missing = repr(id_column) if id_column not in names else f"score ({', '.join(map(repr, SCORE_COLUMNS))})"
        raise InputError(f"{cfg.latents_url} is not a latent dataset: no {missing} column; "
                         f"columns found: {', '.join(schema.names)}")
    for name in scores:
        if not pa.types.is_floating(schema.field(name).type):
            raise InputError(f"column {name!r} of {cfg.latents_url} has type {schema.field(name).type}, expected float")
    score = cfg.score or (metadata or {}).get("score") or "mse"
    require_scores(scores, [score], cfg.latents_url, f"--score {score}")
    return LatentInfo(
        paths=paths, fs=fs, root=storage.arrow_filesystem(cfg.latents_url)[1], rows=rows, schema=schema,
        metadata=metadata, id_column=id_column, label_column=_label_column(cfg, schema, notes),
        kind_column=KIND_COLUMN if KIND_COLUMN in names else None, score=score, scores=scores,
        has_error="error" in names, has_flag="is_anomaly" in names)


# ---------------------------------------------------------------- the other inputs


def _read_model(model_url: str) -> tuple[dict[str, Any] | None, str | None]:
    """(calibration, weights sha256) from the checkpoint's metadata alone."""
    from pipeline.checkpoint import read_checkpoint_meta

    try:
        model_meta = read_checkpoint_meta(model_url)
    except (InputError, OSError) as e:  # InputError: pipeline.checkpoint's CheckpointError
        raise InputError(f"--model: {e}") from e
    return (model_meta.get("training") or {}).get("calibration"), model_meta.get("weights_sha256")


def _list_image_shards(cfg: ReportConfig) -> tuple[ShardList, ReportConfig]:
    """The --data shards, listed once here and handed on to the gallery fetch, and the config with
    the id column they imply (tar shards: the sample key)."""
    try:
        shards = ShardList.under(cfg.data_url)
        cfg = replace(cfg, id_column=implied_id_column(shards, cfg.id_column))
        check_columns(shards, cfg.columns)
    except (InputError, FileNotFoundError) as e:
        raise InputError(f"--data: {e}") from e
    return shards, cfg


def _check_interpolation_ids(cfg: ReportConfig, info: LatentInfo) -> None:
    """Both --interpolate ids must have a latent, before any long work."""
    wanted = pc.field(info.id_column).isin(list(cfg.interpolate))
    if "latent" in info.schema.names:
        wanted = wanted & pc.field("latent").is_valid()
    found = pads.dataset(list(info.paths), filesystem=info.fs, format="parquet").to_table(
        columns=[info.id_column], filter=wanted)
    present = set(found.column(info.id_column).to_pylist())
    missing = [i for i in cfg.interpolate if i not in present]
    if missing:
        raise InputError(f"--interpolate: no latent for id(s) {', '.join(repr(m) for m in missing)} in "
                         f"{cfg.latents_url}")


@dataclass
class Inputs:
    """What `check_inputs` learned; everything the report needs before its passes."""

    cfg: ReportConfig
    info: LatentInfo
    calibration: dict[str, Any] | None
    threshold: Threshold | None  # None for contamination, which needs the scores first
    shards: ShardList | None  # the --data image shards
    notes: list[str]
    lease: Lease  # this job's hold on --out; the caller releases it (`report` does)
    partial: str | None = None  # "partial: N of M rows ..." when the latent dataset is unfinished
    neighbours: dict[str, Any] | None = None  # the neighbours output's _neighbours.json


def check_inputs(cfg: ReportConfig) -> Inputs:
    """Every refusal that needs no pass over the data: footers, configs and checkpoint metadata only, no Ray.

    Then, before the first write, it takes the output folder's lease: a second report into the same
    folder refuses rather than mixing its images and pages in.
    """
    notes: list[str] = []
    storage.check_apart({"--latents": cfg.latents_url, "--data": cfg.data_url, "--neighbours": cfg.neighbours_url},
                        {"--out": cfg.out_url})
    info = inspect_latents(cfg, notes)
    partial = require_finished(cfg.latents_url, cfg.allow_partial).partial_note
    calibration, model_sha = _read_model(cfg.model_url) if cfg.model_url else (None, None)
    shards = None
    if cfg.data_url:
        shards, cfg = _list_image_shards(cfg)
    if cfg.interpolate:
        _check_interpolation_ids(cfg, info)
    neighbours = None
    if cfg.neighbours_url:
        try:
            neighbours = read_run(cfg.neighbours_url)
        except InputError as e:
            raise InputError(f"--neighbours: {e}") from e
    threshold = None if parse_threshold(cfg.threshold).policy == "contamination" else \
        report_threshold(cfg.threshold, None, True, calibration, info.metadata, info.score)
    expected_sha = (info.metadata or {}).get("weights_sha256")
    if model_sha and expected_sha and model_sha != expected_sha:
        notes.append(f"--model's weights ({model_sha[:12]}) are not those the latents were made with "
                     f"({expected_sha[:12]}): calibration, reconstructions and recomputed mse come from --model")
    return Inputs(cfg=cfg, info=info, calibration=calibration, threshold=threshold, shards=shards, notes=notes,
                  partial=partial, neighbours=neighbours, lease=Lease.acquire(cfg.out_url, "report job"))
