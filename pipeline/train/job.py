"""The driver side of training: checks before any work, the Ray Train run, progress lines, and the
export of the best epoch."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from pipeline import storage
from pipeline.datasets import decode_split, read_shards
from pipeline.errors import InputError, JobFailed
from pipeline.images import decode_batch
from pipeline.lease import Lease, run_prepared
from pipeline.model import build_model, count_parameters
from pipeline.progress import Poller, Progress, TallyWatch
from pipeline.resources import plan_training_workers
from pipeline.shards import check_columns, fingerprint, first_images, implied_id_column, ShardList
from pipeline.train.config import (
    CHECKPOINTS_DIR, METRICS_FILE, PREFLIGHT_ROWS, RESUME_KEYS, RUN_FILE, TrainConfig, TrainPlan, TrainResult,
)
from pipeline.train.export import calibrate_export, export_best
from pipeline.train.loop import train_loop


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
            f"{'%.0f tiles/s  ' % m['tiles_per_s'] if 'tiles_per_s' in m else ''}"
            f"waited for data {m['data_wait_seconds'] / m['train_seconds']:.0%}"
            f"{' (in memory)' if m.get('data_in_memory') else ''}  "
            f"decode_failures {m['decode_failures']}  {m['epoch_seconds']:.1f}s")


# ---------------------------------------------------------------- driver side


def preflight_decode(cfg: TrainConfig, shards: ShardList) -> None:
    """Refuse data whose images do not decode at all, before starting any worker."""
    images = first_images(shards, cfg.image_column, PREFLIGHT_ROWS)
    _, errors = decode_batch(images, cfg.model.input_size, cfg.model.channels, cfg.resize)
    if any(e is None for e in errors):
        return
    reasons: dict[str, int] = {}
    for e in errors:
        reasons[e] = reasons.get(e, 0) + 1
    raise InputError(
        f"none of the first {len(errors)} images in {cfg.data_url} column {cfg.image_column!r} decode; "
        f"reasons: {reasons}")


def _resume_view(settings: dict[str, Any]) -> dict[str, Any]:
    """The resume-relevant settings, with the model's fields spelled out one by one; a setting
    that a run folder of an older version did not record has its default (what that run used)."""
    defaults = json.loads(json.dumps(TrainConfig(data_url="", out_url="").to_dict()))
    flat = {k: settings.get(k, defaults.get(k)) for k in RESUME_KEYS if k != "model"}
    flat.update({**defaults["model"], **(settings.get("model") or {})})
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
        fn_kwargs=dict(columns=cfg.columns, image_size=cfg.model.input_size, channels=cfg.model.channels,
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
             "invariance": cfg.invariance,  # > 0: latents trained to survive near-duplicate edits
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
