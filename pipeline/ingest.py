"""Ingest: an image folder tree, Parquet in any supported layout, or WebDataset tar -> image shards.

Output (under `out`), every shard with the same schema:
    part-*.parquet          id (string), image (the original encoded bytes, binary),
                            width, height (int32, upright after EXIF orientation),
                            format (string: "png", "jpeg", ...), source (string),
                            label (+ anomaly_kind) when known, passthrough columns
    _rejects/part-*.parquet inputs that could not be read or decoded: path, id, reason
    _ingest_summary.json    counts (seen = written + rejected), reasons, shards, config

Rejects and the summary sit under names starting with "_", which shard listings skip
(`storage.list_files`, Ray's Parquet reader), so they are never read as image data.

Sources:
- A folder tree (any fsspec URL): every file whose extension is in `extensions`; others
  are counted per extension, never silently dropped; hidden files (".*") are skipped. The
  id is the path relative to the source root ("cats/001.jpg"), `source` the file's URL.
  `labels_from_folders` makes `label` the first sub-folder's name; with `normal_label`
  (e.g. "good" for MVTec AD) `label` is instead 0 for that folder and 1 for the others,
  and `anomaly_kind` holds the folder name ("" for normal), like the synthetic corpus.
- Parquet shards (`Columns` names the id and image columns; binary or the Hugging Face
  image struct; img2dataset is id "key", image "jpg"). Columns are checked and ids
  checked for uniqueness before any work. `label` is copied when the source has it. A
  derived id (`--id-column @row` or `image.path`, pipeline.formats) is made as the shard is read.
- WebDataset tar shards (img2dataset's `<key>.jpg|png|webp`, `<key>.json`, `<key>.txt`;
  pipeline.tars): the id is the sample key (or `json:<field>`), passthrough fields (`txt`,
  `json:<field>`) become string columns named as given; a sample without an image member is
  rejected with the reason "no image member". Keys are checked for duplicates before any work.

Stable names, so a rerun replaces rather than duplicates: files are sorted by id and cut
into shards by rows and/or MiB, named part-00000.parquet, ... in that order; Parquet input
shard i gives part-<i>-<j>.parquet. The same input and settings give byte-identical
shards. After a successful run, shards of ours (part-*) that this run did not write (a
previous run with another sizing, or a shard whose every image was rejected) are removed.
A run that dies part-way can leave a mix of old and new shards; rerun it to completion.
One ingest job at a time writes a folder: `prepare` takes its lease (`pipeline.lease`).

Where it runs: with `use_ray` (the default) one Ray Data task per output shard group, with
Ray's progress bars; the tasks read the source and write the shards themselves, so both
URLs must be reachable from every node (s3://, gs://, a shared filesystem; local paths
work on a one-machine cluster). memory:// lives inside one process, so it works only with
`use_ray=False`, which runs the same tasks one after another in this process.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError, JobFailed
from pipeline.images import DEFAULT_MAX_PIXELS, ImageDecodeError, inspect_image
from pipeline.lease import Lease, run_prepared
from pipeline.progress import Progress
from pipeline.formats import ShardReader
from pipeline.formats.base import REASON_COLUMN, descriptions, kinds, suffixes
from pipeline.shards import (
    SHARD_PREFIX,
    Columns,
    ShardList,
    fingerprint,
    image_bytes,
    implied_id_column,
    remove_stale_shards,
    write_shard,
)

SOURCE_FORMATS = ("auto", "folder", *kinds())
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".jp2", ".avif")
REJECTS_DIR = "_rejects"
SUMMARY_FILE = "_ingest_summary.json"
MIB = 1 << 20
REJECT_SCHEMA = pa.schema([("path", pa.string()), ("id", pa.string()), ("reason", pa.string())])
# Parquet input is read in batches of this many rows: bounded memory for any shard size.
READ_BATCH_ROWS = 1024
# Output columns ingest computes; every other output column is copied from Parquet input.
_COMPUTED_COLUMNS = ("id", "image", "width", "height", "format", "source")


@dataclass(frozen=True)
class IngestConfig:
    """Everything an ingest run depends on; logged at start and saved in the summary."""

    source_url: str
    out_url: str
    source_format: str = "auto"  # "auto": shards if the source holds *.parquet or *.tar, else a folder tree
    id_column: str = "id"  # shard input only (tar: "id" means the sample key, __key__)
    image_column: str = "image"  # shard input only
    passthrough: tuple[str, ...] = ()  # shard input: other columns (tar: fields) to copy
    labels_from_folders: bool = False  # folder input: label = first sub-folder's name
    normal_label: str | None = None  # folder input: label 0 for this folder, 1 for the others
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # folder input: files taken as images
    rows_per_shard: int | None = None  # a shard closes at this many rows ...
    mib_per_shard: float | None = 128.0  # ... or at this many MiB of image bytes
    max_pixels: int = DEFAULT_MAX_PIXELS
    use_ray: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.source_format not in SOURCE_FORMATS:
            problems.append(f"source_format must be one of {SOURCE_FORMATS}, got {self.source_format!r}")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            problems.append(f"rows_per_shard must be positive, got {self.rows_per_shard}")
        if self.mib_per_shard is not None and self.mib_per_shard <= 0:
            problems.append(f"mib_per_shard must be positive, got {self.mib_per_shard}")
        if self.normal_label is not None and not self.labels_from_folders:
            problems.append("normal_label needs labels_from_folders")
        if self.use_ray and (self.source_url.startswith("memory://") or self.out_url.startswith("memory://")):
            problems.append("memory:// URLs live inside one process and Ray workers cannot see them: use use_ray=False")
        if problems:
            raise InputError("invalid ingest settings: " + "; ".join(problems))
        object.__setattr__(self, "passthrough", tuple(self.passthrough))
        extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)
        object.__setattr__(self, "extensions", extensions)

    @property
    def columns(self) -> Columns:
        return Columns(id=self.id_column, image=self.image_column)

    def to_dict(self) -> dict:
        return asdict(self)


# --- planning (driver) -------------------------------------------------------------------


def _url(fs, path: str) -> str:
    """The URL of `path` inside `fs` (local paths stay plain)."""
    if isinstance(fs.protocol, str):
        protocol = fs.protocol
    else:
        protocol = fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _is_hidden(relative_path: str) -> bool:
    return any(part.startswith(".") for part in relative_path.split("/"))


def plan_folder(cfg: IngestConfig) -> tuple[list[dict], Counter]:
    """Cut the sorted image files under `cfg.source_url` into shard groups.

    Returns (tasks, skipped): each task {"name", "paths", "ids"}; skipped counts non-image
    files by extension ("" when none).
    """
    fs, root = storage.filesystem(cfg.source_url)
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        raise InputError(f"source folder {cfg.source_url} does not exist")
    files = []
    skipped: Counter = Counter()
    for path, info in fs.find(root, detail=True).items():
        relative = posixpath.relpath(path, root)
        if _is_hidden(relative):
            continue
        extension = posixpath.splitext(relative)[1].lower()
        if extension not in cfg.extensions:
            skipped[extension] += 1
            continue
        files.append((relative, path, int(info.get("size") or 0)))
    files.sort()
    row_limit = cfg.rows_per_shard or float("inf")
    byte_limit = cfg.mib_per_shard * MIB if cfg.mib_per_shard else float("inf")
    groups: list[list[tuple[str, str, int]]] = []
    rows = size = 0
    for entry in files:
        if not groups or rows >= row_limit or (rows and size + entry[2] > byte_limit):
            groups.append([])
            rows = size = 0
        groups[-1].append(entry)
        rows, size = rows + 1, size + entry[2]
    tasks = [
        {"name": f"{SHARD_PREFIX}{number:05d}", "ids": [e[0] for e in group], "paths": [e[1] for e in group]}
        for number, group in enumerate(groups)
    ]
    return tasks, skipped


def plan_shards(reader: ShardReader, passthrough: tuple[str, ...]) -> tuple[list[dict], pa.Schema]:
    """Check the input shards (columns from footers or tar headers, unique ids) and make one task per shard."""
    schema = reader.check(passthrough)
    reader.check_unique_ids()
    shards = reader.shards
    tasks = [{"name": f"{SHARD_PREFIX}{number:05d}", "url": url, "shard": name}
             for number, (url, name) in enumerate(zip(shards.files, shards.names))]
    return tasks, schema


def _output_schema(cfg: IngestConfig, source_schema: pa.Schema | None) -> pa.Schema:
    """The output columns; `source_schema` is the shards' (None for a folder tree)."""
    fields = [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
    ]
    if source_schema is None and cfg.normal_label is not None:
        fields += [("label", pa.int64()), ("anomaly_kind", pa.string())]
    elif source_schema is None and cfg.labels_from_folders:
        fields.append(("label", pa.string()))
    elif source_schema is not None and "label" in source_schema.names and "label" not in cfg.passthrough:
        fields.append(("label", source_schema.field("label").type))  # tar rows have no label column
    fields.append(("source", pa.string()))
    if source_schema is not None:
        taken = {name for name, _ in fields}
        fields += [(name, source_schema.field(name).type) for name in cfg.passthrough if name not in taken]
    return pa.schema(fields)


