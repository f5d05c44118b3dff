"""Decoding: latent dataset -> images, written as image shards that feed back into the pipeline.

The latent dataset (pipeline.latents) is a lossy compressed copy of the corpus; this stage
turns its vectors back into pictures: read the latent Parquet -> keep the selected ids
whose latent is not null (a Ray Data filter) -> `LatentDecoder` (actor pool) -> Parquet.

`LatentDecoder` is the mapper: `__init__` loads the checkpoint once; `__call__` takes a
plain dict batch {"id", "latent", ["latent_scale"]} (the latent dataset's columns, as Ray
Data's numpy format or a test hands them over) and returns image-shard rows. It runs
without Ray too.

Output, the image-shard contract (README, "Data contracts"), so decoded images can be embedded again:
    part-*.parquet          id (string), image (PNG or JPEG bytes, as the Hugging Face Image
                            feature struct<bytes, path>), width, height (int32), format
                            (string), source ("decoded"); the schema metadata `datasets`
                            writes, so `datasets.load_dataset("parquet", ...)` gives PIL images
    _decode.json            the job's config and summary (names starting with "_" are
                            never read as shards)

Selection: every row, `ids` (each must exist; a missing one is an error naming a few), or
`sample` N ids drawn from the rows that have a latent: the N smallest values of a keyed
hash of (seed, id), so the draw depends on the seed and the ids only, never on file
layout, worker count or order. Rows whose latent is null (the image failed to decode
upstream) are skipped and counted by reason in the summary.

Replaced, never added to: files are `part-<write uuid>-<task>-<i>.parquet`, and a run
first removes the `part-*` shards of the run before it. A
folder that holds anything other than this job's output is refused. One decode job at a
time holds the folder (`pipeline.lease`).

The job is two steps: `prepare` checks the model, the output folder and resolves the
selection without Ray; `run` decodes on the connected cluster. `decode` does both.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import storage
from pipeline.checkpoint import read_checkpoint_meta
from pipeline.datasets import read_parquet
from pipeline.errors import InputError, JobFailed
from pipeline.images import encode_image
from pipeline.inference import decode_latents, load_inference_model
from pipeline.latents import (
    LATENT_COLUMNS,
    MISSING_SHOWN,
    check_model_fits,
    latent_dataset,
    latents_from_batch,
    require_finished,
)
from pipeline.lease import LEASE_DIR, Lease, run_prepared
from pipeline.progress import Progress, TallyClient, TallyWatch
from pipeline.resources import largest_node_cpus, plan_actor_pool, pool_setting_problems
from pipeline.sampling import sample_keys
from pipeline.hf_features import HF_IMAGE, hf_image_column, with_hf_features
from pipeline.shards import SHARD_PREFIX, id_strings, remove_stale_shards

IMAGE_FORMATS = ("png", "jpeg")
SOURCE = "decoded"
RUN_FILE = "_decode.json"
OUTPUT_SCHEMA = with_hf_features(pa.schema([
    ("id", pa.string()),
    ("image", HF_IMAGE),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("source", pa.string()),
]))


# ------------------------------------------------------------------------------ the mapper


class LatentDecoder:
    """Latent rows -> image-shard rows. Loads the model once; runs with or without Ray."""

    def __init__(self, model_url: str, image_format: str = "png", quality: int = 95, device: str | None = None,
                 torch_threads: int | None = None, on_rows: Callable[[int], None] | None = None):
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, checkpoint = load_inference_model(model_url, self.device)
        self.config = checkpoint.config
        self.image_format = image_format
        self.quality = quality
        self.on_rows = on_rows  # progress: told the rows of each finished batch

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        ids = id_strings(batch["id"])
        valid, z = latents_from_batch(batch)
        if z.shape[0] and z.shape[1] != self.config.latent_dim:
            raise ValueError(f"latents have {z.shape[1]} dimensions but the model expects {self.config.latent_dim}")
        # Null latents are skipped here too; the job counts them before it starts.
        pixels = decode_latents(self.model, z, self.device) if z.shape[0] else []
        images = [encode_image(p, self.image_format, quality=self.quality) for p in pixels]
        n, side = len(images), self.config.image_size
        if self.on_rows is not None:
            self.on_rows(n)
        return pa.table({
            "id": pa.array(list(ids[valid]), pa.string()),
            "image": hf_image_column(images),
            "width": pa.array(np.full(n, side, np.int32)),
            "height": pa.array(np.full(n, side, np.int32)),
            "format": pa.array([self.image_format] * n, pa.string()),
            "source": pa.array([SOURCE] * n, pa.string()),
        }, schema=OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------ selection


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


def select_rows(url: str, ids: Sequence[str] = (), sample: int | None = None, seed: int = 0,
                batch_rows: int = 65_536) -> Selection:
    """Scan the latents once (ids and latent validity, streamed) and resolve the selection."""
    if ids and sample is not None:
        raise InputError("give --ids or --sample, not both")
    if sample is not None and sample < 1:
        raise InputError(f"--sample must be positive, got {sample}")
    dataset = latent_dataset(url)
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
        batch_ids = id_strings(batch.column("id"))
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
        keys = sample_keys(candidates, seed)
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
            raise InputError(f"{len(missing)} of the {len(wanted)} requested ids are not in {url}: {shown}{more}")
        return Selection(rows_in, without_latent, wanted, selected, skipped, dict(reasons))
    if sample is not None:
        if len(best_ids) < sample:
            raise InputError(f"--sample {sample} asks for more ids than the {len(best_ids)} rows of {url} "
                                   "that have a latent")
        return Selection(rows_in, without_latent, sorted(best_ids.tolist()), sample, 0, {})
    return Selection(rows_in, without_latent, None, selected, skipped, dict(reasons))


# ------------------------------------------------------------------------------ the job


@dataclass(frozen=True)
class DecodeConfig:
    """Everything a decode run depends on; validated when built (InputError)."""

    latents_url: str
    model_url: str
    out_url: str
    ids: tuple[str, ...] = ()
    sample: int | None = None
    image_format: str = "png"
    quality: int = 95  # JPEG only
    seed: int = 0
    batch_size: int | None = None  # None: the inference jobs' tuned sizes (pipeline.resources)
    actors: int | None = None
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    torch_threads: int | None = None
    rows_per_file: int = 5_000
    allow_partial: bool = False  # decode from a latent dataset whose embed job never finished

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))
        problems = []
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"--format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            problems.append(f"--quality must be in 1..100, got {self.quality}")
        problems += pool_setting_problems(self.batch_size, self.actors, self.torch_threads, self.rows_per_file)
        if problems:
            raise InputError("; ".join(problems))


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
    partial: str | None = None  # "partial: N of M rows ..." when the latents were unfinished

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_output_folder(cfg: DecodeConfig) -> None:
    """A run replaces the shards in `out_url`: refuse a folder that holds anything but this job's output."""
    fs, path = storage.filesystem(cfg.out_url)
    if not fs.exists(path):
        return
    foreign = []
    for found in fs.find(path):
        rel = posixpath.relpath(found, path)
        name = posixpath.basename(rel)
        ours = rel.startswith(LEASE_DIR + "/") or "/" not in rel and (
            name == RUN_FILE or (name.startswith(SHARD_PREFIX) and name.endswith(".parquet")))
        if not ours:
            foreign.append(rel)
    if foreign:
        raise InputError(f"{cfg.out_url} holds files that are not this job's output (e.g. {foreign[:3]}); "
                         "a run replaces the folder's contents: use a new --out")


