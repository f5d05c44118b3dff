"""The worker side of training: what each Ray Train worker runs, epoch by epoch (model and optimiser
restored from the last checkpoint, one pass over its data shard, validation, a checkpoint)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.corruptions import corrupt
from pipeline.inference import ImageScorer, to_input
from pipeline.model import build_model
from pipeline.scoring import psnr, training_loss
from pipeline.thresholds import calibration_from_errors
from pipeline.tiles import random_tiles
from pipeline.train.cache import WorkerSplits
from pipeline.train.config import METRICS_FILE, TRAIN_STATE_FILE, TrainConfig
from pipeline.train.invariance import invariance_loss, training_views


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
    data_was_in_memory: bool = False  # the checkpoint resumed from trained on splits kept in memory

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
                     start_epoch=int(train_state["epoch"]) + 1 if train_state else 0, history=history,
                     data_was_in_memory=bool(train_state and train_state.get("data_in_memory")))
    return worker


FOCAL_GAMMA = 2.0  # DRAEM's: most pixels are clean and easy; the loss dwells on the hard ones


def defect_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, S) defect-head logits and corruption masks in [0, 1] -> the mean focal loss."""
    logits = logits.float()
    cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    probability = torch.sigmoid(logits)
    agreement = probability * mask + (1 - probability) * (1 - mask)  # p_t
    return (cross_entropy * (1 - agreement).pow(FOCAL_GAMMA)).mean()


def batch_loss(model: torch.nn.Module, x: torch.Tensor, cfg: TrainConfig, corruptions: torch.Generator,
               viewing: torch.Generator, autocast: Any = contextlib.nullcontext()) -> torch.Tensor:
    """The training loss of one batch `x` ((B, C, S, S) in [0, 1]) as `cfg` asks for it: the
    reconstruction loss, the defect head's, and the invariance term; a tiled model's on
    `cfg.tiles_per_image` random tiles of each image. The train job's step and the benches' bare
    loops both call this, so they train the same thing. `viewing` is a CPU generator: the tiles'
    and the edited views' places."""
    if cfg.model.working_size:
        x = random_tiles(x, cfg.model.image_size, cfg.tiles_per_image, viewing)
    # Defect-aware: the model sees a corrupted copy and must return the clean image; a defect
    # head learns besides where the corruption is.
    corrupting = cfg.defect_aware or cfg.model.defect_head
    seen, where = corrupt(x, corruptions, cfg.corruption_share, cfg.corruptions) if corrupting else (x, None)
    # Invariance: an edited view of each image rides in the same forward pass (one call, as
    # DDP wants), and a contrastive term ties each image's latent to its own view's.
    views = training_views(x, viewing) if cfg.invariance else None
    with autocast:
        out = model(seen if views is None else torch.cat([seen, views]))
    n = len(seen)
    loss = training_loss(x, out["x_hat"][:n], cfg.loss).mean()
    if "defect_logits" in out:
        loss = loss + defect_loss(out["defect_logits"][:n], where)
    if views is not None:
        loss = loss + cfg.invariance * invariance_loss(out["z"][:n], out["z"][n:])
    return loss


def _train_one_epoch(w: _Worker, data: WorkerSplits, epoch: int, on_images: Callable[[int], None]) -> dict[str, float]:
    """One pass over this worker's training shard; sums that the caller reduces over workers."""
    cfg = w.cfg
    w.model.train()
    started = time.perf_counter()
    loss_sum = images = failed = 0.0
    waiting = _WaitClock()
    in_memory = data.in_memory
    batches = data.train_batches(epoch)
    corruptions = torch.Generator(device=w.device).manual_seed(cfg.seed * 100_003 + epoch * 31 + w.rank)
    # The views' sizes and places are drawn on the CPU: a draw on a GPU generator would wait for the device.
    viewing = torch.Generator().manual_seed(cfg.seed * 100_019 + epoch * 37 + w.rank)
    for step, batch in enumerate(waiting(batches)):
        _maybe_crash(cfg, w.rank, w.world, epoch, step)
        ok = batch["ok"]
        failed += float((~ok).sum())
        n_ok = int(ok.sum())
        # A batch with no decodable row still steps (with zero loss) so DDP's collectives line up.
        x = to_input(batch["pixels"][ok] if n_ok else batch["pixels"])
        loss = batch_loss(w.model, x, cfg, corruptions, viewing, w.autocast)
        loss = loss * (1.0 if n_ok else 0.0)
        w.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        w.optimizer.step()
        loss_sum += float(loss.detach()) * n_ok
        images += n_ok
        on_images(n_ok)
    w.scheduler.step()
    return {"loss_sum": loss_sum, "images": images, "failed": failed, "data_wait": waiting.seconds,
            "train_seconds": time.perf_counter() - started, "data_in_memory": in_memory}


