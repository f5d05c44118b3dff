"""The neighbours job: `prepare` checks everything without Ray and plans; `run` does the work.

Steps of `run`, each reused by a rerun into the same folder:
1. the duplicate threshold: calibrated (calibrate.py) or given; recorded in _neighbours.json
   at once, so a rerun uses the same value;
2. the index (index.py), built on the driver from two streaming passes; reused when its
   index.json exists;
3. every row's k nearest: the latents stream through Ray Data into an actor pool whose actors
   load the index once (`NeighbourSearch`, the mapper, testable without Ray) and are written
   exactly once with Ray Data's id-based write checkpointing, as the embed job does: a rerun
   after a kill searches only the rows not yet written;
4. pairs under the threshold and their clusters (clusters.py), on the driver;
5. _neighbours.json with the summary, then _SUCCESS.json.

One neighbours job at a time writes an output folder: `prepare` takes its lease
(`pipeline.lease`) before the first write, and `run` checks it before the success marker.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import read_checkpoint_meta
from pipeline.datasets import read_parquet
from pipeline.errors import InputError, JobFailed
from pipeline.latents import (
    check_model_fits,
    latents_from_batch,
    recorded_metadata,
    require_finished,
)
from pipeline.lease import LEASE_DIR, Lease, run_prepared
from pipeline.neighbour_output import (
    CHECKPOINT_DIR,
    CLUSTERS_FILE,
    INDEX_SETTINGS_FILE,
    NEIGHBOUR_SCHEMA,
    PAIRS_FILE,
    PART_PREFIX,
    RUN_FILE,
    SUCCESS_FILE,
    neighbour_files,
    table_bytes,
)
from pipeline.neighbours.calibrate import MIN_IMAGES, calibrate_threshold
from pipeline.neighbours.clusters import cluster_summary, clusters, duplicate_pairs
from pipeline.neighbours.edits import Edits
from pipeline.neighbours.index import (
    FLAT_MAX_ROWS,
    INDEX_KINDS,
    IndexPlan,
    LoadedIndex,
    build_index,
    json_text,
    plan_index,
)
from pipeline.progress import Progress, TallyWatch
from pipeline.resources import largest_node_cpus, plan_actor_pool, pool_setting_problems
from pipeline.shards import (
    Columns,
    ShardList,
    check_columns,
    check_unique_ids,
    fingerprint,
    id_strings,
    implied_id_column,
)

SEARCH_BATCH_SIZE = 1024  # faiss searches a batch of queries at once (BLAS for the flat index)
# Each search actor holds the whole index: a few multi-threaded actors rather than one per CPU.
SEARCH_THREADS_PER_ACTOR = 4
MAX_K = 1000
# Settings that decide the output's content: a rerun into the same folder must match them.
OUTPUT_KEYS = ("latents_url", "k", "model_url", "data_url", "duplicate_threshold", "calibration_images",
               "max_false_positive_rate", "positive_quantile", "calibration_edits", "calibration_crop",
               "calibration_rescale", "calibration_quality", "calibration_border", "calibration_overlay", "seed", "index", "flat_max_rows", "target_recall", "id_column", "image_column")

# NeighboursConfig's field -> Edits' field: the calibration copies' edits.
CALIBRATION_EDIT_FIELDS = {"calibration_edits": "kinds", "calibration_crop": "crop", "calibration_rescale": "rescale",
                           "calibration_quality": "quality", "calibration_border": "border",
                           "calibration_overlay": "overlay"}


class NeighbourSearch:
    """Latent rows -> neighbour rows. Loads the index once; runs with or without Ray.

    Every input row gives one output row: a row without a latent gets null lists and the
    reason (the latents' own error, or "null latent") in `error`.
    """

    def __init__(self, index_url: str, k: int, threads: int | None = None, on_rows=None):
        self.index = LoadedIndex(index_url, threads)
        self.k = k
        self.on_rows = on_rows  # progress: told the rows of each finished batch

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        ids = id_strings(batch["id"])
        valid, z = latents_from_batch(batch)
        # k + 1: the row itself is (nearly always) among them, and is left out.
        found, distances = self.index.search(z, self.k + 1)
        upstream = batch.get("error")
        neighbour_ids: list[list[str] | None] = [None] * len(ids)
        neighbour_distances: list[list[float] | None] = [None] * len(ids)
        errors: list[str | None] = [None] * len(ids)
        for position, names, dists in zip(np.flatnonzero(valid).tolist(), found, distances):
            keep = [j for j, name in enumerate(names) if name != ids[position]][:self.k]
            neighbour_ids[position] = [names[j] for j in keep]
            neighbour_distances[position] = [dists[j] for j in keep]
        for position in np.flatnonzero(~valid).tolist():
            reason = upstream[position] if upstream is not None else None
            errors[position] = f"no latent: {reason}" if isinstance(reason, str) else "null latent"
        if self.on_rows is not None:
            self.on_rows(len(ids))
        return pa.table([pa.array(ids, pa.string()), pa.array(neighbour_ids, pa.list_(pa.string())),
                         pa.array(neighbour_distances, pa.list_(pa.float32())), pa.array(errors, pa.string())],
                        schema=NEIGHBOUR_SCHEMA)


@dataclass(frozen=True)
class NeighboursConfig:
    """Everything a neighbours run depends on; validated when built (InputError)."""

    latents_url: str
    out_url: str
    k: int = 10
    model_url: str | None = None  # with data_url: calibrate the duplicate threshold
    data_url: str | None = None
    duplicate_threshold: str = "calibrate"  # or value:X (a Euclidean latent distance)
    calibration_images: int = 512
    max_false_positive_rate: float = 0.001
    positive_quantile: float = 0.99
    calibration_edits: tuple[str, ...] = Edits.kinds  # edits.py: each copy gets one of these
    calibration_crop: tuple[float, float] = Edits.crop
    calibration_rescale: tuple[float, float] = Edits.rescale
    calibration_quality: tuple[int, int] = Edits.quality
    calibration_border: tuple[float, float] = Edits.border
    calibration_overlay: tuple[float, float] = Edits.overlay
    seed: int = 0
    index: str = "auto"
    flat_max_rows: int = FLAT_MAX_ROWS
    target_recall: float = 0.9
    allow_partial: bool = False
    id_column: str = "id"  # of the --data image shards
    image_column: str = "image"
    batch_size: int | None = None  # None: SEARCH_BATCH_SIZE
    actors: int | None = None
    threads: int | None = None  # faiss threads per actor; None: from the cluster's CPUs
    rows_per_file: int = 20_000

    def __post_init__(self) -> None:
        for name in CALIBRATION_EDIT_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.edits  # noqa: B018 - validates the kinds and ranges
        problems = []
        if not 1 <= self.k <= MAX_K:
            problems.append(f"k must be from 1 to {MAX_K}, got {self.k}")
        if self.index not in INDEX_KINDS:
            problems.append(f"index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.calibration_images < MIN_IMAGES:
            problems.append(f"calibration_images must be at least {MIN_IMAGES}, got {self.calibration_images}")
        for name in ("max_false_positive_rate", "positive_quantile", "target_recall"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.flat_max_rows < 0:
            problems.append(f"flat_max_rows must not be negative, got {self.flat_max_rows}")
        problems += pool_setting_problems(self.batch_size, self.actors, self.threads, self.rows_per_file)
        if problems:
            raise InputError("invalid neighbours settings: " + "; ".join(problems))
        given = self.given_threshold
        if given is None and not (self.model_url and self.data_url):
            raise InputError("the duplicate threshold is calibrated on images: give --model (the model that made "
                             "the latents) and --data (image shards, e.g. its training data), or set it with "
                             "--duplicate-threshold value:X")
        if given is not None and (self.model_url or self.data_url):
            raise InputError("--model and --data only calibrate the duplicate threshold: drop them, or drop "
                             "--duplicate-threshold value:X")

    @property
    def given_threshold(self) -> float | None:
        """The value of `value:X`; None for `calibrate`; InputError for anything else."""
        spec = self.duplicate_threshold.strip()
        if spec == "calibrate":
            return None
        policy, _, text = spec.partition(":")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if policy != "value" or not math.isfinite(value) or value < 0:
            raise InputError(f"--duplicate-threshold must be 'calibrate' or value:X with X >= 0 "
                             f"(a distance between latents), got {self.duplicate_threshold!r}")
        return value

    @property
    def edits(self) -> Edits:
        """The calibration copies' edits."""
        return Edits(**{field: getattr(self, name) for name, field in CALIBRATION_EDIT_FIELDS.items()})

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide the output, as JSON reads them back (tuples as lists)."""
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k in OUTPUT_KEYS}))


@dataclass
class NeighboursSummary:
    rows_in: int
    rows_out: int
    rows_without_latent: int
    k: int
    index: dict[str, Any]  # kind, vectors, bytes, nprobe, recall@10
    threshold: float
    threshold_source: str
    pairs: int
    clusters: int
    rows_in_clusters: int
    rows_to_drop: int
    largest_cluster: int
    seconds: float
    rows_per_s: float
    out: str
    partial_latents: bool = False
    clusters_by_size: dict[str, int] = field(default_factory=dict)
    rows_by_node: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NeighboursPlan:
    """What `prepare` found: the latents, the index to build and the output folder's state."""

    cfg: NeighboursConfig
    latents: ShardList
    rows_in: int
    dim: int
    latent_dtype: str
    index_plan: IndexPlan
    latents_record: dict[str, Any]  # url, fingerprint, rows, model, dtype: written into index.json
    data: ShardList | None
    finished: bool
    partial: str | None  # "partial: N of M rows ..." when the latent dataset is unfinished
    lease: Lease  # this job's hold on the output folder; the caller releases it (`neighbours` does)


def _latent_shape(latents: ShardList) -> tuple[int, str, dict[str, Any]]:
    """(dimension, stored dtype, the embed job's metadata) of a latent dataset, from its footers."""
    schema = pq.read_schema(latents.paths[0], filesystem=latents.arrow_fs)
    if "id" not in schema.names or "latent" not in schema.names:
        raise InputError(f"{latents.url} is not a latent dataset: it needs 'id' and 'latent' columns "
                         f"(columns: {', '.join(schema.names)})")
    latent_type = schema.field("latent").type
    if not pa.types.is_fixed_size_list(latent_type):
        raise InputError(f"column 'latent' of {latents.url} has type {latent_type}, expected a fixed-size list")
    metadata = recorded_metadata(schema, latents.url)
    return latent_type.list_size, np.dtype(latent_type.value_type.to_pandas_dtype()).name, metadata


def check_output_folder(cfg: NeighboursConfig, latents_record: dict[str, Any], claim: bool = True) -> bool:
    """Claim `out_url` for these latents and settings (unless `claim` is False: only look); True if a
    previous run already finished."""
    run_url = storage.join(cfg.out_url, RUN_FILE)
    mine = cfg.output_settings()
    if storage.exists(run_url):
        try:
            previous = json.loads(storage.read_text(run_url))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{run_url} is not a neighbours job's record ({e}): use a new --out") from e
        changed = [k for k in OUTPUT_KEYS if previous.get("config", {}).get(k) != mine[k]]
        if changed:
            raise InputError(f"{cfg.out_url} holds results made with other settings ({', '.join(changed)}): "
                             "use a new --out")
        if previous.get("latents", {}).get("fingerprint") != latents_record["fingerprint"]:
            raise InputError(f"{cfg.out_url} holds results for other latents (the files under {cfg.latents_url} "
                             "changed since): use a new --out")
        return storage.exists(storage.join(cfg.out_url, SUCCESS_FILE))
    fs, path = storage.filesystem(cfg.out_url)
    if fs.exists(path) and [f for f in fs.find(path)
                            if not posixpath.relpath(f, path).startswith(LEASE_DIR + "/")]:
        raise InputError(f"{cfg.out_url} already holds files that are not this job's: use a new --out")
    if claim:
        storage.write_text(run_url, json_text({"config": mine, "latents": latents_record, "threshold": None,
                                               "summary": None}))
    return False


def _calibration_columns(cfg: NeighboursConfig, data: ShardList) -> Columns:
    """The columns that read --data (tar shards: the default id is the sample key)."""
    return Columns(id=implied_id_column(data, cfg.id_column), image=cfg.image_column)


def _calibration_data(cfg: NeighboursConfig) -> ShardList:
    """The --data shards the threshold is calibrated on, checked as embed checks them (columns, unique
    ids: the sample is drawn by id): any format embed reads (its reader samples them)."""
    data = ShardList.under(cfg.data_url)
    columns = _calibration_columns(cfg, data)
    check_columns(data, columns)
    check_unique_ids(data, columns.id)
    return data


NOT_INVARIANT_NOTE = (
    "neighbours: note: this model was trained without --invariance, so crops, added borders and "
    "watermarks move a latent about as far as a different image does and few of them will be called "
    "duplicates (the calibration's recall by edit below shows how few); a model trained with "
    "`train --invariance 0.05` finds them (docs/BENCHMARKS.md, Near-duplicates)")


def prepare(cfg: NeighboursConfig) -> NeighboursPlan:
    """Every check that needs no Ray: the latents, the model and data for calibration, the output folder.

    Before its first write (the claim on the output folder) it takes the folder's lease and
    holds it from then on: a second job into the same folder refuses.
    """
    storage.check_apart({"--latents": cfg.latents_url, "--data": cfg.data_url}, {"--out": cfg.out_url})
    latents = ShardList.under(cfg.latents_url)
    dim, dtype, metadata = _latent_shape(latents)
    completion = require_finished(cfg.latents_url, cfg.allow_partial)
    data = None
    if cfg.given_threshold is None:
        meta = read_checkpoint_meta(cfg.model_url)
        check_model_fits(cfg.latents_url, meta, cfg.model_url)
        if not (meta.get("training") or {}).get("invariance"):
            print(NOT_INVARIANT_NOTE, flush=True)
        data = _calibration_data(cfg)
    rows = latents.rows
    index_plan = plan_index(rows, dim, cfg.index, cfg.flat_max_rows)
    record = {"latents_url": cfg.latents_url, "fingerprint": fingerprint(latents), "latent_rows": rows,
              "latent_dtype": dtype, "model_sha256": metadata.get("weights_sha256"), "model": metadata.get("model"),
              # the embed job's forward pass: the calibration and queries encode images the same way
              "precision": metadata.get("precision", "float32"),
              "partial": not completion.finished}
    check_output_folder(cfg, record, claim=False)  # refused before the lease: nothing written into another's folder
    lease = Lease.acquire(cfg.out_url, "neighbours job")
    with lease.released_on_error():
        finished = check_output_folder(cfg, record)  # again, under the lease, and claimed
    return NeighboursPlan(cfg=cfg, latents=latents, rows_in=rows, dim=dim, latent_dtype=dtype, index_plan=index_plan,
                          latents_record=record, data=data, finished=finished, partial=completion.partial_note,
                          lease=lease)


# ---------------------------------------------------------------- run


def _read_record(cfg: NeighboursConfig) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(cfg.out_url, RUN_FILE)))


