"""Embedding and scoring: shards -> decode (CPU tasks) -> Embedder (actor pool) -> latent Parquet.

`Embedder` is the mapper: a callable class whose `__init__` loads the checkpoint once and
whose `__call__` turns a decoded batch (a plain dict of NumPy arrays, as `decode_rows`
makes it) into latent rows. It runs without Ray too: `embed_reference` is the plain loop the
tests hold the Ray job to.

Output (the latent dataset contract in DESIGN.md), one row per input row:
    id, latent (fixed_size_list<float32|float16|int8>), latent_scale (int8 only),
    mse, ssim_error, is_anomaly, error, <passthrough columns>
and each file's Parquet metadata records the model under the key `squeeze`.

Exactly once: Ray Data's id-based checkpointing (`ray.data.checkpoint.CheckpointConfig`,
two-phase commit of each written file) records finished ids under `<out>/_checkpoint`;
a rerun after a kill skips them and deletes files whose commit never happened.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, read_checkpoint_meta
from pipeline.datasets import decode_rows, read_shards
from pipeline.model import fuse_for_inference
from pipeline.reconstruction import mse_per_image, ssim_error_per_image
from pipeline.shards import Columns, check_columns, check_unique_ids, count_rows
from pipeline.train import threshold_from_calibration

LATENT_DTYPES = ("float32", "float16", "int8")
METADATA_KEY = b"squeeze"
RUN_FILE = "_embed.json"
SUCCESS_FILE = "_SUCCESS.json"
CHECKPOINT_DIR = "_checkpoint"
# Settings that decide the output's content: a rerun into the same folder must match them.
OUTPUT_KEYS = ("data", "latent_dtype", "threshold", "passthrough", "id_column", "image_column", "resize")


class EmbedInputError(ValueError):
    """The job cannot run as asked; raised before any work starts."""


def parse_threshold(spec: str) -> tuple[str, float]:
    """'quantile:0.99' or 'value:0.02' -> (kind, number)."""
    kind, _, number = spec.partition(":")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if kind not in ("quantile", "value") or math.isnan(value):
        raise EmbedInputError(f"--threshold must be quantile:Q or value:X, got {spec!r}")
    if kind == "quantile" and not 0.0 <= value <= 1.0:
        raise EmbedInputError(f"quantile threshold must be in [0, 1], got {value}")
    return kind, value


def resolve_threshold(spec: str, calibration: dict[str, Any]) -> float:
    """The reconstruction-MSE threshold a spec names, using the model's calibration for quantiles."""
    kind, value = parse_threshold(spec)
    if kind == "value":
        return value
    try:
        return threshold_from_calibration(calibration, value)
    except ValueError as e:
        raise EmbedInputError(str(e)) from e


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


def dequantize_latents(latent: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored latents -> (N, D) float32."""
    z = latent.astype(np.float32)
    return z * scale[:, None].astype(np.float32) if scale is not None else z


def _fixed_size_list(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(N, D) array -> fixed_size_list<D>, null where `valid` is False."""
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(~valid))


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


class Embedder:
    """Decoded batch -> latent rows. Loads the model once; runs with or without Ray."""

    def __init__(self, model_url: str, latent_dtype: str = "float32", threshold: float = math.inf,
                 passthrough: Sequence[str] = (), device: str | None = None, torch_threads: int | None = None,
                 metadata: dict[str, Any] | None = None):
        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {latent_dtype!r}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        checkpoint = load_checkpoint(model_url, device=self.device)
        self.model = fuse_for_inference(checkpoint.model).to(memory_format=torch.channels_last)
        self.config = checkpoint.config
        self.latent_dtype = latent_dtype
        self.threshold = threshold
        self.passthrough = list(passthrough)
        meta = dict(metadata or {"model": model_url, "weights_sha256": checkpoint.weights_sha256})
        meta["node_id"] = _node_id()  # which machine wrote each file, for provenance
        self.metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = np.asarray(batch["id"]).astype(str)
        # A column of only None comes back from Ray's Arrow blocks as float NaN: keep strings only.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        n, d = len(ids), self.config.latent_dim
        z = np.zeros((n, d), np.float32)
        mse = np.full(n, np.nan, np.float32)
        ssim_error = np.full(n, np.nan, np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device)
            x = pixels.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, S, S), channels_last
            out = self.model(x)
            z[ok] = out["z"].float().cpu().numpy()
            mse[ok] = mse_per_image(x, out["x_hat"]).cpu().numpy()
            ssim_error[ok] = ssim_error_per_image(x, out["x_hat"]).cpu().numpy()
        latent, scale = quantize_latents(z, self.latent_dtype)
        columns = {
            "id": pa.array(ids, pa.string()),
            "latent": _fixed_size_list(latent, ok),
        }
        if scale is not None:
            columns["latent_scale"] = pa.array(scale, mask=~ok)
        columns["mse"] = pa.array(mse, mask=~ok)
        columns["ssim_error"] = pa.array(ssim_error, mask=~ok)
        columns["is_anomaly"] = pa.array(mse > self.threshold, mask=~ok)
        columns["error"] = pa.array(errors, pa.string())
        for name in self.passthrough:
            if name not in columns:
                columns[name] = pa.array(batch[name])
        return pa.table(columns).replace_schema_metadata(self.metadata)