# --- tasks (Ray workers, or this process) ---------------------------------------------------


class _ShardWriter:
    """Cuts a stream of validated rows into shards of at most `row_limit` rows and `byte_limit`
    image bytes (a shard always takes at least one row), named in turn from `names`."""

    def __init__(self, out: str, names, schema: pa.Schema, row_limit: float, byte_limit: float):
        self.out, self.names, self.schema = out, names, schema
        self.row_limit, self.byte_limit = row_limit, byte_limit
        self.pending: list[pa.Table] = []
        self.pending_rows = self.pending_bytes = 0
        self.written: list[str] = []
        self.bytes_written = 0

    @classmethod
    def for_task(cls, cfg: IngestConfig, task: dict, schema: pa.Schema) -> _ShardWriter:
        """The writer of one input shard's output: part-<i>-<j>.parquet, sized as `cfg` says."""
        names = (f"{task['name']}-{j:04d}{storage.PARQUET_SUFFIX}" for j in itertools.count())
        return cls(cfg.out_url, names, schema, row_limit=cfg.rows_per_shard or float("inf"),
                   byte_limit=cfg.mib_per_shard * MIB if cfg.mib_per_shard else float("inf"))

    def add(self, table: pa.Table, image_sizes: np.ndarray) -> None:
        start = 0
        while start < table.num_rows:
            take = int(min(table.num_rows - start, self.row_limit - self.pending_rows))
            if self.byte_limit != float("inf"):
                cumulative = np.cumsum(image_sizes[start : start + take])
                fits = int(np.searchsorted(cumulative, self.byte_limit - self.pending_bytes, side="right"))
                take = min(take, max(fits, 0 if self.pending_rows else 1))
            if take:
                self.pending.append(table.slice(start, take))
                self.pending_rows += take
                self.pending_bytes += int(image_sizes[start : start + take].sum())
                start += take
            if start < table.num_rows or self.pending_rows >= self.row_limit:
                self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        name = next(self.names)
        table = pa.concat_tables(self.pending).cast(self.schema)
        self.bytes_written += write_shard(storage.join(self.out, name), table)
        self.written.append(name)
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0