def _write_record(cfg: NeighboursConfig, record: dict[str, Any]) -> None:
    storage.write_text(storage.join(cfg.out_url, RUN_FILE), json_text(record))


def _threshold(plan: NeighboursPlan, record: dict[str, Any]) -> dict[str, Any]:
    """The duplicate threshold record: as recorded by an earlier run, given, or calibrated now."""
    cfg = plan.cfg
    if record.get("threshold"):
        return record["threshold"]
    if cfg.given_threshold is not None:
        threshold = {"value": cfg.given_threshold, "rule": "given (--duplicate-threshold)"}
    else:
        print(f"neighbours: calibrating the duplicate threshold on up to {cfg.calibration_images} images of "
              f"{cfg.data_url} and a copy of each", flush=True)
        threshold = calibrate_threshold(cfg.model_url, plan.data, _calibration_columns(cfg, plan.data),
                                        cfg.calibration_images, cfg.seed, plan.latent_dtype,
                                        cfg.max_false_positive_rate, cfg.positive_quantile, cfg.edits,
                                        plan.latents_record["precision"])
        print(f"neighbours: duplicate threshold {threshold['value']:.4g} ({threshold['rule']}): recall "
              f"{threshold['recall_on_positives']:.3f} on copies, false-positive rate "
              f"{threshold['false_positive_rate_on_negatives']:.4f} on other images; "
              f"{threshold['copies_failed']} copies failed", flush=True)
        print("neighbours: recall by edit: " + ", ".join(
            f"{kind} {got['recall']:.2f}" for kind, got in threshold["recall_by_edit"].items() if got["copies"]),
            flush=True)
    record["threshold"] = threshold
    _write_record(cfg, record)
    return threshold


