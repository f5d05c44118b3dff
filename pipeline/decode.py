"""Decoding: latent dataset -> images, written as image shards that feed back into the pipeline.

The latent dataset (pipeline.embed) is a lossy compressed copy of the corpus; this stage
turns its vectors back into pictures: read the latent Parquet -> keep the selected ids
whose latent is not null (a Ray Data filter) -> `LatentDecoder` (actor pool) -> Parquet.

`LatentDecoder` is the mapper: `__init__` loads the checkpoint once; `__call__` takes a
plain dict batch {"id", "latent", ["latent_scale"]} (the latent dataset's columns, as Ray
Data's numpy format or a test hands them over) and returns image-shard rows. It runs
without Ray too.

Output, the image-shard contract of DESIGN.md, so decoded images can be embedded again:
    part-*.parquet          id (string), image (PNG or JPEG bytes, binary),
                            width, height (int32), format (string), source ("decoded")
    _decode.json            the job's config and summary (names starting with "_" are
                            never read as shards)

Selection: every row, `ids` (each must exist; a missing one is an error naming a few), or
`sample` N ids drawn from the rows that have a latent: the N smallest values of a keyed
hash of (seed, id), so the draw depends on the seed and the ids only, never on file
layout, worker count or order. Rows whose latent is null (the image failed to decode
upstream) are skipped and counted by reason in the summary.

Stable names: files are `part-<task>-<i>.parquet` written in Ray's overwrite mode, so a
rerun replaces the previous output instead of adding to it. Because overwrite clears the
folder, a folder that holds anything other than this job's output is refused.

`interpolation_grid` decodes the straight line between two stored latents into one strip.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.checkpoint import load_checkpoint, read_checkpoint_meta
from pipeline.datasets import read_parquet
from pipeline.embed import METADATA_KEY, dequantize_latents, plan_resources
from pipeline.images import encode_image
from pipeline.model import AutoencoderConfig, fuse_for_inference
from pipeline.shards import SHARD_PREFIX, remove_stale_shards

IMAGE_FORMATS = ("png", "jpeg")
SOURCE = "decoded"
RUN_FILE = "_decode.json"
LATENT_COLUMNS = ("id", "latent", "latent_scale")
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("source", pa.string()),
])
MISSING_SHOWN = 5  # missing ids named in an error


class DecodeInputError(ValueError):
    """The job cannot run as asked; raised before any work starts."""


# ------------------------------------------------------------------------------ the mapper


def latents_from_batch(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's `latent` (and `latent_scale`) -> (valid (N,) bool, z (n_valid, D) float32).

    `latent` is an (N, D) array, or an object array of vectors and None (Ray's numpy form of
    a fixed_size_list with nulls, or a list from pyarrow's to_pylist).
    """
    raw = batch["latent"]
    if isinstance(raw, np.ndarray) and raw.dtype != object and raw.ndim == 2:
        valid = np.ones(len(raw), dtype=bool)
        stored = raw
    else:
        rows = list(raw)
        # A null may also arrive as a float NaN (pandas' null) rather than None.
        valid = np.array([r is not None and not (isinstance(r, float) and r != r) for r in rows], dtype=bool)
        kept = [np.asarray(r) for r, ok in zip(rows, valid) if ok]
        stored = np.stack(kept) if kept else np.zeros((0, 0), np.float32)
    # Only int8 latents have a scale column; lists from to_pylist() lose the int8 dtype.
    scale = batch.get("latent_scale")
    if scale is not None:
        scale = np.asarray([s for s, ok in zip(scale, valid) if ok], dtype=np.float32)
    return valid, dequantize_latents(stored, scale)


def to_pixels(x_hat: torch.Tensor) -> np.ndarray:
    """(B, C, S, S) floats in [0, 1] -> (B, S, S, C) uint8, rounded to nearest."""
    return x_hat.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_decoder(model_url: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, AutoencoderConfig]:
    """The checkpoint's model as the job runs it: BatchNorm folded in, channels_last (same outputs
    as `checkpoint.model` to float rounding, so a pixel may differ by one level)."""
    checkpoint = load_checkpoint(model_url, device=device)
    return fuse_for_inference(checkpoint.model).to(memory_format=torch.channels_last), checkpoint.config


