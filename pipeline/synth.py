"""A deterministic synthetic image corpus with labelled anomalies, for demos, tests and benchmarks.

"Normal" images come from one structured family, so an autoencoder can learn it from a few
thousand examples:
- a smooth two-colour gradient background at a random angle,
- a faint diagonal ripple texture,
- one to three soft-edged ellipses and rectangles,
all in colours drawn from one fixed palette.

Anomalies are normal images with one defect of a kind in `ANOMALY_KINDS`:
- "scratch": a thin bright or dark line across the image;
- "blot": a dark, ragged-edged stain in a colour outside the palette;
- "noise": a patch of strong Gaussian noise (a sensor glitch);
- "colour_shift": the colour channels rotated (inverted for one channel), every pixel off-palette;
- "foreign_object": a hard-edged black-and-white checkerboard square, a texture the family never has.

Shards follow the image-shard contract (README, "Data contracts"): `id` (string, "synth-<index>"),
`image` (PNG bytes), `label` (int64, 1 = anomaly), `anomaly_kind` (string: the kind, or ""
for a normal image -- empty rather than null so that group-bys and filters keep the normal
rows without special cases).

Determinism: image i is drawn from its own generator seeded by (seed, i), and which images
are anomalies (and of which kind) from a generator seeded by `seed` alone. The same seed
and arguments give byte-identical shards, and image i does not depend on `rows_per_shard`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import InputError
from pipeline.images import encode_image
from pipeline.lease import Lease
from pipeline.progress import Progress
from pipeline.shards import SHARD_PREFIX, remove_stale_shards, write_shard

ANOMALY_KINDS = ("scratch", "blot", "noise", "colour_shift", "foreign_object")
SUMMARY_FILE = "_synth_summary.json"

# The family's palette (RGB): muted, mid-brightness colours, so defects stand out.
PALETTE = np.array(
    [
        (70, 110, 160),
        (120, 170, 120),
        (200, 170, 110),
        (170, 90, 80),
        (110, 90, 150),
        (220, 210, 190),
    ],
    dtype=np.float32,
)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class SynthConfig:
    """Arguments of `write_synthetic_corpus`, as one value that jobs log and save."""

    out_url: str
    n: int = 2000
    image_size: int = 64
    anomaly_fraction: float = 0.05
    seed: int = 0
    rows_per_shard: int = 1024
    channels: int = 3

    def __post_init__(self) -> None:
        _check(self.n, self.image_size, self.anomaly_fraction, self.rows_per_shard, self.channels)


def _check(n: int, image_size: int, anomaly_fraction: float, rows_per_shard: int, channels: int) -> None:
    if n < 1 or rows_per_shard < 1:
        raise InputError(f"n and rows_per_shard must be positive, got {n} and {rows_per_shard}")
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    if image_size < 8:
        raise InputError(f"image_size must be at least 8, got {image_size}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise InputError(f"anomaly_fraction must be in [0, 1], got {anomaly_fraction}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], each (size, size): rows y, columns x."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _soft_mask(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a smooth edge `softness` wide (in [0, 1] units)."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / softness, -30, 30)))


def normal_image(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One image of the normal family, float32 (S, S, 3) in [0, 255]."""
    first, second = PALETTE[rng.choice(len(PALETTE), 2, replace=False)]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = math.cos(angle) * (x - 0.5) + math.sin(angle) * (y - 0.5)  # in [-0.71, 0.71]
    t = np.clip(ramp / 1.42 + 0.5, 0, 1)[..., None]
    image = first * (1 - t) + second * t  # (S, S, 3)
    frequency, phase = rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
    image += (6.0 * np.sin(2 * np.pi * frequency * (x + y) + phase))[..., None]
    softness = 1.5 / x.shape[0]  # about one and a half pixels at any size
    for _ in range(rng.integers(1, 4)):
        colour = PALETTE[rng.integers(len(PALETTE))]
        cy, cx = rng.uniform(0.2, 0.8, 2).tolist()  # Python floats keep the math float32
        ry, rx = rng.uniform(0.08, 0.25, 2).tolist()
        if rng.random() < 0.5:  # ellipse
            distance = (np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2) - 1) * min(ry, rx)
        else:  # axis-aligned rectangle
            distance = np.maximum(np.abs(y - cy) - ry, np.abs(x - cx) - rx)
        mask = _soft_mask(distance, softness)[..., None]
        image = image * (1 - mask) + colour * mask
    return image


