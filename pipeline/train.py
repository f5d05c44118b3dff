"""Training: data-parallel Ray Train over image shards, checkpointed every epoch, resumable.

Layout of a run folder `<out>` (any fsspec URL):

    run.json          the settings the run was started with; a rerun must match them
    metrics.jsonl     one JSON line per finished epoch (rewritten whole, so it works on S3)
    checkpoints/      Ray Train's storage: epoch-NNNN/ checkpoints (the best few + the latest)
    model/            the exported model: the best epoch's weights + calibration

Decoding runs as Ray Data CPU tasks and streams to the workers through
`get_dataset_shard(...).iter_torch_batches`; the driver never holds the corpus. Running the
same command again after a kill continues from the latest checkpoint (Train V2 restores a
run from `RunConfig(name, storage_path)`), and ends after the requested epochs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.datasets import decode_split, read_shards
from pipeline.images import DEFAULT_RESIZE, decode_batch
from pipeline.model import AutoencoderConfig, build_model, count_parameters
from pipeline.reconstruction import mse_per_image, psnr
from pipeline.shards import Columns, check_columns, count_rows, fingerprint, image_bytes

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
TRAIN_STATE_FILE = "train_state.pt"
PREFLIGHT_ROWS = 256
CALIBRATION_GRID = 1000  # quantiles stored at q = i / 1000 for any quantile threshold later

# Settings that must not change between a run and its resumption.
RESUME_KEYS = ("model", "image_size", "channels", "latent_dim", "base_width", "squeeze_ratio", "pct_3x3",
               "val_fraction", "id_column", "image_column", "resize", "data_fingerprint")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    model: str = "fire"
    image_size: int = 64
    channels: int = 3
    latent_dim: int = 128
    base_width: int = 32
    squeeze_ratio: float = 0.125
    pct_3x3: float = 0.5
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.05
    seed: int = 0
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float | None = None
    amp: bool = True
    placement_strategy: str = "PACK"
    keep_checkpoints: int = 2
    max_failures: int = 2
    id_column: str = "id"
    image_column: str = "image"
    resize: str = DEFAULT_RESIZE
    data_fingerprint: str = ""
    inject_crash: str | None = field(default=None, repr=False)  # tests only: marker file path

    def model_config(self) -> AutoencoderConfig:
        return AutoencoderConfig(
            arch=self.model, image_size=self.image_size, channels=self.channels, latent_dim=self.latent_dim,
            base_width=self.base_width, squeeze_ratio=self.squeeze_ratio, pct_3x3=self.pct_3x3,
        )

    @property
    def columns(self) -> Columns:
        return Columns(id=self.id_column, image=self.image_column)


@dataclass
class TrainResult:
    model_url: str
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float


class TrainingInputError(ValueError):
    """The data or the run folder cannot be trained on as asked; raised before any training."""


# ---------------------------------------------------------------- worker side


def _to_input(pixels: torch.Tensor) -> torch.Tensor:
    """(B, S, S, C) uint8 -> (B, C, S, S) float in [0, 1]; the permute leaves it channels_last."""
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def calibration_from_errors(errors: np.ndarray) -> dict[str, Any]:
    """Per-image validation errors -> the distribution thresholds are later taken from."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return {}
    grid = np.quantile(errors, np.linspace(0.0, 1.0, CALIBRATION_GRID + 1))
    named = {str(q): float(np.quantile(errors, q)) for q in (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)}
    return {"metric": "mse", "count": int(errors.size), "mean": float(errors.mean()), "std": float(errors.std()),
            "max": float(errors.max()), "quantiles": named, "grid": [float(v) for v in grid]}


def threshold_from_calibration(calibration: dict[str, Any], q: float) -> float:
    """The q-quantile of the calibration errors, interpolated on the stored grid."""
    if not calibration or "grid" not in calibration:
        raise ValueError("the model has no calibration: train it with this project's train job, or pass value:X")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    grid = np.asarray(calibration["grid"])
    return float(np.interp(q, np.linspace(0.0, 1.0, len(grid)), grid))


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def _all_gather_objects(value: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, value)
        return parts
    return [value]


