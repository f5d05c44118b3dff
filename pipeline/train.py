"""Training: data-parallel Ray Train over image shards, checkpointed every epoch, resumable.

Layout of a run folder `<out_url>` (any fsspec URL):

    run.json          the settings the run was started with; a rerun must match them
    metrics.jsonl     one JSON line per finished epoch (rewritten whole, so it works on S3)
    checkpoints/      Ray Train's storage: epoch-NNNN/ checkpoints (the best few + the latest)
    model/            the exported model: the best epoch's weights + calibration

Decoding runs as Ray Data CPU tasks and streams to the workers through
`get_dataset_shard(...).iter_torch_batches`; the driver never holds the corpus. Running the
same command again after a kill continues from the latest checkpoint (Train V2 restores a
run from `RunConfig(name, storage_path)`), and ends after the requested epochs.

The job is two steps: `prepare` checks the data and the run folder without Ray (the shard
prefix is listed once), `run` trains on the connected cluster. `train` does both.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.corruptions import corrupt
from pipeline.datasets import decode_for_calibration, decode_split, read_shards
from pipeline.errors import InputError, JobFailed
from pipeline.images import DEFAULT_RESIZE, RESIZE_POLICIES, decode_batch
from pipeline.inference import ImageScorer, load_inference_model, to_input
from pipeline.lease import Lease, run_prepared
from pipeline.model import AutoencoderConfig, build_model, count_parameters
from pipeline.progress import Poller, Progress, TallyWatch
from pipeline.resources import largest_node_cpus, plan_actor_pool, plan_training_workers
from pipeline.scoring import BANK_CAP, TRAINING_LOSSES, calibrate_with_bank, mse_per_image, psnr, training_loss
from pipeline.shards import (
    Columns, ShardList, check_columns, fingerprint, first_images, id_strings, implied_id_column,
)
from pipeline.thresholds import Calibration, calibration_from_errors

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
TRAIN_STATE_FILE = "train_state.pt"
PREFLIGHT_ROWS = 256
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")

# Settings that must not change between a run and its resumption.
RESUME_KEYS = ("model", "val_fraction", "id_column", "image_column", "resize", "loss", "defect_aware",
               "corruption_share", "data_fingerprint")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; validated when built (InputError)."""

    data_url: str
    out_url: str
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
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
    loss: str = "mse"  # "mse", or "ssim_l1": 0.85 (1 - SSIM) + 0.15 L1, structure-aware (AE-SSIM)
    defect_aware: bool = False  # learn to return the clean image from a corrupted copy (pipeline.corruptions)
    corruption_share: float = 0.5  # with defect_aware: the share of each batch that is corrupted
    data_fingerprint: str = ""
    inject_crash: str | None = field(default=None, repr=False)  # tests only: marker file path

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # from to_dict(), e.g. on a Ray Train worker
            try:
                object.__setattr__(self, "model", AutoencoderConfig.from_dict(self.model))
            except (TypeError, ValueError) as e:
                raise InputError(str(e)) from e
        problems = []
        for name in ("epochs", "batch_size", "workers", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must not be negative, got {self.weight_decay}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_failures < 0:
            problems.append(f"max_failures must not be negative, got {self.max_failures}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            problems.append(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            problems.append(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.loss not in TRAINING_LOSSES:
            problems.append(f"loss must be one of {TRAINING_LOSSES}, got {self.loss!r}")
        if not 0.0 < self.corruption_share <= 1.0:
            problems.append(f"corruption_share must be in (0, 1], got {self.corruption_share}")
        if problems:
            raise InputError("invalid training settings: " + "; ".join(problems))

    @property
    def columns(self) -> Columns:
        return Columns(id=self.id_column, image=self.image_column)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the model config as a dict); `TrainConfig(**d)` rebuilds it."""
        return {k: v for k, v in asdict(self).items() if k != "inject_crash"}


@dataclass
class TrainResult:
    model_url: str
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"model_url": self.model_url, "best_epoch": self.best_epoch, "epochs": len(self.history),
                "val_mse": last.get("val_mse"), "val_psnr": last.get("val_psnr"), "seconds": round(self.seconds, 1)}


# ---------------------------------------------------------------- worker side


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


@dataclass
class _Worker:
    """One Ray Train worker's state: who it is, its model and optimiser, and what is done."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Any
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def net(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _restore(cfg: TrainConfig, torch_threads: int) -> _Worker:
    """Build the model and optimiser, and load the latest checkpoint when the run is resumed."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.set_num_threads(torch_threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    history, train_state = [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            restored = load_checkpoint(d)
            model.load_state_dict(restored.model.state_dict())
            history = restored.training.get("history", [])
            train_state = torch.load(os.path.join(d, TRAIN_STATE_FILE), weights_only=True)
        torch.set_rng_state(train_state["torch_rng"])
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))  # device; DDP if world > 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    if train_state:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
    worker = _Worker(cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device, model=model,
                     optimizer=optimizer, scheduler=scheduler,
                     autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp),
                     start_epoch=int(train_state["epoch"]) + 1 if train_state else 0, history=history)
    return worker


FOCAL_GAMMA = 2.0  # DRAEM's: most pixels are clean and easy; the loss dwells on the hard ones


def defect_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, S) defect-head logits and corruption masks in [0, 1] -> the mean focal loss."""
    logits = logits.float()
    cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    probability = torch.sigmoid(logits)
    agreement = probability * mask + (1 - probability) * (1 - mask)  # p_t
    return (cross_entropy * (1 - agreement).pow(FOCAL_GAMMA)).mean()


def _train_one_epoch(w: _Worker, shard, epoch: int, on_images: Callable[[int], None]) -> dict[str, float]:
    """One pass over this worker's training shard; sums that the caller reduces over workers."""
    cfg = w.cfg
    w.model.train()
    started = time.perf_counter()
    loss_sum = images = failed = 0.0
    waiting = _WaitClock()
    batches = shard.iter_torch_batches(
        batch_size=cfg.batch_size, local_shuffle_buffer_size=4 * cfg.batch_size,
        local_shuffle_seed=cfg.seed * 100_003 + epoch * 31 + w.rank, pin_memory=w.cuda,
    )
    corruptions = torch.Generator(device=w.device).manual_seed(cfg.seed * 100_003 + epoch * 31 + w.rank)
    corrupting = cfg.defect_aware or cfg.model.defect_head
    for step, batch in enumerate(waiting(batches)):
        _maybe_crash(cfg, w.rank, w.world, epoch, step)
        ok = batch["ok"]
        failed += float((~ok).sum())
        n_ok = int(ok.sum())
        # A batch with no decodable row still steps (with zero loss) so DDP's collectives line up.
        x = to_input(batch["pixels"][ok] if n_ok else batch["pixels"])
        # Defect-aware: the model sees a corrupted copy and must return the clean image; a defect
        # head learns besides where the corruption is.
        seen, where = corrupt(x, corruptions, cfg.corruption_share) if corrupting else (x, None)
        with w.autocast:
            out = w.model(seen)
        loss = training_loss(x, out["x_hat"], cfg.loss).mean()
        if "defect_logits" in out:
            loss = loss + defect_loss(out["defect_logits"], where)
        loss = loss * (1.0 if n_ok else 0.0)
        w.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        w.optimizer.step()
        loss_sum += float(loss.detach()) * n_ok
        images += n_ok
        on_images(n_ok)
    w.scheduler.step()
    return {"loss_sum": loss_sum, "images": images, "failed": failed, "data_wait": waiting.seconds,
            "train_seconds": time.perf_counter() - started}


def _validate(w: _Worker, shard) -> tuple[np.ndarray, float]:
    """Per-image errors of the held-out split, gathered from every worker, and rows that failed to decode."""
    _average_buffers(w.net)
    w.model.eval()
    errors, failed = [], 0.0
    with torch.inference_mode(), w.autocast:
        for batch in shard.iter_torch_batches(batch_size=w.cfg.batch_size * 2, pin_memory=w.cuda):
            ok = batch["ok"]
            failed += float((~ok).sum())
            if ok.any():
                x = to_input(batch["pixels"][ok])
                errors.append(mse_per_image(x, w.net(x)["x_hat"]).float().cpu().numpy())
    mine = np.concatenate(errors) if errors else np.zeros(0, np.float32)
    return np.concatenate(_all_gather_objects(mine)), failed


def _epoch_metrics(w: _Worker, epoch: int, sums: dict[str, float], errors: np.ndarray, val_failed: float,
                   started: float) -> dict[str, Any]:
    loss_sum, images, failed, val_failed, data_wait = _all_reduce_sum(
        [sums["loss_sum"], sums["images"], sums["failed"], val_failed, sums["data_wait"]], w.device)
    if images == 0:  # every rank has the same sums: all stop at this epoch (train_loop), the driver fails the job
        return {"epoch": epoch + 1, "train_images": 0, "decode_failures": int(failed + val_failed)}
    val_mse = float(errors.mean()) if errors.size else math.nan
    return {
        "epoch": epoch + 1, "epochs": w.cfg.epochs,
        "train_loss": loss_sum / images, "val_mse": val_mse, "val_psnr": psnr(val_mse) if errors.size else math.nan,
        "train_images": int(images), "val_images": int(errors.size), "decode_failures": int(failed + val_failed),
        "images_per_s": images / sums["train_seconds"], "train_seconds": sums["train_seconds"],
        "data_wait_seconds": data_wait / w.world, "epoch_seconds": time.perf_counter() - started,
        "lr": w.scheduler.get_last_lr()[0],
    }


def _save(w: _Worker, epoch: int, metrics: dict[str, Any], errors: np.ndarray, facts: dict[str, Any]) -> None:
    """Report the epoch to Ray Train with a checkpoint (rank 0 writes it), then the metrics file."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        reported = None
        if w.rank == 0:
            save_checkpoint(d, w.net, training={**facts, "epoch": epoch + 1, "metrics": metrics,
                                                "history": w.history, "calibration": calibration_from_errors(errors)})
            torch.save({"epoch": epoch, "optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state()}, os.path.join(d, TRAIN_STATE_FILE))
            reported = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=reported, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
    if w.rank == 0:  # the driver prints each epoch's line from this file, once (EpochLines)
        storage.write_text(storage.join(w.cfg.out_url, METRICS_FILE), "".join(json.dumps(m) + "\n" for m in w.history))


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker: restore, then per epoch train / validate / save.

    Returns (rather than raises, which Ray Train would retry) the metrics of an epoch in which
    not one training image decoded; None when every epoch ran.
    """
    import ray
    import ray.train

    cfg = TrainConfig(**loop_config["config"])
    w = _restore(cfg, loop_config["torch_threads"])
    facts = {**loop_config["facts"], "worker_nodes": _all_gather_objects(ray.get_runtime_context().get_node_id())}
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(w.start_epoch, cfg.epochs):
        started = time.perf_counter()
        sums = _train_one_epoch(w, train_shard, epoch, loop_config["on_images"])
        errors, val_failed = _validate(w, val_shard)
        metrics = _epoch_metrics(w, epoch, sums, errors, val_failed, started)
        if not metrics["train_images"]:
            return metrics
        w.history = [*w.history, metrics]
        _save(w, epoch, metrics, errors, facts)


class EpochLines(Poller):
    """Driver side: prints each finished epoch's line once, from the metrics file rank 0 writes.

    Printing from the workers would go through Ray's log forwarding, which showed every line
    twice and only with Ray's prefixes; the file is the record of what finished.
    """

    def __init__(self, out_url: str, poll: float = 1.0):
        super().__init__(poll, "epochs")
        self.url = storage.join(out_url, METRICS_FILE)
        self.shown = len(self._read())

    def _read(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in storage.read_text(self.url).splitlines()]
        except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or mid-rewrite elsewhere
            return []

    def tick(self) -> None:
        for metrics in self._read()[self.shown:]:
            print(format_progress(metrics), flush=True)
            self.shown += 1


def format_progress(m: dict[str, Any]) -> str:
    return (f"epoch {m['epoch']}/{m['epochs']}  train_loss {m['train_loss']:.5f}  val_mse {m['val_mse']:.5f}  "
            f"val_psnr {m['val_psnr']:.2f} dB  {m['images_per_s']:.0f} img/s  "
            f"waited for data {m['data_wait_seconds'] / m['train_seconds']:.0%}  "
            f"decode_failures {m['decode_failures']}  {m['epoch_seconds']:.1f}s")


# ---------------------------------------------------------------- driver side


@dataclass(frozen=True)
class TrainPlan:
    """What `prepare` found: the config (with the data's fingerprint), the shards and their rows."""

    cfg: TrainConfig
    shards: ShardList
    rows: int
    lease: Lease  # this job's hold on the run folder; the caller releases it (`train` does)


def preflight_decode(cfg: TrainConfig, shards: ShardList) -> None:
    """Refuse data whose images do not decode at all, before starting any worker."""
    images = first_images(shards, cfg.image_column, PREFLIGHT_ROWS)
    _, errors = decode_batch(images, cfg.model.image_size, cfg.model.channels, cfg.resize)
    if any(e is None for e in errors):
        return
    reasons: dict[str, int] = {}
    for e in errors:
        reasons[e] = reasons.get(e, 0) + 1
    raise InputError(
        f"none of the first {len(errors)} images in {cfg.data_url} column {cfg.image_column!r} decode; "
        f"reasons: {reasons}")


def _resume_view(settings: dict[str, Any]) -> dict[str, Any]:
    """The resume-relevant settings, with the model's fields spelled out one by one."""
    flat = {k: settings.get(k) for k in RESUME_KEYS if k != "model"}
    flat.update({k: v for k, v in (settings.get("model") or {}).items()})
    return flat


def check_run_folder(cfg: TrainConfig) -> None:
    """A run folder belongs to one set of settings: refuse to resume it with others."""
    run_url = storage.join(cfg.out_url, RUN_FILE)
    current = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as the file has them
    if storage.exists(run_url):
        try:
            previous = json.loads(storage.read_text(run_url))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{run_url} is not a training run's settings file ({e}): use a new --out") from e
        old, new = _resume_view(previous), _resume_view(current)
        changed = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise InputError(
                f"{cfg.out_url} holds a run with other settings ({details}); resume with the same settings or use a "
                "new --out")
    else:
        storage.write_text(run_url, json.dumps(current, indent=2, sort_keys=True))


def prepare(cfg: TrainConfig) -> TrainPlan:
    """Every check that needs no Ray: columns, rows, decodable images, the run folder's settings.

    Before its first write (the run's settings file) it takes the run folder's lease and holds
    it from then on: a second training into the same folder refuses.
    """
    storage.check_apart({"--data": cfg.data_url}, {"--out": cfg.out_url})
    shards = ShardList.under(cfg.data_url)
    cfg = replace(cfg, id_column=implied_id_column(shards, cfg.id_column))
    check_columns(shards, cfg.columns)
    if shards.rows == 0:
        raise InputError(f"{cfg.data_url} holds no rows: nothing to train on")
    preflight_decode(cfg, shards)
    cfg = replace(cfg, data_fingerprint=fingerprint(shards))
    lease = Lease.acquire(cfg.out_url, "training job")
    with lease.released_on_error():
        check_run_folder(cfg)
    return TrainPlan(cfg=cfg, shards=shards, rows=shards.rows, lease=lease)


def _split(plan: TrainPlan, validation: bool):
    cfg = plan.cfg
    return read_shards(plan.shards, cfg.columns).map_batches(
        decode_split, batch_format="numpy",
        fn_kwargs=dict(columns=cfg.columns, image_size=cfg.model.image_size, channels=cfg.model.channels,
                       resize=cfg.resize, val_fraction=cfg.val_fraction, validation=validation),
    )


def run(plan: TrainPlan) -> TrainResult:
    """Train (or resume) on the connected Ray cluster and export the best epoch to `<out_url>/model/`."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    cfg = plan.cfg
    cpus, threads = plan_training_workers(cfg.workers, ray.cluster_resources().get("CPU", 1.0), cfg.gpu,
                                          cfg.cpus_per_worker)
    print(f"training {cfg.model.arch} autoencoder ({count_parameters(build_model(cfg.model)):,} parameters) "
          f"on {plan.rows:,} rows, {cfg.workers} worker(s) x {cpus:g} CPU{' + 1 GPU' if cfg.gpu else ''}, "
          f"{cfg.epochs} epochs -> {cfg.out_url}", flush=True)
    facts = {"data": cfg.data_url, "data_fingerprint": cfg.data_fingerprint, "rows": plan.rows,
             "epochs": cfg.epochs, "seed": cfg.seed, "workers": cfg.workers, "val_fraction": cfg.val_fraction,
             "preprocessing": {"resize": cfg.resize, "id_column": cfg.id_column, "image_column": cfg.image_column}}
    fs, root = storage.arrow_filesystem(cfg.out_url)
    epochs = EpochLines(cfg.out_url)
    if epochs.shown:
        print(f"resuming from epoch {epochs.shown} of {cfg.epochs}", flush=True)
    remaining = max(cfg.epochs - epochs.shown, 0)
    progress = Progress("train", round(plan.rows * (1 - cfg.val_fraction) * remaining), unit="images",
                        approximate=True)
    # Same seed, same weights: blocks reach the workers in the same order on every run. Set on
    # Ray Train's ingest options (which carry the driver's limits) for these datasets only, not on
    # the driver's DataContext that later jobs share.
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    tally = TallyWatch(progress)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict() | {"inject_crash": cfg.inject_crash}, "facts": facts,
                           "torch_threads": threads, "on_images": tally.client},
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
        datasets={"train": _split(plan, False), "val": _split(plan, True)},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )
    with tally, epochs:
        result = trainer.fit()
    if result.error:
        raise result.error
    if result.return_value:  # rank 0's train_loop stopped at an epoch without one decoded training image
        failed = result.return_value
        raise JobFailed(f"no training image decoded in epoch {failed['epoch']} ({failed['decode_failures']} rows "
                        f"failed to decode): check column {cfg.image_column!r} of {cfg.data_url}; no model was "
                        "exported", failed)
    exported = export_best(cfg, result)
    calibrate_export(plan, exported.model_url)
    plan.lease.check()
    exported.seconds = time.perf_counter() - started
    return exported


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run in `cfg.out_url` and export its best model to `<out_url>/model/`."""
    return run_prepared(prepare, run, cfg)


# ---------------------------------------------------------------- calibration of the exported model
#
# The exported model scores images many ways (pipeline.scoring); each score's threshold is
# taken on its calibration. So after training, one more pass over the data: the exported
# model scores every held-out image, and describes a sample of the training images (at
# most BANK_CAP) for the neighbour scores. The held-out images are not in that bank, so their
# neighbour scores are what an unseen normal image gets.

class CalibrationScorer:
    """Ray Data mapper: decoded calibration rows -> their latents, stem statistics and scores."""

    def __init__(self, model_url: str, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        model, _ = load_inference_model(model_url)
        self.scorer = ImageScorer(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        rows = self.scorer.rows(to_input(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))))
        return {"id": batch["id"][ok], "val": batch["val"][ok], **rows}


def _calibration_rows(plan: TrainPlan, model_url: str) -> dict[str, np.ndarray]:
    """Every held-out row's and the bank sample's latents, stem statistics and scores, on the driver."""
    import ray
    from ray.data import ActorPoolStrategy

    cfg = plan.cfg
    training_rows = max(1.0, plan.rows * (1 - cfg.val_fraction))
    resources = plan_actor_pool(ray.cluster_resources(), resuming=False, node_cpus=largest_node_cpus())
    ds = read_shards(plan.shards, cfg.columns, num_cpus=resources.task_cpus).map_batches(
        decode_for_calibration, batch_format="numpy", batch_size=resources.batch_size, num_cpus=resources.task_cpus,
        fn_kwargs=dict(columns=cfg.columns, image_size=cfg.model.image_size, channels=cfg.model.channels,
                       resize=cfg.resize, val_fraction=cfg.val_fraction,
                       bank_fraction=min(1.0, BANK_CAP / training_rows)))
    ds = ds.map_batches(CalibrationScorer, batch_format="numpy", batch_size=resources.batch_size,
                        fn_constructor_kwargs=dict(model_url=model_url, torch_threads=resources.torch_threads),
                        compute=ActorPoolStrategy(size=resources.actors), num_cpus=resources.cpus_per_actor)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(np.asarray(values))
    return {name: np.concatenate(values) for name, values in parts.items()}


def calibrate_export(plan: TrainPlan, model_url: str) -> Calibration:
    """Score the held-out split and a bank sample with the exported model; store its training bank
    and every score's calibration with it."""
    rows = _calibration_rows(plan, model_url)
    calibration, bank = calibrate_with_bank(id_strings(rows["id"]), rows["val"].astype(bool), rows)
    checkpoint = load_checkpoint(model_url)
    save_checkpoint(model_url, checkpoint.model, training={**checkpoint.training, "calibration": calibration.to_dict()},
                    bank=bank)
    default = calibration.get(calibration.default_score)
    print(f"calibrated {len(calibration.scores)} scores on {default.count:,} held-out images, bank of "
          f"{len(bank.ids):,} training images; default score {calibration.default_score}, estimated "
          f"contamination {default.contamination:.1%}", flush=True)
    return calibration


def export_best(cfg: TrainConfig, result) -> TrainResult:
    """Copy the lowest-val_mse checkpoint, with its calibration, to `<out_url>/model/`."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if not math.isnan(m.get("val_mse", math.nan))]
    if not candidates:
        candidates = [(result.checkpoint, result.metrics or {})]
    best, metrics = min(candidates, key=lambda cm: cm[1].get("val_mse", math.inf))
    with best.as_directory() as d:
        restored = load_checkpoint(d)
    model_url = storage.join(cfg.out_url, MODEL_DIR)
    save_checkpoint(model_url, restored.model, training={**restored.training, "exported_epoch": metrics.get("epoch")})
    history = [json.loads(line) for line in storage.read_text(storage.join(cfg.out_url, METRICS_FILE)).splitlines()]
    print(f"exported epoch {metrics.get('epoch')} (val_mse {metrics.get('val_mse', math.nan):.5f}) -> {model_url}",
          flush=True)
    return TrainResult(model_url=model_url, best_epoch=int(metrics.get("epoch", 0)), history=history, seconds=0.0)