@dataclass(frozen=True)
class EmbedConfig:
    data: str
    model: str
    out: str
    latent_dtype: str = "float32"
    threshold: str = "quantile:0.99"
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

    @property
    def columns(self) -> Columns:
        return Columns(id=self.id_column, image=self.image_column)


@dataclass
class EmbedSummary:
    rows_in: int
    rows_out: int
    error_rows: int
    flagged_rows: int
    threshold: float
    seconds: float
    images_per_s: float
    out: str
    errors_by_reason: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResourcePlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    task_cpus: float  # logical CPUs of each read, decode and write task
    batch_size: int  # images per model call


# Images per model call. On CPUs, batches of 256 64x64 images ran at ~550 img/s against ~900
# at 128: the larger activations go to fresh mmap'd memory on every call, and the kernel's
# page faults took as much time as the convolutions (bench: docs/BENCHMARKS.md). GPUs want
# large batches (throughput still rose from 1,024 to 4,096 on an H200).
CPU_BATCH_SIZE = 128
GPU_BATCH_SIZE = 1024


def plan_resources(resources: dict[str, float], resuming: bool, actors: int | None = None,
                   gpu: bool | None = None, torch_threads: int | None = None,
                   batch_size: int | None = None) -> ResourcePlan:
    """Actor pool and task sizes from the cluster's resources.

    An actor pool that takes every CPU starves the other operators and the job hangs
    ("3/2 CPU", DESIGN.md). The actors leave room for one read and one write task at all
    times, and on a resumed run for the checkpoint filter, an actor of Ray Data's own that
    holds a whole CPU. Logical CPUs are scheduling tokens here; each actor's torch thread
    count decides its real use, so on a 2-CPU machine a resumed run gives the model actor
    no logical CPU at all and still computes on both cores.
    """
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    task_cpus = 0.5 if cpus <= 4 else 1.0
    available = cpus - (1.0 if resuming else 0.0)  # the checkpoint filter
    if available < 2 * task_cpus:
        raise EmbedInputError(
            f"resuming needs a cluster of at least {1 + 2 * task_cpus:g} CPUs (Ray Data's checkpoint filter "
            f"holds a whole CPU, reading and writing {2 * task_cpus:g}); this one has {cpus:g}")
    use_gpu = gpus >= 1 if gpu is None else gpu
    if use_gpu:
        # Autoscaling GPU workers may not be up yet: at least one actor, placed when they are.
        actors = actors or max(1, int(gpus))
        return ResourcePlan(actors, 0.0, 1.0, torch_threads or 4, task_cpus, batch_size or GPU_BATCH_SIZE)
    # One actor per 4 CPUs (at least one), each with a thread per CPU it stands for.
    actors = actors or max(1, int(available // 4))
    per_actor = math.floor((available - 2 * task_cpus) / actors * 2) / 2
    per_actor = min(4.0, per_actor) if per_actor >= 0.5 else 0.0
    threads = torch_threads or max(1, int(cpus // actors))
    return ResourcePlan(actors, per_actor, 0.0, threads, task_cpus, batch_size or CPU_BATCH_SIZE)


# The least object-store memory the job's blocks in flight may fill (see object_store_budget).
MIN_OBJECT_STORE_BUDGET = 256 * 2**20


def object_store_budget(plan: ResourcePlan, model_config: dict[str, Any]) -> int:
    """Bytes of object store the job's blocks in flight may fill: 16 decoded batches per actor,
    at least MIN_OBJECT_STORE_BUDGET.

    Reading and decoding run far faster than the model on a CPU. Left to Ray Data's default
    budget (a share of the whole object store), decoded blocks piled up ahead of the actors
    for as long as the job ran: the peak memory of 100,000 images was 1.34x that of 20,000.
    Bounded, it is 1.14x, at the same speed (docs/BENCHMARKS.md).
    """
    image_bytes = model_config["image_size"] ** 2 * model_config["channels"]
    return max(MIN_OBJECT_STORE_BUDGET, plan.actors * 16 * plan.batch_size * image_bytes)


def _output_row_bytes(cfg: EmbedConfig, model_config: dict[str, Any]) -> int:
    """A rough size of one output row: the latent plus scores, ids and passthrough."""
    latent = model_config["latent_dim"] * {"float32": 4, "float16": 2, "int8": 1}[cfg.latent_dtype]
    return latent + 64 + 32 * len(cfg.passthrough)


def check_output_folder(cfg: EmbedConfig) -> bool:
    """Claim `out` for this model and these settings; True if a previous run already finished."""
    run_url = storage.join(cfg.out, RUN_FILE)
    mine = {k: v for k, v in asdict(cfg).items() if k in (*OUTPUT_KEYS, "model_sha256")}
    mine["passthrough"] = list(mine["passthrough"])
    if storage.exists(run_url):
        previous = json.loads(storage.read_text(run_url))
        if previous.get("model_sha256") != cfg.model_sha256:
            raise EmbedInputError(
                f"{cfg.out} holds results of another model (weights {previous.get('model_sha256', '?')[:12]}, "
                f"this one {cfg.model_sha256[:12]}): use a new --out")
        changed = [k for k in OUTPUT_KEYS if previous.get(k) != mine[k]]
        if changed:
            raise EmbedInputError(f"{cfg.out} holds results made with other settings ({', '.join(changed)}): use a new --out")
        return storage.exists(storage.join(cfg.out, SUCCESS_FILE))
    if storage.list_files(cfg.out):
        raise EmbedInputError(f"{cfg.out} already holds Parquet files that are not this job's: use a new --out")
    storage.write_text(run_url, json.dumps(mine, indent=2, sort_keys=True))
    return False


def check_channels(cfg: EmbedConfig, channels: int) -> None:
    """A grayscale model cannot serve colour data without throwing its colour away: refuse it."""
    if channels == 3:
        return
    import pyarrow.parquet as pq

    from pipeline.images import decode_batch
    from pipeline.shards import image_bytes

    fs, _ = storage.arrow_filesystem(cfg.data)
    shard = storage.filesystem(storage.list_shards(cfg.data)[0])[1]
    with fs.open_input_file(shard) as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=32, columns=[cfg.image_column]), None)
    if batch is None:
        return
    pixels, errors = decode_batch(image_bytes(batch.column(0)), 32, 3)
    good = pixels[[e is None for e in errors]].astype(np.int16)
    if good.size and np.abs(good - good.mean(axis=3, keepdims=True)).max() > 8:
        raise EmbedInputError("the model is grayscale (1 channel) but the data holds colour images: "
                              "train a 3-channel model for this data")


def embed(cfg: EmbedConfig) -> EmbedSummary:
    """Run the embedding job described by `cfg` on the connected Ray cluster."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy
    from ray.data.checkpoint import CheckpointConfig

    started = time.perf_counter()
    meta = read_checkpoint_meta(cfg.model)
    model_training = meta.get("training") or {}
    resize = cfg.resize or model_training.get("preprocessing", {}).get("resize") or "pad"
    threshold = resolve_threshold(cfg.threshold, model_training.get("calibration") or {})
    check_columns(cfg.data, cfg.columns, cfg.passthrough)
    check_unique_ids(cfg.data, cfg.id_column)
    model_config = meta["model"]
    check_channels(cfg, model_config["channels"])
    cfg = EmbedConfig(**{**asdict(cfg), "resize": resize, "model_sha256": meta.get("weights_sha256", "")})
    rows_in = count_rows(cfg.data)
    if check_output_folder(cfg):
        print(f"{cfg.out} is already complete for this model and settings; nothing to do", flush=True)
        return summarize(cfg, rows_in, threshold, time.perf_counter() - started)

    fs, out_path = storage.arrow_filesystem(cfg.out)
    resuming = fs.get_file_info(storage.join(out_path, CHECKPOINT_DIR)).type != pafs.FileType.NotFound
    plan = plan_resources(ray.cluster_resources(), resuming, cfg.actors, cfg.gpu, cfg.torch_threads, cfg.batch_size)
    # The id column name must be the same in input and output for Ray's checkpoint filter.
    keep = [c for c in dict.fromkeys([*cfg.passthrough, cfg.id_column]) if c != "id"]
    print(f"embedding {rows_in:,} rows with {model_config['arch']} model ({cfg.model}) on {plan.actors} actor(s) x "
          f"{plan.cpus_per_actor:g} CPU{f' + {plan.gpus_per_actor:g} GPU' if plan.gpus_per_actor else ''}, "
          f"{plan.torch_threads} torch threads, batches of {plan.batch_size}{', resuming' if resuming else ''}; "
          f"threshold mse > {threshold:.6g} ({cfg.threshold}) -> {cfg.out}", flush=True)

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
    ctx.target_max_block_size = max(64 * 1024, cfg.rows_per_file * _output_row_bytes(cfg, model_config))
    ctx.execution_options.resource_limits = saved_limits.copy(object_store_memory=min(
        saved_limits.object_store_memory, object_store_budget(plan, model_config)))
    try:
        # One block per shard: each written file commits its rows, so a kill loses little.
        ds = read_shards(cfg.data, cfg.columns, extra=keep, num_cpus=plan.task_cpus,
                         override_num_blocks=len(storage.list_shards(cfg.data)))
        ds = ds.map_batches(
            decode_rows, batch_format="numpy", batch_size=plan.batch_size, num_cpus=plan.task_cpus,
            fn_kwargs=dict(columns=cfg.columns, image_size=model_config["image_size"],
                           channels=model_config["channels"], resize=resize, keep=keep))
        ds = ds.map_batches(
            Embedder, batch_format="numpy", batch_size=plan.batch_size,
            fn_constructor_kwargs=dict(
                model_url=cfg.model, latent_dtype=cfg.latent_dtype, threshold=threshold, passthrough=keep,
                torch_threads=plan.torch_threads, device="cuda" if plan.gpus_per_actor else "cpu",
                metadata={"model": cfg.model, "weights_sha256": cfg.model_sha256, "threshold": threshold,
                          "threshold_spec": cfg.threshold, "latent_dtype": cfg.latent_dtype,
                          "model_config": model_config}),
            compute=ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor)
        ds.write_parquet(out_path, filesystem=fs, min_rows_per_file=min(cfg.rows_per_file, rows_in),
                         ray_remote_args={"num_cpus": plan.task_cpus})  # write_parquet has no num_cpus=
    finally:
        ctx.checkpoint_config = None
        ctx.target_max_block_size = saved_block_size
        ctx.execution_options.resource_limits = saved_limits
    summary = summarize(cfg, rows_in, threshold, time.perf_counter() - started)
    storage.write_text(storage.join(cfg.out, SUCCESS_FILE), json.dumps(summary.to_dict(), indent=2))
    return summary


def read_latents(url: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The latent dataset under `url` (small data and tests; jobs stream it with Ray Data)."""
    fs, paths = storage.arrow_files(url, shards=False)
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)


def summarize(cfg: EmbedConfig, rows_in: int, threshold: float, seconds: float) -> EmbedSummary:
    """Counts from the written output (id, error and flag columns only, streamed)."""
    fs, paths = storage.arrow_files(cfg.out, shards=False)
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
                        threshold=threshold, seconds=seconds, images_per_s=rows_in / max(seconds, 1e-9),
                        out=cfg.out, errors_by_reason=reasons)


def embed_reference(cfg: EmbedConfig, threshold: float) -> pa.Table:
    """The same job as a plain single-process loop: the reference the Ray job is tested against."""
    import pyarrow.parquet as pq

    meta = read_checkpoint_meta(cfg.model)
    model_config = meta["model"]
    resize = cfg.resize or (meta.get("training") or {}).get("preprocessing", {}).get("resize") or "pad"
    keep = [c for c in dict.fromkeys([*cfg.passthrough, cfg.id_column]) if c != "id"]
    embedder = Embedder(cfg.model, cfg.latent_dtype, threshold, keep, device="cpu", torch_threads=cfg.torch_threads)
    fs, _ = storage.arrow_filesystem(cfg.data)
    wanted = list(dict.fromkeys([cfg.id_column, cfg.image_column, *keep]))
    batch_size = cfg.batch_size or CPU_BATCH_SIZE
    tables = []
    for shard in storage.list_shards(cfg.data):
        with fs.open_input_file(storage.filesystem(shard)[1]) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=wanted):
                rows = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in wanted}
                decoded = decode_rows(rows, cfg.columns, model_config["image_size"], model_config["channels"],
                                      resize, keep)
                tables.append(embedder(decoded))
    return pa.concat_tables(tables)
