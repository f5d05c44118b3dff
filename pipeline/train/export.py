"""The exported model: the best epoch's weights, scored on the held-out split and a bank sample
so that it carries its calibration and training bank."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.datasets import decode_for_calibration, read_shards
from pipeline.inference import ImageScorer, load_inference_model, to_input
from pipeline.resources import largest_node_cpus, plan_actor_pool
from pipeline.scoring import BANK_CAP, calibrate_with_bank
from pipeline.shards import id_strings
from pipeline.thresholds import Calibration
from pipeline.train.config import METRICS_FILE, MODEL_DIR, TrainConfig, TrainPlan, TrainResult


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
        # The embed job's default precision, so that the thresholds are taken on scores made as
        # embed makes them.
        self.scorer = ImageScorer(model, precision="auto")

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
