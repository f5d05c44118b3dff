"""Embedding and scoring: shards -> decode (CPU tasks) -> Embedder (actor pool) -> latent Parquet.

`Embedder` is the mapper: a callable class whose `__init__` loads the checkpoint once and
whose `__call__` turns a decoded batch (a plain dict of NumPy arrays, as `decode_rows`
makes it) into latent rows. It runs without Ray too: `embed_reference` is the plain loop the
tests hold the Ray job to.

Output: the latent dataset (`pipeline.latents`; README, "Data contracts"), one row per
input row.

The job is two steps: `prepare` lists the shards once, reads their footers once and checks
the columns, ids, model and output folder without Ray; `run` streams the pipeline on the
connected cluster. `embed` does both.

Exactly once: Ray Data's id-based checkpointing (`ray.data.checkpoint.CheckpointConfig`,
two-phase commit of each written file) records finished ids under `<out>/_checkpoint`;
a rerun after a kill skips them and deletes files whose commit never happened.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.checkpoint import read_checkpoint_meta, scores_of
from pipeline.datasets import decode_rows, read_shards
from pipeline.errors import InputError, JobFailed
from pipeline.images import RESIZE_POLICIES, decode_batch
from pipeline.inference import PRECISIONS, ImageScorer, load_inference_model, to_input
from pipeline.latents import (
    CHECKPOINT_DIR,
    DEFAULT_LATENT_DTYPE,
    LATENT_DTYPES,
    METADATA_KEY,
    RUN_FILE,
    SUCCESS_FILE,
    fixed_size_list,
    latent_files,
    latent_write_options,
    quantize_latents,
    write_success,
)
from pipeline.lease import Lease, run_prepared
from pipeline.model import AutoencoderConfig
from pipeline.progress import Progress, TallyClient, TallyWatch
from pipeline.resources import (
    CPU_BATCH_SIZE,
    ResourcePlan,
    input_size,
    largest_node_cpus,
    object_store_budget,
    plan_actor_pool,
    pool_setting_problems,
)
from pipeline.scores import named_scores, parse_scores
from pipeline.shards import (
    Columns,
    ShardList,
    check_columns,
    check_unique_ids,
    first_images,
    id_strings,
    implied_id_column,
)
from pipeline.thresholds import STREAMING_POLICIES, Calibration, default_score, parse_threshold, resolve_threshold

# Settings that decide the output's content: a rerun into the same folder must match them.
OUTPUT_KEYS = ("data_url", "latent_dtype", "threshold", "score", "scores", "passthrough", "id_column",
               "image_column", "resize")


class Embedder:
    """Decoded batch -> latent rows with their scores. Loads the model once; runs with or without Ray.

    `score` names the score whose value above `threshold` sets `is_anomaly` (None: the
    calibration's default score); `scores` is `--scores` (None: what `score` reads, and mse).
    """

    def __init__(self, model_url: str, latent_dtype: str = DEFAULT_LATENT_DTYPE, threshold: float = math.inf,
                 passthrough: Sequence[str] = (), device: str | None = None, torch_threads: int | None = None,
                 metadata: dict[str, Any] | None = None, on_rows: Callable[[int], None] | None = None,
                 score: str | None = None, scores: str | None = None, precision: str = "auto"):
        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, checkpoint = load_inference_model(model_url, device=self.device)
        calibration = Calibration.from_dict(checkpoint.calibration) if checkpoint.calibration else None
        self.score = score or (calibration.default_score if calibration else "mse")
        fused_from = calibration.fused_from if calibration else ()
        wanted = parse_scores(scores, checkpoint.scores, self.score, fused_from)
        self.scorer = ImageScorer(model, checkpoint.bank, calibration, wanted, precision, checkpoint.patch_bank,
                                  checkpoint.colours)
        self.config = checkpoint.config
        self.latent_dtype = latent_dtype
        self.threshold = threshold
        self.passthrough = list(passthrough)
        meta = {**(metadata or {"model": model_url, "weights_sha256": checkpoint.weights_sha256}),
                "scores": list(self.scorer.score_names), "precision": self.scorer.precision}
        self.metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}
        self.on_rows = on_rows  # progress: told the rows of each finished batch

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = id_strings(batch["id"])
        # A column of only None comes back from Ray's Arrow blocks as float NaN: keep strings only.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        n, d = len(ids), self.config.latent_dim
        z = np.zeros((n, d), np.float32)
        scores = {name: np.full(n, np.nan, np.float32) for name in self.scorer.score_names}
        if ok.any():
            x = to_input(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device))
            out = self.scorer(x, list(ids[ok]))
            z[ok] = out["z"]
            for name, values in out["scores"].items():
                scores[name][ok] = values
        latent, scale = quantize_latents(z, self.latent_dtype)
        columns = {
            "id": pa.array(list(ids), pa.string()),
            "latent": fixed_size_list(latent, ok),
        }
        if scale is not None:
            columns["latent_scale"] = pa.array(scale, mask=~ok)
        for name, values in scores.items():
            columns[name] = pa.array(values, mask=~ok)
        columns["is_anomaly"] = pa.array(scores[self.score] > self.threshold, mask=~ok)
        columns["error"] = pa.array(errors, pa.string())
        for name in self.passthrough:
            if name not in columns:
                columns[name] = pa.array(batch[name])
        if self.on_rows is not None:
            self.on_rows(n)
        return pa.table(columns).replace_schema_metadata(self.metadata)


@dataclass(frozen=True)
class EmbedConfig:
    """Everything an embed run depends on; validated when built (InputError)."""

    data_url: str
    model_url: str
    out_url: str
    latent_dtype: str = DEFAULT_LATENT_DTYPE
    threshold: str = "quantile:0.99"
    score: str | None = None  # the score that sets is_anomaly; None: the model's default (its calibration's)
    scores: str | None = None  # --scores: "all", or names; None: what `score` reads, and mse (`prepare` lists them)
    precision: str = "auto"  # the forward pass's (pipeline.inference.PRECISIONS): auto = bfloat16 where native
    passthrough: tuple[str, ...] = ()
    id_column: str = "id"
    image_column: str = "image"
    resize: str | None = None  # None: the resize policy the model was trained with
    batch_size: int | None = None  # None: CPU_BATCH_SIZE on CPU actors, GPU_BATCH_SIZE on GPUs
    actors: int | None = None
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    torch_threads: int | None = None
    rows_per_file: int = 20_000
    model_sha256: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "passthrough", tuple(self.passthrough))
        problems = []
        if self.latent_dtype not in LATENT_DTYPES:
            problems.append(f"latent_dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.resize is not None and self.resize not in RESIZE_POLICIES:
            problems.append(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        problems += pool_setting_problems(self.batch_size, self.actors, self.torch_threads, self.rows_per_file)
        if problems:
            raise InputError("invalid embed settings: " + "; ".join(problems))
        parse_threshold(self.threshold, STREAMING_POLICIES)
        if self.scores is not None:
            named_scores(self.scores)

    @property
    def columns(self) -> Columns:
        return Columns(id=self.id_column, image=self.image_column)

    @property
    def keep(self) -> list[str]:
        """Input columns carried to the output besides `id`. The input id column is kept under its
        own name too: Ray's checkpoint filter tracks rows by one column name, in and out."""
        return [c for c in dict.fromkeys([*self.passthrough, self.id_column]) if c != "id"]


@dataclass
class EmbedSummary:
    rows_in: int
    rows_out: int
    error_rows: int
    flagged_rows: int
    score: str
    threshold: float
    seconds: float
    images_per_s: float
    out: str
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    rows_by_node: dict[str, int] = field(default_factory=dict)  # rows this run embedded, by Ray node id
    tiles_per_s: float | None = None  # a tiled model's tiles scored a second (None: whole images)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _output_row_bytes(cfg: EmbedConfig, model_config: dict[str, Any]) -> int:
    """A rough size of one output row: the latent plus scores, ids and passthrough."""
    latent = model_config["latent_dim"] * {"float32": 4, "float16": 2, "int8": 1}[cfg.latent_dtype]
    return latent + 64 + 32 * len(cfg.passthrough)


def command_line(cfg: EmbedConfig) -> str:
    """The `python -m jobs.embed ...` command that makes (or finishes) this output."""
    default = EmbedConfig(cfg.data_url, cfg.model_url, cfg.out_url)
    options = [f"--data {shlex.quote(cfg.data_url)}", f"--model {shlex.quote(cfg.model_url)}",
               f"--out {shlex.quote(cfg.out_url)}"]
    for name in ("latent_dtype", "threshold", "score", "scores", "id_column", "image_column", "resize"):
        value = getattr(cfg, name)
        if value != getattr(default, name) and value is not None:
            options.append(f"--{name.replace('_', '-')} {shlex.quote(str(value))}")
    if cfg.passthrough:
        options.append(f"--passthrough {shlex.quote(','.join(cfg.passthrough))}")
    return "python -m jobs.embed " + " ".join(options)


def check_output_folder(cfg: EmbedConfig, rows_in: int = 0) -> bool:
    """Claim `out_url` for this model and these settings; True if a previous run already finished.

    The claim records the input's row count and the command that finishes the folder, so
    that a reader of an unfinished folder can say both.
    """
    run_url = storage.join(cfg.out_url, RUN_FILE)
    mine = {k: v for k, v in asdict(cfg).items() if k in (*OUTPUT_KEYS, "model_sha256")}
    mine["passthrough"] = list(mine["passthrough"])
    if storage.exists(run_url):
        try:
            previous = json.loads(storage.read_text(run_url))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{run_url} is not an embed job's claim ({e}): use a new --out") from e
        if previous.get("model_sha256") != cfg.model_sha256:
            raise InputError(
                f"{cfg.out_url} holds results of another model (weights {previous.get('model_sha256', '?')[:12]}, "
                f"this one {cfg.model_sha256[:12]}): use a new --out")
        changed = [k for k in OUTPUT_KEYS if previous.get(k) != mine[k]]
        if changed:
            raise InputError(f"{cfg.out_url} holds results made with other settings ({', '.join(changed)}): "
                             "use a new --out")
        return storage.exists(storage.join(cfg.out_url, SUCCESS_FILE))
    if storage.list_files(cfg.out_url):
        raise InputError(f"{cfg.out_url} already holds Parquet files that are not this job's: use a new --out")
    storage.write_text(run_url, json.dumps({**mine, "rows_in": rows_in, "command": command_line(cfg)},
                                           indent=2, sort_keys=True))
    return False


def check_channels(shards: ShardList, image_column: str, channels: int) -> None:
    """A grayscale model cannot serve colour data without throwing its colour away: refuse it."""
    if channels == 3:
        return
    pixels, errors = decode_batch(first_images(shards, image_column, 32), 32, 3)
    good = pixels[[e is None for e in errors]].astype(np.int16)
    if good.size and np.abs(good - good.mean(axis=3, keepdims=True)).max() > 8:
        raise InputError("the model is grayscale (1 channel) but the data holds colour images: "
                         "train a 3-channel model for this data")


@dataclass(frozen=True)
class EmbedPlan:
    """What `prepare` found: the full config, the shards, the model and the threshold."""

    cfg: EmbedConfig  # resize and model_sha256 filled in
    shards: ShardList
    rows_in: int
    model_config: dict[str, Any]
    threshold: float  # on `cfg.score`
    finished: bool  # the output folder already holds this job's complete result
    lease: Lease  # this job's hold on the output folder; the caller releases it (`embed` does)


def prepare(cfg: EmbedConfig) -> EmbedPlan:
    """Every check that needs no Ray: model, threshold, columns, ids, channels, the output folder.

    Before its first write (the claim on the output folder) it takes the folder's lease and
    holds it from then on: a second job into the same folder refuses.
    """
    storage.check_apart({"--data": cfg.data_url}, {"--out": cfg.out_url})
    meta = read_checkpoint_meta(cfg.model_url)
    model_training = meta.get("training") or {}
    resize = cfg.resize or model_training.get("preprocessing", {}).get("resize") or "pad"
    score = cfg.score or default_score(model_training.get("calibration"))
    if score not in scores_of(meta):
        raise InputError(f"--score {score}: the model at {cfg.model_url} computes {', '.join(scores_of(meta))}")
    scores = parse_scores(cfg.scores, scores_of(meta), score,
                          (model_training.get("calibration") or {}).get("fused_from", ()))
    threshold = resolve_threshold(parse_threshold(cfg.threshold, STREAMING_POLICIES),
                                  model_training.get("calibration") or {}, score=score)
    shards = ShardList.under(cfg.data_url)
    cfg = replace(cfg, id_column=implied_id_column(shards, cfg.id_column))
    check_columns(shards, cfg.columns, cfg.passthrough)
    check_unique_ids(shards, cfg.id_column)
    check_channels(shards, cfg.image_column, meta["model"]["channels"])
    cfg = replace(cfg, resize=resize, score=score, scores=",".join(scores), model_sha256=meta.get("weights_sha256", ""))
    lease = Lease.acquire(cfg.out_url, "embed job")
    with lease.released_on_error():
        finished = check_output_folder(cfg, shards.rows)
    return EmbedPlan(cfg=cfg, shards=shards, rows_in=shards.rows, model_config=meta["model"], threshold=threshold,
                     finished=finished, lease=lease)


def _describe(plan: EmbedPlan, resources: ResourcePlan, resuming: bool) -> str:
    cfg, r = plan.cfg, resources
    gpus = f" + {r.gpus_per_actor:g} GPU" if r.gpus_per_actor else ""
    return (f"embedding {plan.rows_in:,} rows with {plan.model_config['arch']} model ({cfg.model_url}) on "
            f"{r.actors} actor(s) x {r.cpus_per_actor:g} CPU{gpus}, {r.torch_threads} torch threads, batches of "
            f"{r.batch_size}{', resuming' if resuming else ''}; anomaly: {cfg.score} > {plan.threshold:.6g} "
            f"({cfg.threshold}) -> {cfg.out_url}")


def _pipeline(plan: EmbedPlan, resources: ResourcePlan, out_fs, out_path: str, on_rows: TallyClient) -> None:
    """read (one block per shard) -> decode (CPU tasks) -> Embedder (actor pool) -> Parquet."""
    from ray.data import ActorPoolStrategy

    cfg, model_config = plan.cfg, plan.model_config
    # One block per shard: each written file commits its rows, so a kill loses little.
    ds = read_shards(plan.shards, cfg.columns, extra=cfg.keep, num_cpus=resources.task_cpus,
                     override_num_blocks=len(plan.shards.files))
    ds = ds.map_batches(
        decode_rows, batch_format="numpy", batch_size=resources.batch_size, num_cpus=resources.task_cpus,
        fn_kwargs=dict(columns=cfg.columns, image_size=input_size(model_config),
                       channels=model_config["channels"], resize=cfg.resize, keep=cfg.keep))
    ds = ds.map_batches(
        Embedder, batch_format="numpy", batch_size=resources.batch_size,
        fn_constructor_kwargs=dict(
            model_url=cfg.model_url, latent_dtype=cfg.latent_dtype, threshold=plan.threshold, passthrough=cfg.keep,
            torch_threads=resources.torch_threads, device="cuda" if resources.gpus_per_actor else "cpu",
            metadata={"model": cfg.model_url, "weights_sha256": cfg.model_sha256, "score": cfg.score,
                      "threshold": plan.threshold, "threshold_spec": cfg.threshold, "latent_dtype": cfg.latent_dtype,
                      "model_config": model_config},
            on_rows=on_rows, score=cfg.score, scores=cfg.scores, precision=cfg.precision),
        compute=ActorPoolStrategy(size=resources.actors), num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor)
    ds.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=min(cfg.rows_per_file, plan.rows_in),
                     **latent_write_options(cfg.latent_dtype, cfg.keep),
                     ray_remote_args={"num_cpus": resources.task_cpus})  # write_parquet has no num_cpus=


