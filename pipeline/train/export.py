"""The exported model: the best epoch's weights, scored on the held-out split and a bank sample
so that it carries its calibration and training bank."""

from __future__ import annotations

import json
import math
import time
import zlib

import numpy as np
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.colour_memory import ColourMemory, sample_bins, samples_per_input
from pipeline.datasets import decode_for_calibration, read_shards
from pipeline.errors import InputError
from pipeline.inference import ImageScorer, load_inference_model, to_input
from pipeline.model import AutoencoderConfig
from pipeline.patch_memory import PATCH_DIM, PatchBank, bank_from_candidates, candidate_patches, candidate_projection, \
    feature_channels
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


# With --patch-bank N, a pass before that one gathers candidate patches from the same bank
# sample (at most PATCH_CANDIDATES, spread evenly over its images), keeps N of them
# (pipeline.patch_memory) and stores them with the model; the calibration pass then gives the
# held-out images their patch scores against that memory.

# Before both, a pass that needs no model counts random pixels of the same bank sample into the
# colour memory (pipeline.colour_memory), stored with every exported model, so that the
# calibration pass gives the held-out images their colour scores against it.

PATCH_CANDIDATES = 200_000  # candidate patches at most: 51 MB of float32 on the driver (103 MB for texture's 128)


def _inputs(batch: dict[str, np.ndarray], keep: np.ndarray) -> torch.Tensor:
    return to_input(torch.from_numpy(np.ascontiguousarray(batch["pixels"][keep])))


class CalibrationScorer:
    """Ray Data mapper: decoded calibration rows -> their latents and stem statistics, and the
    held-out rows' scores (NaN for the bank's: the calibration reads only the held-out rows'
    scores, and the bank only their latents and stem statistics, so the bank's images, nearly
    all of the pass, get the forward pass alone)."""

    def __init__(self, model_url: str, torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        model, checkpoint = load_inference_model(model_url)
        # The embed job's default precision, so that the thresholds are taken on scores made as
        # embed makes them.
        self.scorer = ImageScorer(model, precision="auto", patch_bank=checkpoint.patch_bank,
                                  colours=checkpoint.colours)
        self.describer = ImageScorer(model, scores=(), precision="auto")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], dtype=bool)
        x, val = _inputs(batch, ok), np.asarray(batch["val"][ok], dtype=bool)
        # Both scorers run even on no rows (ImageScorer gives empty columns), so that every block
        # has every column whatever mix of rows it holds.
        rows: dict[str, np.ndarray] = {}
        for part, scorer in ((val, self.scorer), (~val, self.describer)):
            for name, values in scorer.rows(x[torch.from_numpy(part)]).items():
                if name not in rows:
                    rows[name] = np.full((len(val), *values.shape[1:]), np.nan, dtype=np.float32)
                rows[name][part] = values
        return {"id": batch["id"][ok], "val": val, **rows}


def colour_samples(batch: dict[str, np.ndarray], per_input: int, seed: int) -> dict[str, np.ndarray]:
    """Ray Data task: decoded calibration rows -> {"bins": (n,)}, the colour-memory bins of
    `per_input` random pixels of each training (bank sample) row; the draw is seeded by `seed` and
    the batch's first id, so a rerun counts the same pixels."""
    keep = np.asarray(batch["ok"], dtype=bool) & ~np.asarray(batch["val"], dtype=bool)
    if not keep.any():
        return {"bins": np.zeros(0, np.int64)}
    generator = np.random.default_rng([seed, zlib.crc32(str(batch["id"][0]).encode())])
    return {"bins": sample_bins(_inputs(batch, keep), per_input, generator)}