def _write_rejects(cfg: IngestConfig, name: str, rejects: list[tuple[str, str | None, str]]) -> str:
    if not rejects:
        return ""
    paths, ids, reasons = zip(*rejects)
    table = pa.table({"path": list(paths), "id": list(ids), "reason": list(reasons)}, schema=REJECT_SCHEMA)
    write_shard(storage.join(cfg.out_url, REJECTS_DIR, f"{name}.parquet"), table)
    return f"{name}.parquet"


def _reason_kind(reason: str) -> str:
    """"corrupt image (broken data stream ...)" -> "corrupt image": a small set of counters."""
    return reason.split(" (", 1)[0]


def _task_result(name: str, seen: int, shards: list[str], bytes_written: int, rejects: list, rejects_file: str) -> dict:
    return {
        "name": name,
        "seen": seen,
        "rows": seen - len(rejects),
        "rejected": len(rejects),
        "shards": json.dumps(shards),
        "rejects_file": rejects_file,
        "bytes_written": bytes_written,
        # Lists and dicts as JSON, so that Ray Data need not unify their types across rows
        # (an empty list has no element type; dicts have different keys).
        "reasons": json.dumps(Counter(_reason_kind(r[2]) for r in rejects)),
    }


def ingest_files(task: dict, cfg: IngestConfig, schema: pa.Schema) -> dict:
    """Read, validate and write one group of image files as one shard (plus its rejects)."""
    fs, _ = storage.filesystem(cfg.source_url)
    ids, paths = list(task["ids"]), list(task["paths"])
    # One call for the whole group: object-store filesystems fetch the files concurrently.
    contents = fs.cat(paths, on_error="return") if paths else {}
    rows: dict[str, list] = {name: [] for name in schema.names}
    rejects: list[tuple[str, str | None, str]] = []
    for image_id, path in zip(ids, paths):
        data = contents.get(path)
        url = _url(fs, path)
        if isinstance(data, BaseException):
            rejects.append((url, image_id, f"unreadable ({type(data).__name__}: {str(data)[:120]})"))
            continue
        try:
            info = inspect_image(data, cfg.max_pixels)
        except ImageDecodeError as error:
            rejects.append((url, image_id, str(error)))
            continue
        rows["id"].append(image_id)
        rows["image"].append(data)
        rows["width"].append(info.width)
        rows["height"].append(info.height)
        rows["format"].append(info.format)
        rows["source"].append(url)
        folder = image_id.split("/", 1)[0] if "/" in image_id else None
        if cfg.normal_label is not None:
            rows["label"].append(0 if folder == cfg.normal_label else 1)
            rows["anomaly_kind"].append("" if folder == cfg.normal_label else (folder or ""))
        elif cfg.labels_from_folders:
            rows["label"].append(folder)
    shards, bytes_written = [], 0
    if rows["id"]:  # a group whose every file was rejected leaves no shard (and none stale)
        shards.append(task["name"] + storage.PARQUET_SUFFIX)
        bytes_written = write_shard(storage.join(cfg.out_url, shards[0]), pa.table(rows, schema=schema))
    rejects_file = _write_rejects(cfg, task["name"], rejects)
    return _task_result(task["name"], len(paths), shards, bytes_written, rejects, rejects_file)