def _every_worker(value: bool, device: torch.device) -> bool:
    return _all_reduce_sum([0.0 if value else 1.0], device)[0] == 0


def _validate(w: _Worker, data: WorkerSplits) -> tuple[np.ndarray, float]:
    """Per-image errors (mse as embed computes it: a tiled model's over its assembled tiles) of the
    held-out split, gathered from every worker, and rows that failed to decode."""
    _average_buffers(w.net)
    w.model.eval()
    errors, failed = [], 0.0
    scorer = ImageScorer(w.net, scores=("mse",), precision="bfloat16" if w.cuda and w.cfg.amp else "float32")
    for batch in data.val_batches():
        ok = batch["ok"]
        failed += float((~ok).sum())
        if ok.any():
            errors.append(scorer(to_input(batch["pixels"][ok]))["scores"]["mse"])
    mine = np.concatenate(errors) if errors else np.zeros(0, np.float32)
    return np.concatenate(_all_gather_objects(mine)), failed


def _epoch_metrics(w: _Worker, epoch: int, sums: dict[str, float], errors: np.ndarray, val_failed: float,
                   started: float) -> dict[str, Any]:
    loss_sum, images, failed, val_failed, data_wait = _all_reduce_sum(
        [sums["loss_sum"], sums["images"], sums["failed"], val_failed, sums["data_wait"]], w.device)
    if images == 0:  # every rank has the same sums: all stop at this epoch (train_loop), the driver fails the job
        return {"epoch": epoch + 1, "train_images": 0, "decode_failures": int(failed + val_failed)}
    val_mse = float(errors.mean()) if errors.size else math.nan
    tiles = {"tiles_per_s": images * w.cfg.tiles_per_image / sums["train_seconds"]} if w.cfg.model.working_size else {}
    return {
        "epoch": epoch + 1, "epochs": w.cfg.epochs,
        "train_loss": loss_sum / images, "val_mse": val_mse, "val_psnr": psnr(val_mse) if errors.size else math.nan,
        "train_images": int(images), "val_images": int(errors.size), "decode_failures": int(failed + val_failed),
        "images_per_s": images / sums["train_seconds"], "train_seconds": sums["train_seconds"],
        "data_wait_seconds": data_wait / w.world, "data_in_memory": sums["data_in_memory"],
        "epoch_seconds": time.perf_counter() - started,
        "lr": w.scheduler.get_last_lr()[0], **tiles,
    }


def _save(w: _Worker, epoch: int, metrics: dict[str, Any], errors: np.ndarray, facts: dict[str, Any],
          data_in_memory: bool) -> None:
    """Report the epoch to Ray Train with a checkpoint (rank 0 writes it), then the metrics file."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        reported = None
        if w.rank == 0:
            save_checkpoint(d, w.net, training={**facts, "epoch": epoch + 1, "metrics": metrics,
                                                "history": w.history, "calibration": calibration_from_errors(errors)})
            torch.save({"epoch": epoch, "optimizer": w.optimizer.state_dict(), "scheduler": w.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "data_in_memory": data_in_memory},
                       os.path.join(d, TRAIN_STATE_FILE))
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
    # Rows kept for no later epoch would only hold memory: a process that runs one epoch keeps none,
    # unless it resumes a run that had them in memory (it reads them as that run would have).
    budget = cfg.cache_mb << 20 if cfg.epochs - w.start_epoch > 1 or w.data_was_in_memory else 0
    data = WorkerSplits(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"), budget,
                        cfg.batch_size, cfg.seed, w.rank, w.device)
    every_worker = functools.partial(_every_worker, device=w.device)
    if w.data_was_in_memory:
        data.load(w.start_epoch, every_worker)
    for epoch in range(w.start_epoch, cfg.epochs):
        started = time.perf_counter()
        sums = _train_one_epoch(w, data, epoch, loop_config["on_images"])
        errors, val_failed = _validate(w, data)
        if epoch == w.start_epoch and not w.data_was_in_memory:
            data.end_first_pass(every_worker)
        metrics = _epoch_metrics(w, epoch, sums, errors, val_failed, started)
        if not metrics["train_images"]:
            return metrics
        w.history = [*w.history, metrics]
        _save(w, epoch, metrics, errors, facts, data.in_memory)
