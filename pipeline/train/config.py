"""What a training run is: its settings (`TrainConfig`), its result, its plan, and the names of
what it writes in the run folder."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.corruptions import CORRUPTIONS
from pipeline.errors import InputError
from pipeline.images import DEFAULT_RESIZE, RESIZE_POLICIES
from pipeline.lease import Lease
from pipeline.model import AutoencoderConfig
from pipeline.patch_memory import DESCRIPTIONS, SAMPLERS
from pipeline.scores import FUSED_FROM, SCORES
from pipeline.scoring import TRAINING_LOSSES
from pipeline.shards import Columns, ShardList


RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
TRAIN_STATE_FILE = "train_state.pt"
PREFLIGHT_ROWS = 256
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")

# Settings that must not change between a run and its resumption.
RESUME_KEYS = ("model", "val_fraction", "id_column", "image_column", "resize", "loss", "defect_aware",
               "corruption_share", "corruptions", "invariance", "data_fingerprint")


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
    corruptions: tuple[str, ...] = CORRUPTIONS  # the kinds drawn (pipeline.corruptions); fewer: leave-one-kind-out
    invariance: float = 0.0  # weight of the contrastive term for edit-invariant latents (train/invariance.py); 0: off
    patch_bank: int = 0  # training patches the exported model remembers for the patch scores (pipeline.patch_memory); 0: none
    patch_sampler: str = "coreset"  # how they are chosen from the candidates: one of patch_memory.SAMPLERS
    patch_features: str = "stages"  # what describes a place in that memory: one of patch_memory.DESCRIPTIONS
    fuse: tuple[str, ...] = FUSED_FROM  # the fused score's parts, as the export's calibration fuses them
    cache_mb: int = 1024  # per worker: decoded splits that fit stay in memory after epoch 1 (train/cache.py); 0: off
    tiles_per_image: int = 4  # a tiled model (model.working_size): random tiles of each image per step
    data_fingerprint: str = ""
    inject_crash: str | None = field(default=None, repr=False)  # tests only: marker file path

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # from to_dict(), e.g. on a Ray Train worker
            try:
                object.__setattr__(self, "model", AutoencoderConfig.from_dict(self.model))
            except (TypeError, ValueError) as e:
                raise InputError(str(e)) from e
        object.__setattr__(self, "corruptions", tuple(self.corruptions))  # JSON gives a list back
        object.__setattr__(self, "fuse", tuple(dict.fromkeys(self.fuse)))
        problems = []
        for name in ("epochs", "batch_size", "workers", "keep_checkpoints", "tiles_per_image"):
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
        if not self.corruptions or not set(self.corruptions) <= set(CORRUPTIONS):
            problems.append(f"corruptions must be some of {CORRUPTIONS}, got {self.corruptions}")
        if not (self.invariance >= 0 and math.isfinite(self.invariance)):
            problems.append(f"invariance must be a finite weight >= 0, got {self.invariance}")
        for name in ("patch_bank", "cache_mb"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if self.patch_sampler not in SAMPLERS:
            problems.append(f"patch_sampler must be one of {SAMPLERS}, got {self.patch_sampler!r}")
        if self.patch_features not in DESCRIPTIONS:
            problems.append(f"patch_features must be one of {DESCRIPTIONS}, got {self.patch_features!r}")
        problems += self._fuse_problems()
        if problems:
            raise InputError("invalid training settings: " + "; ".join(problems))

    def _fuse_problems(self) -> list[str]:
        """What is wrong with `fuse`: a name that is not a single score, or one this model will not compute."""
        parts = [name for name, s in SCORES.items() if s.needs != "scores"]
        unknown = [name for name in self.fuse if name not in parts]
        if not self.fuse or unknown:
            told = (f"{', '.join(unknown)}, {'which is' if len(unknown) == 1 else 'which are'} not a single score"
                    if unknown else "no score")
            return [f"fuse names {told}; name one or more of: {', '.join(parts)}"]
        missing = {"patches": "--patch-bank N" if not self.patch_bank else "",
                   "head": "--defect-head" if not self.model.defect_head else ""}
        return [f"fuse names {name}, which needs a model trained with {missing[SCORES[name].needs]}"
                for name in self.fuse if missing.get(SCORES[name].needs)]

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


@dataclass(frozen=True)
class TrainPlan:
    """What `prepare` found: the config (with the data's fingerprint), the shards and their rows."""

    cfg: TrainConfig
    shards: ShardList
    rows: int
    lease: Lease  # this job's hold on the run folder; the caller releases it (`train` does)