class PatchCandidates:
    """Ray Data mapper: decoded calibration rows -> {"patches": (n, dim)}, `per_input` random
    locations of each training (bank sample) row, or of each of its tiles for a tiled model,
    described as the patch bank holds them (`description`, one of patch_memory.DESCRIPTIONS)."""

    def __init__(self, model_url: str, per_input: int, seed: int, description: str = "stages",
                 torch_threads: int | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        model, checkpoint = load_inference_model(model_url)
        self.encoder = ImageScorer(model, scores=(), precision="auto")
        self.projection = patch_projection(model, checkpoint.config, seed, description)
        self.per_input, self.generator, self.description = per_input, np.random.default_rng(seed), description

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.asarray(batch["ok"], dtype=bool) & ~np.asarray(batch["val"], dtype=bool)
        if not keep.any():
            return {"patches": np.zeros((0, self.projection.shape[1]), np.float32)}
        return {"patches": candidates_of(self.encoder, _inputs(batch, keep), self.projection, self.per_input,
                                         self.generator, self.description)}


def candidates_of(encoder: ImageScorer, x: torch.Tensor, projection: np.ndarray, per_input: int,
                  generator: np.random.Generator, description: str = "stages") -> np.ndarray:
    """(n, dim) candidate patches of the images `x`: `per_input` random places of each image (of
    each tile, for a tiled model), taken one model call at a time: a whole batch's tile features
    would not fit in memory (256 images of 256 px in 64 px tiles: gigabytes)."""
    step = encoder.images_per_call(len(x))
    parts = [candidate_patches(encoder(x[start:start + step], features=True)["features"], projection, per_input,
                               generator, description) for start in range(0, len(x), step)]
    return np.concatenate([part.reshape(-1, projection.shape[1]) for part in parts])


def patch_projection(model: torch.nn.Module, config, seed: int, description: str = "stages") -> np.ndarray:
    """The fixed projection a model's candidate patches are gathered in (the same on every actor)."""
    channels = feature_channels(model, config.channels, config.image_size, description)
    return candidate_projection(channels, description, PATCH_DIM, seed)


def candidates_per_input(config: AutoencoderConfig, images: float) -> int:
    """Candidate places taken from each model input (an image, or each tile of a tiled model's
    image) so that `images` training images give about PATCH_CANDIDATES in all."""
    grid = config.tile_grid()
    return max(1, int(PATCH_CANDIDATES // (images * (1 if grid is None else grid.count))))


def _bank_rows(plan: TrainPlan) -> float:
    """How many training rows the bank sample holds (about; it is an id-hash sample)."""
    return min(max(1.0, plan.rows * (1 - plan.cfg.val_fraction)), BANK_CAP)


def _calibration_data(plan: TrainPlan):
    """The decoded held-out rows and bank sample, and the actor pool to map them with."""
    import ray

    cfg = plan.cfg
    training_rows = max(1.0, plan.rows * (1 - cfg.val_fraction))
    resources = plan_actor_pool(ray.cluster_resources(), resuming=False, node_cpus=largest_node_cpus(),
                                input_size=cfg.model.input_size)
    ds = read_shards(plan.shards, cfg.columns, num_cpus=resources.task_cpus).map_batches(
        decode_for_calibration, batch_format="numpy", batch_size=resources.batch_size, num_cpus=resources.task_cpus,
        fn_kwargs=dict(columns=cfg.columns, image_size=cfg.model.input_size, channels=cfg.model.channels,
                       resize=cfg.resize, val_fraction=cfg.val_fraction,
                       bank_fraction=min(1.0, BANK_CAP / training_rows)))
    return ds, resources


def _collect(ds) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            parts.setdefault(name, []).append(np.asarray(values))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _mapped(plan: TrainPlan, mapper: type, **kwargs) -> dict[str, np.ndarray]:
    """The calibration data through `mapper` (an actor pool; `kwargs` and the pool's torch threads
    go to its constructor), collected on the driver."""
    from ray.data import ActorPoolStrategy

    ds, resources = _calibration_data(plan)
    ds = ds.map_batches(mapper, batch_format="numpy", batch_size=resources.batch_size,
                        fn_constructor_kwargs=dict(torch_threads=resources.torch_threads, **kwargs),
                        compute=ActorPoolStrategy(size=resources.actors), num_cpus=resources.cpus_per_actor)
    return _collect(ds)


def _calibration_rows(plan: TrainPlan, model_url: str) -> dict[str, np.ndarray]:
    """Every held-out row's and the bank sample's latents, stem statistics and scores, on the driver."""
    return _mapped(plan, CalibrationScorer, model_url=model_url)


def build_export_colours(plan: TrainPlan, model_url: str) -> ColourMemory:
    """The colour memory of the bank sample's pixels, stored with the exported model."""
    cfg = plan.cfg
    started = time.perf_counter()
    per_input = samples_per_input(_bank_rows(plan), cfg.model.input_size ** 2)
    ds, resources = _calibration_data(plan)
    bins = _collect(ds.map_batches(colour_samples, batch_format="numpy", batch_size=resources.batch_size,
                                   num_cpus=resources.task_cpus, fn_kwargs=dict(per_input=per_input, seed=cfg.seed)))
    bins = bins.get("bins", np.zeros(0, np.int64))
    if not len(bins):
        raise InputError("the colour memory counted no pixels: every training image failed to decode?")
    colours = ColourMemory.from_bins(bins, cfg.model.channels)
    checkpoint = load_checkpoint(model_url)
    save_checkpoint(model_url, checkpoint.model, training=checkpoint.training, patch_bank=checkpoint.patch_bank,
                    colours=colours)
    print(f"colour memory: {len(bins):,} pixels ({per_input} a training image), "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return colours


def build_export_patch_bank(plan: TrainPlan, model_url: str) -> PatchBank:
    """--patch-bank N: candidate patches from the bank sample's images, N of them kept by
    --patch-sampler; stored with the exported model."""
    cfg = plan.cfg
    started = time.perf_counter()
    per_input = candidates_per_input(cfg.model, _bank_rows(plan))
    rows = _mapped(plan, PatchCandidates, model_url=model_url, per_input=per_input, seed=cfg.seed,
                   description=cfg.patch_features)
    candidates = rows.get("patches", np.zeros((0, 1), np.float32))
    checkpoint = load_checkpoint(model_url)
    projection = patch_projection(checkpoint.model, checkpoint.config, cfg.seed, cfg.patch_features)
    try:
        patch_bank = bank_from_candidates(candidates, projection, cfg.patch_bank, cfg.patch_sampler, cfg.seed,
                                          PATCH_CANDIDATES, cfg.patch_features)
    except ValueError as e:
        raise InputError(f"--patch-bank: {e} (every training image failed to decode?)") from e
    save_checkpoint(model_url, checkpoint.model, training=checkpoint.training, patch_bank=patch_bank,
                    colours=checkpoint.colours)
    print(f"patch bank: {len(patch_bank.patches):,} of {len(candidates):,} candidate patches ({cfg.patch_features}, "
          f"{cfg.patch_sampler}, "
          f"{per_input} a {'tile' if cfg.model.working_size else 'training image'}), "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    return patch_bank


def calibrate_export(plan: TrainPlan, model_url: str) -> Calibration:
    """Score the held-out split and a bank sample with the exported model; store its training bank
    (and with --patch-bank its patch bank), its colour memory and every score's calibration with it."""
    cfg = plan.cfg
    build_export_colours(plan, model_url)
    if cfg.patch_bank:
        build_export_patch_bank(plan, model_url)
    rows = _calibration_rows(plan, model_url)
    calibration, bank = calibrate_with_bank(id_strings(rows["id"]), rows["val"].astype(bool), rows,
                                            fused_from=cfg.fuse)
    checkpoint = load_checkpoint(model_url)
    save_checkpoint(model_url, checkpoint.model, training={**checkpoint.training, "calibration": calibration.to_dict()},
                    bank=bank, patch_bank=checkpoint.patch_bank, colours=checkpoint.colours)
    default = calibration.get(calibration.default_score)
    parts = f" (of {', '.join(calibration.fused_from)})" if calibration.default_score == "fused" else ""
    print(f"calibrated {len(calibration.scores)} scores on {default.count:,} held-out images, bank of "
          f"{len(bank.ids):,} training images; default score {calibration.default_score}{parts}, estimated "
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