def _shard_names():
    """part-<write uuid>-<task>-<i>.parquet: our prefix, so that a rerun finds and replaces these."""
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"{SHARD_PREFIX}{write_uuid}-{task_index:05d}"

    return ShardNames()


def count_written(url: str) -> tuple[int, list[str]]:
    files = storage.list_files(url)
    return sum(pq.read_metadata(storage.filesystem(f)[1], filesystem=storage.arrow_filesystem(f)[0]).num_rows
               for f in files), [posixpath.basename(f) for f in files]


@dataclass(frozen=True)
class DecodePlan:
    """What `prepare` found: the config, the model's metadata and the rows to decode."""

    cfg: DecodeConfig
    model_meta: dict[str, Any]
    selection: Selection
    partial: str | None
    lease: Lease  # this job's hold on the output folder; the caller releases it (`decode` does)


def prepare(cfg: DecodeConfig) -> DecodePlan:
    """Every check that needs no Ray: the model fits the latents, the output folder, the selection."""
    storage.check_apart({"--latents": cfg.latents_url}, {"--out": cfg.out_url})
    meta = read_checkpoint_meta(cfg.model_url)
    check_model_fits(cfg.latents_url, meta, cfg.model_url)
    partial = require_finished(cfg.latents_url, cfg.allow_partial).partial_note
    check_output_folder(cfg)
    selection = select_rows(cfg.latents_url, cfg.ids, cfg.sample, cfg.seed)
    lease = Lease.acquire(cfg.out_url, "decode job")  # held from here: its run replaces the folder's shards
    with lease.released_on_error():
        check_output_folder(cfg)  # again, under the lease: nothing slipped in since the first look
    return DecodePlan(cfg=cfg, model_meta=meta, selection=selection, partial=partial, lease=lease)