def ingest_shard(task: dict, cfg: IngestConfig, schema: pa.Schema, reader: ShardReader) -> dict:
    """Read one input shard in batches (its format's reader), validate every image, write part-<i>-<j> shards."""
    copied = [name for name in schema.names if name not in _COMPUTED_COLUMNS]  # label, passthrough
    writer = _ShardWriter.for_task(cfg, task, schema)
    rejects: list[tuple[str, str | None, str]] = []
    seen = 0
    for batch in reader.ingest_batches(task["url"], task["shard"], copied, READ_BATCH_ROWS):
        keep, widths, heights, formats = [], [], [], []
        rows = zip(batch["id"].to_pylist(), image_bytes(batch["image"]), batch["__where__"].to_pylist(),
                   batch[REASON_COLUMN].to_pylist())
        for row, (image_id, data, where, reason) in enumerate(rows):
            if image_id is None:
                rejects.append((where, None, "missing id"))
                continue
            try:
                if reason is not None:  # the reader knew why there is no image
                    raise ImageDecodeError(reason)
                info = inspect_image(data, cfg.max_pixels)
            except ImageDecodeError as error:
                rejects.append((where, image_id, str(error)))
                continue
            keep.append(row)
            widths.append(info.width)
            heights.append(info.height)
            formats.append(info.format)
        seen += batch.num_rows
        taken = pa.array(keep, pa.int64())
        columns = {"id": batch["id"].take(taken), "image": batch["image"].take(taken),
                   "width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32()),
                   "format": pa.array(formats, pa.string()), "source": batch["__source__"].take(taken)}
        table = pa.table({**columns, **{name: batch[name].take(taken) for name in copied}}).select(schema.names)
        writer.add(table, pc.binary_length(table["image"]).to_numpy(zero_copy_only=False))
    writer.flush()
    rejects_file = _write_rejects(cfg, task["name"], rejects)
    return _task_result(task["name"], seen, writer.written, writer.bytes_written, rejects, rejects_file)


# --- the run ------------------------------------------------------------------------------


def _run_tasks(tasks: list[dict], function, options: dict) -> list[dict]:
    """`function(task, **options)` for every task: Ray tasks, or one after another in this process."""
    if not tasks:
        return []
    progress = Progress("ingest", len(tasks), unit="groups")
    if not options["cfg"].use_ray:
        results = []
        for task in tasks:
            results.append(function(task, **options))
            progress.update(len(results))
        progress.close()
        return results
    import ray.data

    # One block per task, so each runs as its own Ray task; results stream back as they finish.
    dataset = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    results = []
    for row in dataset.map(function, fn_kwargs=options, num_cpus=1).iter_rows():
        results.append(row)
        progress.update(len(results))
    progress.close()
    return results


@dataclass(frozen=True)
class IngestPlan:
    """What `prepare` found: the source's mode, one task per output shard group, the output schema."""

    cfg: IngestConfig
    mode: str  # "folder", or the shards' kind ("parquet", "tar")
    tasks: list[dict]
    schema: pa.Schema
    skipped: Counter  # folder input: files left out, by extension
    lease: Lease  # this job's hold on the output folder; the caller releases it (`ingest` does)
    reader: ShardReader | None = None  # shard input: the format's reader (None for a folder tree)