@torch.inference_mode()
def decode_latents(model: torch.nn.Module, z: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """(B, latent_dim) float32 -> (B, S, S, C) uint8: the model's decoder, rounded to pixels."""
    return to_pixels(model.decode(torch.from_numpy(np.ascontiguousarray(z, np.float32)).to(device)))


class LatentDecoder:
    """Latent rows -> image-shard rows. Loads the model once; runs with or without Ray."""

    def __init__(self, model_url: str, image_format: str = "png", quality: int = 95, device: str | None = None,
                 torch_threads: int | None = None):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.config = load_decoder(model_url, self.device)
        self.image_format = image_format
        self.quality = quality

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        ids = np.asarray(batch["id"]).astype(str)
        valid, z = latents_from_batch(batch)
        if z.shape[0] and z.shape[1] != self.config.latent_dim:
            raise ValueError(f"latents have {z.shape[1]} dimensions but the model expects {self.config.latent_dim}")
        # Null latents are skipped here too; the job counts them before it starts.
        pixels = decode_latents(self.model, z, self.device) if z.shape[0] else []
        images = [encode_image(p, self.image_format, quality=self.quality) for p in pixels]
        n, side = len(images), self.config.image_size
        return pa.table({
            "id": pa.array(ids[valid], pa.string()),
            "image": pa.array(images, pa.binary()),
            "width": pa.array(np.full(n, side, np.int32)),
            "height": pa.array(np.full(n, side, np.int32)),
            "format": pa.array([self.image_format] * n, pa.string()),
            "source": pa.array([SOURCE] * n, pa.string()),
        }, schema=OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------ selection


def sample_key(seed: int, row_id: str) -> int:
    """The rank of `row_id` in the draw for `seed`: a keyed 64-bit hash (independent of order)."""
    digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8, key=str(seed).encode("utf-8")).digest()
    return int.from_bytes(digest, "big")


@dataclass
class Selection:
    """What the job will decode, from a scan of the latents' id, latent validity and error columns."""

    rows_in: int
    rows_without_latent: int  # in the whole input; a sample is drawn from the other rows
    ids: list[str] | None  # None: every row that has a latent
    selected: int  # rows named by the selection (with or without a latent)
    skipped_null_latent: int
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def to_decode(self) -> int:
        return self.selected - self.skipped_null_latent


def _latent_paths(url: str) -> tuple[Any, list[str]]:
    return storage.arrow_files(url)


def _latent_dataset(url: str) -> pads.Dataset:
    fs, paths = _latent_paths(url)
    return pads.dataset(paths, filesystem=fs, format="parquet")


def select_rows(url: str, ids: Sequence[str] = (), sample: int | None = None, seed: int = 0,
                batch_rows: int = 65_536) -> Selection:
    """Scan the latents once (ids and latent validity, streamed) and resolve the selection."""
    if ids and sample is not None:
        raise DecodeInputError("give --ids or --sample, not both")
    if sample is not None and sample < 1:
        raise DecodeInputError(f"--sample must be positive, got {sample}")
    dataset = _latent_dataset(url)
    has_error = "error" in dataset.schema.names
    projection = {"id": pc.field("id"), "has_latent": pc.is_valid(pc.field("latent"))}
    if has_error:
        projection["error"] = pc.field("error")
    wanted = list(dict.fromkeys(str(i) for i in ids))
    wanted_array = pa.array(wanted, pa.string())
    found: set[str] = set()
    reasons: Counter[str] = Counter()
    rows_in = selected = skipped = without_latent = 0
    best_keys = np.zeros(0, np.uint64)
    best_ids = np.zeros(0, object)
    for batch in dataset.to_batches(columns=projection, batch_size=batch_rows):
        rows_in += batch.num_rows
        batch_ids = batch.column("id").to_numpy(zero_copy_only=False).astype(str)
        has_latent = batch.column("has_latent").to_numpy(zero_copy_only=False)
        errors = batch.column("error").to_pylist() if has_error else [None] * batch.num_rows
        without_latent += int((~has_latent).sum())
        if wanted:
            mine = pc.is_in(batch.column("id"), value_set=wanted_array).to_numpy(zero_copy_only=False)
            found.update(batch_ids[mine].tolist())
        else:
            mine = np.ones(len(batch_ids), bool)
        if sample is None:
            selected += int(mine.sum())
            null_rows = mine & ~has_latent
            skipped += int(null_rows.sum())
            reasons.update(errors[i] or "null latent" for i in np.flatnonzero(null_rows))
            continue
        # Sample: keep the `sample` smallest keys among rows that have a latent.
        candidates = batch_ids[has_latent]
        keys = np.fromiter((sample_key(seed, i) for i in candidates), np.uint64, len(candidates))
        best_keys = np.concatenate([best_keys, keys])
        best_ids = np.concatenate([best_ids, candidates.astype(object)])
        if len(best_keys) > sample:
            keep = np.argpartition(best_keys, sample - 1)[:sample]
            best_keys, best_ids = best_keys[keep], best_ids[keep]
    if wanted:
        missing = [i for i in wanted if i not in found]
        if missing:
            shown = ", ".join(repr(i) for i in missing[:MISSING_SHOWN])
            more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
            raise DecodeInputError(f"{len(missing)} of the {len(wanted)} requested ids are not in {url}: {shown}{more}")
        return Selection(rows_in, without_latent, wanted, selected, skipped, dict(reasons))
    if sample is not None:
        if len(best_ids) < sample:
            raise DecodeInputError(f"--sample {sample} asks for more ids than the {len(best_ids)} rows of {url} "
                                   "that have a latent")
        return Selection(rows_in, without_latent, sorted(best_ids.tolist()), sample, 0, {})
    return Selection(rows_in, without_latent, None, selected, skipped, dict(reasons))


# ------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class DecodeConfig:
    latents: str
    model: str
    out: str
    ids: tuple[str, ...] = ()
    sample: int | None = None
    image_format: str = "png"
    quality: int = 95  # JPEG only
    seed: int = 0
    batch_size: int | None = None  # None: the embed job's tuned sizes (pipeline.embed.plan_resources)
    actors: int | None = None
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    torch_threads: int | None = None
    rows_per_file: int = 5_000


@dataclass
class DecodeSummary:
    rows_in: int
    rows_without_latent: int
    selected: int
    skipped_null_latent: int
    written: int
    files: list[str]
    seconds: float
    images_per_s: float
    out: str
    skipped_by_reason: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model_fits(latents_url: str, model_url: str) -> dict[str, Any]:
    """The checkpoint's meta, after checking it is the model (or at least the shape) the latents came from."""
    meta = read_checkpoint_meta(model_url)
    schema = _latent_dataset(latents_url).schema
    for name in ("id", "latent"):
        if name not in schema.names:
            raise DecodeInputError(f"{latents_url} is not a latent dataset: no {name!r} column "
                                   f"(columns: {', '.join(schema.names)})")
    latent_type = schema.field("latent").type
    dim = latent_type.list_size if pa.types.is_fixed_size_list(latent_type) else None
    if dim is not None and dim != meta["model"]["latent_dim"]:
        raise DecodeInputError(f"the latents have {dim} dimensions but the model at {model_url} has "
                               f"latent_dim {meta['model']['latent_dim']}")
    recorded = (schema.metadata or {}).get(METADATA_KEY)
    if recorded:
        sha = json.loads(recorded).get("weights_sha256")
        if sha and meta.get("weights_sha256") and sha != meta["weights_sha256"]:
            raise DecodeInputError(f"the latents under {latents_url} were made by another model (weights {sha[:12]}, "
                                   f"{model_url} has {meta['weights_sha256'][:12]}): its decoder would give noise")
    return meta


def check_output_folder(cfg: DecodeConfig) -> None:
    """Overwrite mode clears `out`: refuse a folder that holds anything but this job's output."""
    out_path = storage.filesystem(cfg.out)[1]
    if out_path == storage.filesystem(cfg.latents)[1]:
        raise DecodeInputError("--out must not be the latents folder")
    fs, path = storage.filesystem(cfg.out)
    if not fs.exists(path):
        return
    foreign = []
    for found in fs.find(path):
        rel = posixpath.relpath(found, path)
        name = posixpath.basename(rel)
        ours = "/" not in rel and (name == RUN_FILE or (name.startswith(SHARD_PREFIX) and name.endswith(".parquet")))
        if not ours:
            foreign.append(rel)
    if foreign:
        raise DecodeInputError(f"{cfg.out} holds files that are not this job's output (e.g. {foreign[:3]}); "
                               "a run replaces the folder's contents: use a new --out")


def _stable_names():
    """part-<task>-<i>.parquet: no write uuid, so a rerun writes the same names (overwrite mode)."""
    from ray.data.datasource import FilenameProvider

    class StableNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{SHARD_PREFIX}{task_index:05d}"

    return StableNames()


def count_written(url: str) -> tuple[int, list[str]]:
    files = storage.list_files(url)
    return sum(pq.read_metadata(storage.filesystem(f)[1], filesystem=storage.arrow_filesystem(f)[0]).num_rows
               for f in files), [posixpath.basename(f) for f in files]


def decode(cfg: DecodeConfig) -> DecodeSummary:
    """Run the decoding job described by `cfg` on the connected Ray cluster."""
    started = time.perf_counter()
    if cfg.image_format not in IMAGE_FORMATS:
        raise DecodeInputError(f"--format must be one of {IMAGE_FORMATS}, got {cfg.image_format!r}")
    if not 1 <= cfg.quality <= 100:
        raise DecodeInputError(f"--quality must be in 1..100, got {cfg.quality}")
    meta = check_model_fits(cfg.latents, cfg.model)
    check_output_folder(cfg)
    selection = select_rows(cfg.latents, cfg.ids, cfg.sample, cfg.seed)
    what = f"{len(selection.ids)} selected ids" if selection.ids is not None else "every row"
    print(f"decoding {what} of {selection.rows_in:,} latent rows ({selection.skipped_null_latent} of them without "
          f"a latent, skipped) with the {meta['model']['arch']} model {cfg.model} -> {cfg.image_format} shards in "
          f"{cfg.out}", flush=True)
    if selection.to_decode:
        _run_pipeline(cfg, selection)
        written, files = count_written(cfg.out)
    else:  # nothing to write: an earlier run's shards are replaced by none
        storage.makedirs(cfg.out)
        remove_stale_shards(cfg.out, keep=[])
        written, files = 0, []
    seconds = time.perf_counter() - started
    summary = DecodeSummary(
        rows_in=selection.rows_in, rows_without_latent=selection.rows_without_latent, selected=selection.selected,
        skipped_null_latent=selection.skipped_null_latent, written=written, files=files, seconds=seconds,
        images_per_s=written / max(seconds, 1e-9), out=cfg.out, skipped_by_reason=selection.skipped_by_reason)
    storage.write_text(storage.join(cfg.out, RUN_FILE),
                       json.dumps({"config": asdict(cfg), "summary": summary.to_dict()}, indent=2, sort_keys=True))
    if written != selection.to_decode:
        raise RuntimeError(f"expected {selection.to_decode} decoded rows in {cfg.out} but found {written}")
    return summary


def _run_pipeline(cfg: DecodeConfig, selection: Selection) -> None:
    """read latents -> filter (selected ids with a latent) -> LatentDecoder actors -> image shards."""
    import ray
    from ray.data import ActorPoolStrategy, SaveMode
    from ray.data.expressions import col

    # The embed job's planner: its actor pool leaves CPU for the read, filter and write tasks.
    plan = plan_resources(ray.cluster_resources(), resuming=False, actors=cfg.actors, gpu=cfg.gpu,
                          torch_threads=cfg.torch_threads, batch_size=cfg.batch_size)
    print(f"{plan.actors} decoder actor(s) x {plan.cpus_per_actor:g} CPU"
          f"{f' + {plan.gpus_per_actor:g} GPU' if plan.gpus_per_actor else ''}, {plan.torch_threads} torch threads",
          flush=True)
    in_fs, paths = _latent_paths(cfg.latents)
    names = _latent_dataset(cfg.latents).schema.names
    ds = read_parquet(paths, in_fs, num_cpus=plan.task_cpus).select_columns(
        [c for c in LATENT_COLUMNS if c in names])
    keep = col("latent").is_not_null()
    if selection.ids is not None:
        keep = keep & col("id").is_in(selection.ids)
    ds = ds.filter(expr=keep, num_cpus=plan.task_cpus)
    ds = ds.map_batches(
        LatentDecoder, batch_format="numpy", batch_size=plan.batch_size,
        fn_constructor_kwargs=dict(model_url=cfg.model, image_format=cfg.image_format, quality=cfg.quality,
                                   torch_threads=plan.torch_threads, device="cuda" if plan.gpus_per_actor else "cpu"),
        compute=ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor)
    fs, out_path = storage.arrow_filesystem(cfg.out)
    ds.write_parquet(out_path, filesystem=fs, filename_provider=_stable_names(), mode=SaveMode.OVERWRITE,
                     min_rows_per_file=min(cfg.rows_per_file, selection.to_decode),
                     # Encoded images do not compress further; the rest gets zstd (as write_shard does).
                     compression={"image": "none", "id": "zstd", "format": "zstd", "source": "zstd",
                                  "width": "zstd", "height": "zstd"},
                     ray_remote_args={"num_cpus": plan.task_cpus})  # write_parquet has no num_cpus=


# ------------------------------------------------------------------------------ generation


def read_latent_rows(latents_url: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """{id: dequantized float32 latent} for `ids`; DecodeInputError naming any missing or null one."""
    dataset = _latent_dataset(latents_url)
    columns = [c for c in LATENT_COLUMNS if c in dataset.schema.names]
    table = dataset.to_table(columns=columns, filter=pc.field("id").isin(list(ids)))
    found = dict(zip(table.column("id").to_pylist(), range(table.num_rows)))
    missing = [i for i in ids if i not in found]
    if missing:
        raise DecodeInputError(f"ids not in {latents_url}: {', '.join(repr(i) for i in missing[:MISSING_SHOWN])}")
    rows = table.take([found[i] for i in ids]).to_pydict()
    valid, z = latents_from_batch(rows)
    if not valid.all():
        null = [i for i, ok in zip(ids, valid) if not ok]
        raise DecodeInputError(f"ids with no latent (their image failed to decode upstream): {null}")
    return {i: z[k] for k, i in enumerate(ids)}


def interpolation_grid(model_url: str, latents_url: str, id_a: str, id_b: str, steps: int = 8) -> np.ndarray:
    """An (S, steps * S, C) uint8 strip: `steps` images decoded along the straight line from
    id_a's latent to id_b's (dequantized), both endpoints included."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (both endpoints), got {steps}")
    check_model_fits(latents_url, model_url)
    z = read_latent_rows(latents_url, [id_a, id_b])
    model, _ = load_decoder(model_url)
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]  # (steps, 1)
    line = (1.0 - t) * z[id_a][None] + t * z[id_b][None]  # (steps, latent_dim)
    line[-1] = z[id_b]  # exact endpoint, whatever (1 - 1) * a + 1 * b rounds to
    pixels = decode_latents(model, line)  # (steps, S, S, C)
    return np.concatenate(list(pixels), axis=1)  # (S, steps * S, C)