def _index(plan: NeighboursPlan) -> dict[str, Any]:
    """The index's settings: built now, or as an earlier run of this job left it complete."""
    settings_url = storage.join(plan.cfg.out_url, INDEX_SETTINGS_FILE)
    if storage.exists(settings_url):
        print(f"neighbours: reusing the index in {plan.cfg.out_url}", flush=True)
        return json.loads(storage.read_text(settings_url))
    p = plan.index_plan
    print(f"neighbours: building a {p.describe()}: about {p.estimated_bytes() / 2**20:,.1f} MiB in memory on the "
          "driver and on each search actor, plus the ids", flush=True)
    return build_index(plan.cfg.latents_url, plan.cfg.out_url, p, plan.cfg.target_recall, plan.latents_record,
                       log=lambda line: print(line, flush=True))


def _part_names():
    """part-<write uuid>_<task>.parquet: the neighbour rows' prefix, unique per write as checkpointing needs."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{PART_PREFIX}{write_uuid}_{task_index:06}.parquet"

    return PartNames()


def _search(plan: NeighboursPlan) -> dict[str, int]:
    """Stream the latents through the search actors into part-*.parquet, exactly once; rows by node."""
    import pyarrow.fs as pafs
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy
    from ray.data.checkpoint import CheckpointConfig

    cfg = plan.cfg
    fs, out_path = storage.arrow_filesystem(cfg.out_url)
    resuming = fs.get_file_info(posixpath.join(out_path, CHECKPOINT_DIR)).type != pafs.FileType.NotFound
    resources = plan_actor_pool(ray.cluster_resources(), resuming, cfg.actors, gpu=False,
                                torch_threads=cfg.threads, batch_size=cfg.batch_size or SEARCH_BATCH_SIZE,
                                node_cpus=largest_node_cpus(), threads_per_actor=SEARCH_THREADS_PER_ACTOR)
    print(f"neighbours: searching the {cfg.k} nearest of {plan.rows_in:,} rows on {resources.actors} actor(s) x "
          f"{resources.cpus_per_actor:g} CPU, {resources.torch_threads} faiss threads, batches of "
          f"{resources.batch_size}{', resuming' if resuming else ''} -> {cfg.out_url}", flush=True)
    ctx = ray.data.DataContext.get_current()
    checkpoint = CheckpointConfig(id_column="id", checkpoint_path=posixpath.join(out_path, CHECKPOINT_DIR),
                                  override_filesystem=fs, delete_checkpoint_on_success=False)
    checkpoint.checkpoint_actor_pool_max_size = 1  # each holds a CPU; one filters fast enough
    ctx.checkpoint_config = checkpoint
    # Each written file is one commit: about rows_per_file rows, not Ray's default 128 MiB blocks.
    saved_block_size = ctx.target_max_block_size
    ctx.target_max_block_size = max(64 * 1024, cfg.rows_per_file * (64 + 40 * cfg.k))
    progress = Progress("neighbours", None if resuming else plan.rows_in)
    try:
        with TallyWatch(progress) as watch:
            columns = [c for c in ("id", "latent", "latent_scale", "error") if c in _schema_names(plan.latents)]
            ds = read_parquet(plan.latents.paths, plan.latents.arrow_fs, columns, num_cpus=resources.task_cpus,
                              override_num_blocks=len(plan.latents.files))
            ds = ds.map_batches(
                NeighbourSearch, batch_format="numpy", batch_size=resources.batch_size,
                fn_constructor_kwargs=dict(index_url=cfg.out_url, k=cfg.k, threads=resources.torch_threads,
                                           on_rows=watch.client),
                compute=ActorPoolStrategy(size=resources.actors), num_cpus=resources.cpus_per_actor)
            ds.write_parquet(out_path, filesystem=fs, filename_provider=_part_names(),
                             min_rows_per_file=min(cfg.rows_per_file, max(plan.rows_in, 1)),
                             ray_remote_args={"num_cpus": resources.task_cpus})  # write_parquet has no num_cpus=
    finally:
        ctx.checkpoint_config = None
        ctx.target_max_block_size = saved_block_size
    return watch.by_node


def _schema_names(latents: ShardList) -> list[str]:
    return pq.read_schema(latents.paths[0], filesystem=latents.arrow_fs).names


def _count_rows(cfg: NeighboursConfig) -> tuple[int, int]:
    """(rows, rows without neighbours) in the written neighbour files, from their error column."""
    fs, paths = neighbour_files(cfg.out_url)
    rows = without = 0
    for path in paths:
        errors = pq.read_table(path, filesystem=fs, columns=["error"]).column("error")
        rows += len(errors)
        without += len(errors) - errors.null_count
    return rows, without


def run(plan: NeighboursPlan) -> NeighboursSummary:
    """Threshold, index, search (Ray), pairs and clusters, success marker: the job on the connected cluster."""
    started = time.perf_counter()
    cfg = plan.cfg
    record = _read_record(cfg)
    if plan.finished:
        print(f"{cfg.out_url} is already complete for these latents and settings; nothing to do", flush=True)
        return NeighboursSummary(**record["summary"])
    if plan.partial:
        print(f"neighbours: {plan.partial}: indexing the rows written so far (--allow-partial)", flush=True)
    threshold = _threshold(plan, record)
    settings = _index(plan)
    by_node = _search(plan)
    rows_out, without = _count_rows(cfg)
    pairs = duplicate_pairs(cfg.out_url, threshold["value"])
    groups = clusters(pairs, cfg.latents_url)
    storage.write_bytes(storage.join(cfg.out_url, PAIRS_FILE), table_bytes(pairs))
    storage.write_bytes(storage.join(cfg.out_url, CLUSTERS_FILE), table_bytes(groups))
    seconds = time.perf_counter() - started
    summary = NeighboursSummary(
        rows_in=plan.rows_in, rows_out=rows_out, rows_without_latent=without, k=cfg.k,
        index={key: settings.get(key) for key in ("kind", "rows", "bytes", "nlist", "m", "nbits", "refine", "nprobe",
                                                  "recall_at_10")},
        threshold=threshold["value"], threshold_source=threshold["rule"], seconds=seconds,
        rows_per_s=plan.rows_in / max(seconds, 1e-9), out=cfg.out_url, partial_latents=plan.latents_record["partial"],
        rows_by_node=by_node, **cluster_summary(pairs, groups))
    record["summary"] = summary.to_dict()
    _write_record(cfg, record)
    if rows_out != plan.rows_in:  # never mark such an output finished
        raise JobFailed(f"{plan.rows_in} latent rows but {rows_out} neighbour rows in {cfg.out_url}", summary)
    plan.lease.check()
    storage.write_text(storage.join(cfg.out_url, SUCCESS_FILE), json_text(summary.to_dict()))
    return summary


def neighbours(cfg: NeighboursConfig) -> NeighboursSummary:
    """Run the neighbours job described by `cfg` on the connected Ray cluster."""
    return run_prepared(prepare, run, cfg)