def run(plan: DecodePlan) -> DecodeSummary:
    """Decode the selected latents on the connected Ray cluster and write the image shards."""
    started = time.perf_counter()
    cfg, selection = plan.cfg, plan.selection
    what = f"{len(selection.ids)} selected ids" if selection.ids is not None else "every row"
    if plan.partial:
        print(plan.partial, flush=True)
    print(f"decoding {what} of {selection.rows_in:,} latent rows ({selection.skipped_null_latent} of them without "
          f"a latent, skipped) with the {plan.model_meta['model']['arch']} model {cfg.model_url} -> "
          f"{cfg.image_format} shards in {cfg.out_url}", flush=True)
    # An earlier run's shards are replaced, not added to: ours (part-*) go first, the folder's
    # lease and run record stay (Ray's overwrite mode would clear the whole folder, lease too).
    storage.makedirs(cfg.out_url)
    remove_stale_shards(cfg.out_url, keep=[])
    if selection.to_decode:
        with TallyWatch(Progress("decode", selection.to_decode)) as watch:
            _pipeline(cfg, selection, watch.client)
        written, files = count_written(cfg.out_url)
    else:
        written, files = 0, []
    seconds = time.perf_counter() - started
    summary = DecodeSummary(
        rows_in=selection.rows_in, rows_without_latent=selection.rows_without_latent, selected=selection.selected,
        skipped_null_latent=selection.skipped_null_latent, written=written, files=files, seconds=seconds,
        images_per_s=written / max(seconds, 1e-9), out=cfg.out_url, skipped_by_reason=selection.skipped_by_reason,
        partial=plan.partial)
    storage.write_text(storage.join(cfg.out_url, RUN_FILE),
                       json.dumps({"config": asdict(cfg), "summary": summary.to_dict()}, indent=2, sort_keys=True))
    plan.lease.check()
    if written != selection.to_decode:  # a row lost or doubled: the job says so (exit 1), with what it wrote
        raise JobFailed(f"{selection.to_decode} latent rows selected but {written} decoded rows in {cfg.out_url} "
                        f"(does {cfg.latents_url} hold an id more than once, or did it change during the run?)",
                        summary)
    return summary


def decode(cfg: DecodeConfig) -> DecodeSummary:
    """Run the decoding job described by `cfg` on the connected Ray cluster."""
    return run_prepared(prepare, run, cfg)


def _pipeline(cfg: DecodeConfig, selection: Selection, on_rows: TallyClient) -> None:
    """read latents -> filter (selected ids with a latent) -> LatentDecoder actors -> image shards."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    # The inference jobs' planner: its actor pool leaves CPU for the read, filter and write tasks.
    resources = plan_actor_pool(ray.cluster_resources(), resuming=False, actors=cfg.actors, gpu=cfg.gpu,
                                torch_threads=cfg.torch_threads, batch_size=cfg.batch_size,
                                node_cpus=largest_node_cpus())
    print(f"{resources.actors} decoder actor(s) x {resources.cpus_per_actor:g} CPU"
          f"{f' + {resources.gpus_per_actor:g} GPU' if resources.gpus_per_actor else ''}, "
          f"{resources.torch_threads} torch threads", flush=True)
    latents = latent_dataset(cfg.latents_url)
    ds = read_parquet(latents.files, latents.filesystem, [c for c in LATENT_COLUMNS if c in latents.schema.names],
                      num_cpus=resources.task_cpus)
    keep = col("latent").is_not_null()
    if selection.ids is not None:
        keep = keep & col("id").is_in(selection.ids)
    ds = ds.filter(expr=keep, num_cpus=resources.task_cpus)
    ds = ds.map_batches(
        LatentDecoder, batch_format="numpy", batch_size=resources.batch_size,
        fn_constructor_kwargs=dict(model_url=cfg.model_url, image_format=cfg.image_format, quality=cfg.quality,
                                   torch_threads=resources.torch_threads,
                                   device="cuda" if resources.gpus_per_actor else "cpu", on_rows=on_rows),
        compute=ActorPoolStrategy(size=resources.actors), num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor)
    fs, out_path = storage.arrow_filesystem(cfg.out_url)
    ds.write_parquet(out_path, filesystem=fs, filename_provider=_shard_names(),
                     min_rows_per_file=min(cfg.rows_per_file, selection.to_decode),
                     # Encoded images do not compress further; the rest gets zstd (as write_shard does).
                     compression={"image.bytes": "none", "image.path": "zstd", "id": "zstd", "format": "zstd",
                                  "source": "zstd", "width": "zstd", "height": "zstd"},
                     ray_remote_args={"num_cpus": resources.task_cpus})  # write_parquet has no num_cpus=