def prepare(cfg: IngestConfig) -> IngestPlan:
    """List and check the source (columns and unique ids for Parquet); no Ray. Then, before the first
    write, take the output folder's lease: a second job into the same folder refuses."""
    storage.check_apart({"--source": cfg.source_url}, {"--out": cfg.out_url})
    mode = cfg.source_format
    kind = None if mode in ("auto", "folder") else mode
    files = storage.list_files_detailed(cfg.source_url, suffixes(kind))[0] if mode != "folder" else []
    if mode == "auto":
        mode = "shards" if files else "folder"
    if mode == "folder":
        tasks, skipped = plan_folder(cfg)
        return IngestPlan(cfg, mode, tasks, _output_schema(cfg, None), skipped, _lease(cfg))
    if cfg.labels_from_folders:
        raise InputError("labels_from_folders applies to folder input, not Parquet or tar shards")
    if not files:
        what = descriptions(kind) if kind else "Parquet (*.parquet) or WebDataset (*.tar) shards"
        raise InputError(f"no {what} found under {cfg.source_url}")
    shards = ShardList.of(cfg.source_url, files)
    cfg = replace(cfg, id_column=implied_id_column(shards, cfg.id_column))
    reader = shards.reader(cfg.columns)
    tasks, source_schema = plan_shards(reader, cfg.passthrough)
    return IngestPlan(cfg, shards.format, tasks, _output_schema(cfg, source_schema), Counter(), _lease(cfg), reader)


def _lease(cfg: IngestConfig) -> Lease:
    return Lease.acquire(cfg.out_url, "ingest job")  # held from here: its run replaces the folder's shards


def run(plan: IngestPlan) -> dict:
    """Write the shards (Ray tasks, or this process), remove stale ones, write the summary.

    JobFailed when not one image could be ingested.
    """
    cfg, started = plan.cfg, time.perf_counter()
    options = {"cfg": cfg, "schema": plan.schema}
    if plan.reader is None:
        results = _run_tasks(plan.tasks, ingest_files, options)
    else:
        results = _run_tasks(plan.tasks, ingest_shard, {**options, "reader": plan.reader})
    results = sorted(results, key=lambda result: result["name"])
    shards = sorted(name for result in results for name in json.loads(result["shards"]))
    rejects_files = sorted(result["rejects_file"] for result in results if result["rejects_file"])
    # Only after every shard is written: a crash before this point loses no rows.
    removed = remove_stale_shards(cfg.out_url, shards) + [
        f"{REJECTS_DIR}/{name}"
        for name in remove_stale_shards(storage.join(cfg.out_url, REJECTS_DIR), rejects_files)
    ]
    reasons: Counter = Counter()
    for result in results:
        reasons.update(json.loads(result["reasons"]))
    summary = {
        "source": cfg.source_url,
        "out": cfg.out_url,
        "mode": plan.mode,
        "seen": sum(result["seen"] for result in results),
        "rows": sum(result["rows"] for result in results),
        "rejected": sum(result["rejected"] for result in results),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "skipped_by_extension": dict(sorted(plan.skipped.items())),
        "shards": shards,
        "rejects_files": [f"{REJECTS_DIR}/{name}" for name in rejects_files],
        "bytes_written": sum(result["bytes_written"] for result in results),
        "stale_removed": removed,
        "fingerprint": fingerprint(cfg.out_url) if shards else None,
        "seconds": round(time.perf_counter() - started, 3),
        "config": cfg.to_dict(),
    }
    plan.lease.check()
    storage.write_text(storage.join(cfg.out_url, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")
    if summary["rows"] == 0:
        raise JobFailed(f"no image could be ingested from {cfg.source_url} ({summary['rejected']} rejected, "
                        f"skipped by extension: {summary['skipped_by_extension']})", summary)
    return summary


def ingest(source_url: str, out_url: str, **options) -> dict:
    """Ingest `source_url` into normalised image shards under `out_url`; returns the summary.

    `options` are the other fields of `IngestConfig`. Raises InputError (ColumnError,
    DuplicateIdError, ...) before any work when the input is unusable.
    """
    return run_prepared(prepare, run, IngestConfig(source_url=source_url, out_url=out_url, **options))


def read_rejects(out: str) -> pa.Table:
    """The rejects of the ingest run under `out` (path, id, reason); empty when none."""
    urls = storage.list_files(storage.join(out, REJECTS_DIR)) if storage.exists(storage.join(out, REJECTS_DIR)) else []
    if not urls:
        return REJECT_SCHEMA.empty_table()
    tables = []
    for url in urls:
        arrow_fs, path = storage.arrow_filesystem(url)
        tables.append(pq.read_table(path, filesystem=arrow_fs))
    return pa.concat_tables(tables)