def run(plan: EmbedPlan) -> EmbedSummary:
    """Stream the embedding pipeline on the connected Ray cluster; write the success marker."""
    import ray
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    started = time.perf_counter()
    cfg = plan.cfg
    if plan.finished:
        print(f"{cfg.out_url} is already complete for this model and settings; nothing to do", flush=True)
        return summarize(cfg, plan.rows_in, plan.threshold, time.perf_counter() - started)
    fs, out_path = storage.arrow_filesystem(cfg.out_url)
    resuming = fs.get_file_info(storage.join(out_path, CHECKPOINT_DIR)).type != pafs.FileType.NotFound
    resources = plan_actor_pool(ray.cluster_resources(), resuming, cfg.actors, cfg.gpu, cfg.torch_threads,
                                cfg.batch_size, node_cpus=largest_node_cpus(), input_size=input_size(plan.model_config))
    print(_describe(plan, resources, resuming), flush=True)

    ctx = ray.data.DataContext.get_current()
    checkpoint = CheckpointConfig(
        id_column=cfg.id_column, checkpoint_path=storage.join(out_path, CHECKPOINT_DIR), override_filesystem=fs,
        delete_checkpoint_on_success=False)
    checkpoint.checkpoint_actor_pool_max_size = 1  # each holds a CPU; one filters fast enough
    ctx.checkpoint_config = checkpoint
    # Each written file is one commit of the exactly-once protocol: blocks of about
    # rows_per_file output rows bound what a kill can cost (Ray's default, 128 MiB of
    # latents, would be hundreds of thousands of rows).
    saved_block_size, saved_limits = ctx.target_max_block_size, ctx.execution_options.resource_limits
    ctx.target_max_block_size = max(64 * 1024, cfg.rows_per_file * _output_row_bytes(cfg, plan.model_config))
    ctx.execution_options.resource_limits = saved_limits.copy(object_store_memory=min(
        saved_limits.object_store_memory, object_store_budget(resources, plan.model_config)))
    # A resumed run skips rows written before, and only Ray's checkpoint filter knows how many.
    progress = Progress("embed", None if resuming else plan.rows_in)
    try:
        with TallyWatch(progress) as watch:
            _pipeline(plan, resources, fs, out_path, watch.client)
    finally:
        ctx.checkpoint_config = None
        ctx.target_max_block_size = saved_block_size
        ctx.execution_options.resource_limits = saved_limits
    summary = summarize(cfg, plan.rows_in, plan.threshold, time.perf_counter() - started)
    summary.rows_by_node = watch.by_node
    grid = AutoencoderConfig.from_dict(plan.model_config).tile_grid()
    if grid is not None:
        summary.tiles_per_s = summary.images_per_s * grid.count
    if summary.rows_out != summary.rows_in:  # never mark such an output finished
        raise JobFailed(f"{summary.rows_in} rows in but {summary.rows_out} rows out in {cfg.out_url}", summary)
    plan.lease.check()
    write_success(cfg.out_url, summary.to_dict())
    return summary