def _all_gather(array: np.ndarray) -> np.ndarray:
    return np.concatenate(_all_gather_objects(array))


def _average_buffers(net: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over the workers.

    DDP keeps each worker's running stats from its own last batches; averaging them before
    validation makes every worker evaluate, and rank 0 save, one and the same model.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for buffer in net.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer.div_(world)


def _maybe_crash(cfg: TrainConfig, rank: int, world: int, epoch: int, step: int) -> None:
    """Tests only: the last worker dies once, mid-epoch, after the first checkpoint exists."""
    if cfg.inject_crash and rank == world - 1 and epoch == 1 and step == 1 and not os.path.exists(cfg.inject_crash):
        with open(cfg.inject_crash, "w") as f:
            f.write(f"crashed rank {rank} epoch {epoch} step {step}\n")
        print(f"[inject-crash] rank {rank} exits mid-epoch {epoch + 1}", flush=True)
        os._exit(1)


class _WaitClock:
    """Wraps a batch iterator and adds up the time spent waiting for each next batch: an epoch
    whose wait is a large share of its time is input-bound (decoding cannot keep up)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, batches):
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - started
            yield batch


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    torch.set_num_threads(loop_config["torch_threads"])
    torch.manual_seed(cfg.seed)

    model = build_model(cfg.model_config())
    start_epoch, history, train_state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            restored = load_checkpoint(d)
            model.load_state_dict(restored.model.state_dict())
            history = restored.training.get("history", [])
            train_state = torch.load(os.path.join(d, TRAIN_STATE_FILE), weights_only=True)
        start_epoch = int(train_state["epoch"]) + 1
        torch.set_rng_state(train_state["torch_rng"])
        if rank == 0:
            print(f"resuming from epoch {start_epoch} of {cfg.epochs}", flush=True)
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    net = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if train_state:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.amp)
    import ray

    worker_nodes = _all_gather_objects(ray.get_runtime_context().get_node_id())

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started = time.perf_counter()
        loss_sum = images = failed = 0.0
        waiting = _WaitClock()
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=4 * cfg.batch_size,
            local_shuffle_seed=cfg.seed * 100_003 + epoch * 31 + rank, pin_memory=cuda,
        )
        for step, batch in enumerate(waiting(batches)):
            _maybe_crash(cfg, rank, world, epoch, step)
            ok = batch["ok"]
            failed += float((~ok).sum())
            n_ok = int(ok.sum())
            # A batch with no decodable row still steps (with zero loss) so DDP's collectives line up.
            x = _to_input(batch["pixels"][ok] if n_ok else batch["pixels"])
            with autocast:
                x_hat = model(x)["x_hat"]
            loss = mse_per_image(x, x_hat).mean() * (1.0 if n_ok else 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * n_ok
            images += n_ok
        scheduler.step()
        train_seconds = time.perf_counter() - started

        _average_buffers(net)
        model.eval()
        val_errors, val_failed = [], 0.0
        with torch.inference_mode(), autocast:
            for batch in val_shard.iter_torch_batches(batch_size=cfg.batch_size * 2, pin_memory=cuda):
                ok = batch["ok"]
                val_failed += float((~ok).sum())
                if ok.any():
                    x = _to_input(batch["pixels"][ok])
                    val_errors.append(mse_per_image(x, net(x)["x_hat"]).float().cpu().numpy())
        errors = _all_gather(np.concatenate(val_errors) if val_errors else np.zeros(0, np.float32))
        loss_sum, images, failed, val_failed, data_wait = _all_reduce_sum(
            [loss_sum, images, failed, val_failed, waiting.seconds], device)
        if images == 0:
            raise RuntimeError("no training image decoded in a whole epoch: check the data's image column")
        val_mse = float(errors.mean()) if errors.size else math.nan
        metrics = {
            "epoch": epoch + 1, "epochs": cfg.epochs,
            "train_loss": loss_sum / images, "val_mse": val_mse, "val_psnr": psnr(val_mse) if errors.size else math.nan,
            "train_images": int(images), "val_images": int(errors.size),
            "decode_failures": int(failed + val_failed),
            "images_per_s": images / train_seconds, "train_seconds": train_seconds,
            "data_wait_seconds": data_wait / world, "epoch_seconds": time.perf_counter() - started,
            "lr": scheduler.get_last_lr()[0],
        }
        history = [*history, metrics]

        with tempfile.TemporaryDirectory() as d:
            reported = None
            if rank == 0:
                save_checkpoint(d, net, training={
                    **loop_config["facts"], "epoch": epoch + 1, "metrics": metrics, "history": history,
                    "worker_nodes": worker_nodes,
                    "calibration": calibration_from_errors(errors),
                })
                torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state()}, os.path.join(d, TRAIN_STATE_FILE))
                reported = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=reported, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
        if rank == 0:
            storage.write_text(storage.join(cfg.out, METRICS_FILE), "".join(json.dumps(m) + "\n" for m in history))
            print(format_progress(metrics), flush=True)


def format_progress(m: dict[str, Any]) -> str:
    return (f"epoch {m['epoch']}/{m['epochs']}  train_loss {m['train_loss']:.5f}  val_mse {m['val_mse']:.5f}  "
            f"val_psnr {m['val_psnr']:.2f} dB  {m['images_per_s']:.0f} img/s  "
            f"waited for data {m['data_wait_seconds'] / m['train_seconds']:.0%}  "
            f"decode_failures {m['decode_failures']}  {m['epoch_seconds']:.1f}s")


# ---------------------------------------------------------------- driver side


def preflight_decode(cfg: TrainConfig) -> None:
    """Refuse data whose images do not decode at all, before starting any worker."""
    fs, _ = storage.arrow_filesystem(cfg.data)
    reasons: dict[str, int] = {}
    seen = 0
    for shard in storage.list_shards(cfg.data):
        with fs.open_input_file(storage.filesystem(shard)[1]) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=PREFLIGHT_ROWS, columns=[cfg.image_column]):
                _, errors = decode_batch(image_bytes(batch.column(0)), cfg.image_size, cfg.channels, cfg.resize)
                if any(e is None for e in errors):
                    return
                for e in errors:
                    reasons[e] = reasons.get(e, 0) + 1
                seen += len(errors)
                break
        if seen >= PREFLIGHT_ROWS:
            break
    raise TrainingInputError(
        f"none of the first {seen} images in {cfg.data} column {cfg.image_column!r} decode; reasons: {reasons}")


def check_run_folder(cfg: TrainConfig) -> None:
    """A run folder belongs to one set of settings: refuse to resume it with others."""
    run_url = storage.join(cfg.out, RUN_FILE)
    if storage.exists(run_url):
        previous = json.loads(storage.read_text(run_url))
        current = asdict(cfg)
        changed = {k: (previous.get(k), current[k]) for k in RESUME_KEYS if previous.get(k) != current[k]}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise TrainingInputError(
                f"{cfg.out} holds a run with other settings ({details}); resume with the same settings or use a new --out")
    else:
        storage.write_text(run_url, json.dumps({k: v for k, v in asdict(cfg).items() if k != "inject_crash"},
                                               indent=2, sort_keys=True))


def plan_resources(cfg: TrainConfig, cluster_cpus: float) -> tuple[float, int]:
    """CPUs per worker and torch threads per worker.

    Ray Data's decode tasks need CPU too: training workers that took every CPU would starve
    them and hang (DESIGN.md). On CPU-only clusters one CPU is left to the data pipeline.
    """
    if cfg.cpus_per_worker is not None:
        cpus = cfg.cpus_per_worker
    elif cfg.gpu:
        cpus = 1.0
    else:
        cpus = max(cluster_cpus - 1.0, 0.5 * cfg.workers) / cfg.workers
        cpus = math.floor(cpus * 4) / 4  # quarter-CPU steps keep the numbers readable
    # Threads follow the cores each worker really has, not its reservation: the decode tasks
    # are light beside the model, and a lone worker on a 2-core machine should use both.
    threads = 2 if cfg.gpu else max(1, int(cluster_cpus // cfg.workers))
    return cpus, threads


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run in `cfg.out` and export its best model to `<out>/model/`."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    check_columns(cfg.data, cfg.columns)
    rows = count_rows(cfg.data)
    if rows == 0:
        raise TrainingInputError(f"{cfg.data} holds no rows: nothing to train on")
    preflight_decode(cfg)
    cfg = replace(cfg, data_fingerprint=fingerprint(cfg.data))
    check_run_folder(cfg)

    cpus, threads = plan_resources(cfg, ray.cluster_resources().get("CPU", 1.0))
    model_config = cfg.model_config()
    print(f"training {cfg.model} autoencoder ({count_parameters(build_model(model_config)):,} parameters) "
          f"on {rows:,} rows, {cfg.workers} worker(s) x {cpus:g} CPU{' + 1 GPU' if cfg.gpu else ''}, "
          f"{cfg.epochs} epochs -> {cfg.out}", flush=True)

    def split(validation: bool):
        return read_shards(cfg.data, cfg.columns).map_batches(
            decode_split, batch_format="numpy",
            fn_kwargs=dict(columns=cfg.columns, image_size=cfg.image_size, channels=cfg.channels,
                           resize=cfg.resize, val_fraction=cfg.val_fraction, validation=validation),
        )

    facts = {"data": cfg.data, "data_fingerprint": cfg.data_fingerprint, "rows": rows, "epochs": cfg.epochs,
             "seed": cfg.seed, "workers": cfg.workers, "val_fraction": cfg.val_fraction,
             "preprocessing": {"resize": cfg.resize, "id_column": cfg.id_column, "image_column": cfg.image_column}}
    fs, root = storage.arrow_filesystem(cfg.out)
    # Same seed, same weights: blocks reach the workers in the same order on every run. Set on
    # Ray Train's ingest options (which carry the driver's limits) for these datasets only, not on
    # the driver's DataContext that later jobs share.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": asdict(cfg), "facts": facts, "torch_threads": threads},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cpus},
            placement_strategy=cfg.placement_strategy),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS_DIR, storage_path=root, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Our one line per epoch says what matters; Ray Train's INFO lines repeat each report.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_mse",
                checkpoint_score_order="min"),
        ),
        datasets={"train": split(False), "val": split(True)},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return export_best(cfg, result, time.perf_counter() - started)


def export_best(cfg: TrainConfig, result, seconds: float) -> TrainResult:
    """Copy the lowest-val_mse checkpoint, with its calibration, to `<out>/model/`."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if not math.isnan(m.get("val_mse", math.nan))]
    if not candidates:
        candidates = [(result.checkpoint, result.metrics or {})]
    best, metrics = min(candidates, key=lambda cm: cm[1].get("val_mse", math.inf))
    with best.as_directory() as d:
        restored = load_checkpoint(d)
    model_url = storage.join(cfg.out, MODEL_DIR)
    save_checkpoint(model_url, restored.model, training={**restored.training, "exported_epoch": metrics.get("epoch")})
    history = [json.loads(line) for line in storage.read_text(storage.join(cfg.out, METRICS_FILE)).splitlines()]
    print(f"exported epoch {metrics.get('epoch')} (val_mse {metrics.get('val_mse', math.nan):.5f}) -> {model_url}",
          flush=True)
    return TrainResult(model_url=model_url, best_epoch=int(metrics.get("epoch", 0)), history=history, seconds=seconds)