def add_anomaly(image: np.ndarray, kind: str, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`image` (S, S, 3) float32 in [0, 255] with one defect of `kind`."""
    size = x.shape[0]
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.2, 0.2)
        distance = np.abs(math.cos(angle) * (x - 0.5) + math.sin(angle) * (y - 0.5) - offset)
        width = max(0.6, size / 64) / size  # at least a pixel wide
        mask = (distance < width)[..., None]
        shade = 250.0 if rng.random() < 0.5 else 10.0
        return np.where(mask, shade, image)
    if kind == "blot":
        cy, cx = rng.uniform(0.25, 0.75, 2).tolist()
        radius = rng.uniform(0.08, 0.16)
        theta = np.arctan2(y - cy, x - cx)
        wobble = 1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.15 * np.sin(5 * theta + rng.uniform(0, 6))
        distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) - radius * wobble
        mask = _soft_mask(distance, 0.6 / size)[..., None]
        return image * (1 - mask) + np.array((35, 25, 15), np.float32) * mask
    if kind == "noise":
        side = max(2, size // 2)
        top, left = rng.integers(0, size - side + 1, 2)
        noisy = image.copy()
        noisy[top : top + side, left : left + side] += rng.normal(0, 60, (side, side, 3)).astype(np.float32)
        return noisy
    if kind == "colour_shift":
        return image[..., [2, 0, 1]] if rng.random() < 0.5 else image[..., [1, 2, 0]]
    if kind == "foreign_object":
        side = max(4, size // 4)
        top, left = rng.integers(0, size - side + 1, 2)
        cell = max(1, side // 4)
        checks = np.add.outer(np.arange(side) // cell, np.arange(side) // cell) % 2
        patch = np.where(checks[..., None] == 1, np.float32(255), np.float32(0)) * np.ones(3, np.float32)
        out = image.copy()
        out[top : top + side, left : left + side] = patch
        return out
    raise ValueError(f"unknown anomaly kind {kind!r}; choose from {ANOMALY_KINDS}")


def _to_uint8(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        image = image @ _LUMA  # (S, S)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def anomaly_plan(n: int, anomaly_fraction: float, seed: int, kinds: tuple[str, ...] = ANOMALY_KINDS) -> dict[int, str]:
    """Which image indices are anomalies, and of which kind: {index: kind}, kinds in equal shares."""
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise InputError(f"anomaly_fraction must be in [0, 1], got {anomaly_fraction}")
    count = round(n * anomaly_fraction)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=count, replace=False) if count else np.empty(0, np.int64)
    return {int(index): kinds[j % len(kinds)] for j, index in enumerate(chosen)}


def synthetic_image(index: int, seed: int, image_size: int, channels: int, kind: str = "") -> np.ndarray:
    """Image `index` of the corpus for `seed`, uint8 (S, S, channels); `kind` "" for a normal one."""
    y, x = _grid(image_size)
    rng = np.random.default_rng([seed, index])
    image = normal_image(rng, y, x)
    if kind:
        image = add_anomaly(image, kind, rng, y, x)
    pixels = _to_uint8(image, channels)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def write_synthetic_corpus(
    out_url: str,
    n: int,
    image_size: int = 64,
    anomaly_fraction: float = 0.05,
    seed: int = 0,
    rows_per_shard: int = 1024,
    channels: int = 3,
) -> dict:
    """Write `n` synthetic images as Parquet shards `part-00000.parquet`, ... under `out_url`.

    Shards from an earlier run under the same prefix that this run does not write (a run
    with a different `n` or `rows_per_shard`) are removed afterwards, so the prefix holds
    exactly this corpus. Returns the summary, also written to `<out_url>/_synth_summary.json`.
    """
    _check(n, image_size, anomaly_fraction, rows_per_shard, channels)
    plan = anomaly_plan(n, anomaly_fraction, seed)
    y, x = _grid(image_size)

    def png(index: int) -> bytes:
        rng = np.random.default_rng([seed, index])
        image = normal_image(rng, y, x)
        if index in plan:
            image = add_anomaly(image, plan[index], rng, y, x)
        # zlib level 1: a third of the default's time for 30% more bytes; PNG stays lossless.
        return encode_image(_to_uint8(image, channels), compress_level=1)

    written = []
    progress = Progress("synth", n, unit="images")
    for shard_number, start in enumerate(range(0, n, rows_per_shard)):
        indices = range(start, min(n, start + rows_per_shard))
        kinds = [plan.get(index, "") for index in indices]
        table = pa.table(
            {
                "id": pa.array([f"synth-{index:08d}" for index in indices], pa.string()),
                "image": pa.array([png(index) for index in indices], pa.binary()),
                "label": pa.array([1 if kind else 0 for kind in kinds], pa.int64()),
                "anomaly_kind": pa.array(kinds, pa.string()),
            }
        )
        name = f"{SHARD_PREFIX}{shard_number:05d}.parquet"
        write_shard(storage.join(out_url, name), table)
        written.append(name)
        progress.update(min(n, start + rows_per_shard))
    progress.close()
    removed = remove_stale_shards(out_url, keep=written)
    summary = {
        "images": n,
        "anomalies": len(plan),
        "anomalies_by_kind": dict(sorted(Counter(plan.values()).items())),
        "image_size": image_size,
        "channels": channels,
        "seed": seed,
        "anomaly_fraction": anomaly_fraction,
        "rows_per_shard": rows_per_shard,
        "shards": written,
        "stale_shards_removed": removed,
    }
    storage.write_text(storage.join(out_url, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass(frozen=True)
class SynthPlan:
    """The synth job's config and its hold on the output folder, which the caller releases
    (`jobs.synth` through `pipeline.lease.run_prepared`)."""

    cfg: SynthConfig
    lease: Lease


def prepare(cfg: SynthConfig) -> SynthPlan:
    """Take the output folder's lease before the first write: a second job into the same folder refuses
    (its stale-shard removal would take the other's shards)."""
    return SynthPlan(cfg, Lease.acquire(cfg.out_url, "synth job"))


def run(plan: SynthPlan) -> dict:
    """Write the corpus the plan describes; returns the summary."""
    cfg = plan.cfg
    summary = write_synthetic_corpus(cfg.out_url, cfg.n, image_size=cfg.image_size,
                                     anomaly_fraction=cfg.anomaly_fraction, seed=cfg.seed,
                                     rows_per_shard=cfg.rows_per_shard, channels=cfg.channels)
    plan.lease.check()
    return summary