def embed(cfg: EmbedConfig) -> EmbedSummary:
    """Run the embedding job described by `cfg` on the connected Ray cluster."""
    return run_prepared(prepare, run, cfg)


def summarize(cfg: EmbedConfig, rows_in: int, threshold: float, seconds: float) -> EmbedSummary:
    """Counts from the written output (id, error and flag columns only, streamed)."""
    fs, paths = latent_files(cfg.out_url)
    rows_out = error_rows = flagged = 0
    reasons: dict[str, int] = {}
    if paths:
        for batch in pads.dataset(paths, filesystem=fs, format="parquet").to_batches(columns=["error", "is_anomaly"]):
            rows_out += batch.num_rows
            errors = batch.column("error")
            error_rows += batch.num_rows - errors.null_count
            flagged += int(pc.sum(batch.column("is_anomaly")).as_py() or 0)
            for reason in errors.drop_null().to_pylist():
                reasons[reason] = reasons.get(reason, 0) + 1
    return EmbedSummary(rows_in=rows_in, rows_out=rows_out, error_rows=error_rows, flagged_rows=flagged,
                        score=cfg.score or "mse", threshold=threshold, seconds=seconds, images_per_s=rows_in / max(seconds, 1e-9),
                        out=cfg.out_url, errors_by_reason=reasons)


def embed_reference(cfg: EmbedConfig, threshold: float) -> pa.Table:
    """The same job as a plain single-process loop: the reference the Ray job is tested against."""
    meta = read_checkpoint_meta(cfg.model_url)
    model_config = meta["model"]
    resize = cfg.resize or (meta.get("training") or {}).get("preprocessing", {}).get("resize") or "pad"
    embedder = Embedder(cfg.model_url, cfg.latent_dtype, threshold, cfg.keep, device="cpu",
                        torch_threads=cfg.torch_threads, score=cfg.score, scores=cfg.scores,
                        precision=cfg.precision)
    shards = ShardList.under(cfg.data_url)
    wanted = list(dict.fromkeys([cfg.id_column, cfg.image_column, *cfg.keep]))
    batch_size = cfg.batch_size or CPU_BATCH_SIZE
    tables = []
    for path in shards.paths:
        with shards.arrow_fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=wanted):
                rows = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in wanted}
                decoded = decode_rows(rows, cfg.columns, input_size(model_config), model_config["channels"],
                                      resize, cfg.keep)
                tables.append(embedder(decoded))
    return pa.concat_tables(tables)
