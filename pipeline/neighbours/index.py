"""The nearest-neighbour index over a latent dataset: choose its kind, build it streaming, save, load, search.

Kinds (`plan_index`):
- "flat": exact search (faiss `IndexFlatL2`), for up to `FLAT_MAX_ROWS` rows: its memory is
  rows x dim x 4 bytes and every query compares against every row, which stays fast there
  (docs/BENCHMARKS.md, "Nearest neighbours").
- "ivf-pq": an inverted file of nlist ~ 4 sqrt(N) cells, each vector stored as a product
  quantisation code (m sub-vectors of about 8 dimensions, 8 bits each), trained on an
  id-hash sample of up to `TRAIN_ROWS` vectors. PQ codes alone cap recall@10 near 0.6 on
  latents (bench), so each query's `REFINE_K_FACTOR` x k candidates are re-ranked with 8-bit
  scalar-quantised copies of the vectors (faiss `IndexRefine`, dim bytes a row): the
  distances written are then those of the SQ8 copies, within about 0.5% of the exact ones.
  nprobe (cells visited per query) is the smallest power of two whose recall@10 against
  exact search reaches `target_recall` on a probe sample held out of training; the build
  measures and records it.

Memory: the build streams the latents twice (a sample pass, then the add pass) and holds
only the index, the training sample and the probe sample; the ids go straight to
index_ids.parquet. Distances are Euclidean between dequantized float32 latents (faiss works
in squared L2; `search` returns the square root).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.latents import dequantize_latents, latent_dataset
from pipeline.neighbour_output import INDEX_FILE, INDEX_IDS_FILE, INDEX_SETTINGS_FILE
from pipeline.sampling import hash_sample
from pipeline.shards import id_strings

INDEX_KINDS = ("auto", "flat", "ivf-pq")
FLAT_MAX_ROWS = 200_000  # above this "auto" builds IVF-PQ
MIN_IVF_ROWS = 1_000  # PQ's 256 centroids per sub-vector need a few thousand training vectors
TRAIN_ROWS = 100_000  # IVF-PQ training sample (id-hash), at most
PROBE_ROWS = 1_000  # queries that measure recall@10 against exact search, held out of training
RECALL_AT = 10
PQ_DIMS = 8  # dimensions per PQ sub-vector
PQ_BITS = 8
REFINE_K_FACTOR = 4
STREAM_ROWS = 65_536  # latent rows per batch while building
# Batches read ahead while streaming: pyarrow's defaults (16 batches of 4 files) held ~1.5 GiB
# of 128-d latents in flight on the driver; a couple keep the reads overlapped with the adds.
READAHEAD_BATCHES = 2
TRAIN_KEY, PROBE_KEY = b"neighbours-train", b"neighbours-probe"


@dataclass(frozen=True)
class IndexPlan:
    """What will be built, decided from the row count and dimension alone (before any pass)."""

    kind: str  # "flat" | "ivf-pq"
    dim: int
    rows: int  # latent rows (an upper bound on the vectors: null latents are left out)
    nlist: int | None = None
    m: int | None = None
    nbits: int | None = None
    refine: str | None = None  # "sq8": candidates re-ranked with 8-bit scalar-quantised vectors
    k_factor: int | None = None

    def estimated_bytes(self) -> int:
        """Bytes of the index in memory (and on disk), ids not included."""
        if self.kind == "flat":
            return self.rows * self.dim * 4
        centroids = (self.nlist + 2 ** self.nbits) * self.dim * 4
        return centroids + self.rows * (self.m + 8 + self.dim)  # PQ code, its id in the list, the SQ8 copy

    def describe(self) -> str:
        if self.kind == "flat":
            return f"flat (exact) index of {self.rows:,} x {self.dim} float32"
        return (f"IVF-PQ index of {self.rows:,} x {self.dim}: nlist {self.nlist}, m {self.m} x {self.nbits} bits, "
                f"refined with SQ8 copies (k_factor {self.k_factor})")


def _pq_subvectors(dim: int) -> int:
    """The divisor of `dim` nearest dim / PQ_DIMS (faiss needs m to divide the dimension)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - dim / PQ_DIMS), -m))


def plan_index(rows: int, dim: int, kind: str = "auto", flat_max_rows: int = FLAT_MAX_ROWS) -> IndexPlan:
    if kind not in INDEX_KINDS:
        raise InputError(f"--index must be one of {INDEX_KINDS}, got {kind!r}")
    if kind == "flat" or (kind == "auto" and rows <= flat_max_rows):
        return IndexPlan("flat", dim, rows)
    if rows < MIN_IVF_ROWS:
        raise InputError(f"an IVF-PQ index needs at least {MIN_IVF_ROWS:,} rows to train on; the latents have "
                         f"{rows:,}: use --index flat")
    nlist = max(1, min(round(4 * math.sqrt(rows)), min(rows, TRAIN_ROWS) // 39))  # faiss wants 39 points a cell
    return IndexPlan("ivf-pq", dim, rows, nlist=nlist, m=_pq_subvectors(dim), nbits=PQ_BITS, refine="sq8",
                     k_factor=REFINE_K_FACTOR)


# ---------------------------------------------------------------- reading the latents


def stream_latents(latents_url: str, batch_rows: int = STREAM_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids of the rows that have a latent, their (n, D) float32 vectors), batch by batch, in file order.

    The fixed-size lists are read as one flat buffer each (not a Python object per row).
    """
    dataset = latent_dataset(latents_url)
    columns = [c for c in ("id", "latent", "latent_scale") if c in dataset.schema.names]
    for batch in dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=READAHEAD_BATCHES,
                                    fragment_readahead=1):
        latent = batch.column("latent")
        valid = latent.is_valid()
        kept = latent.filter(valid)
        stored = kept.flatten().to_numpy(zero_copy_only=False).reshape(len(kept), latent.type.list_size)
        scale = batch.column("latent_scale").filter(valid).to_numpy(zero_copy_only=False) \
            if "latent_scale" in columns else None
        ids = id_strings(batch.column("id").filter(valid))
        yield ids, np.ascontiguousarray(dequantize_latents(stored, scale), np.float32)


# ---------------------------------------------------------------- building


class _ExactTopK:
    """The exact k nearest rows of a few probe queries, merged batch by batch as the rows stream past."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.distances = np.full((len(queries), k), np.inf, np.float32)
        self.rows = np.full((len(queries), k), -1, np.int64)

    def add(self, z: np.ndarray, first_row: int) -> None:
        import faiss

        if not len(self.queries) or not len(z):
            return
        d, i = faiss.knn(self.queries, z, min(self.k, len(z)))
        distances = np.concatenate([self.distances, d], axis=1)
        rows = np.concatenate([self.rows, np.where(i >= 0, i + first_row, -1)], axis=1)
        keep = np.argsort(distances, axis=1, kind="stable")[:, :self.k]
        self.distances = np.take_along_axis(distances, keep, axis=1)
        self.rows = np.take_along_axis(rows, keep, axis=1)


def _without_self(rows: np.ndarray, own: np.ndarray, k: int) -> list[list[int]]:
    """Each query's first k result rows other than its own row."""
    return [[r for r in row if r != o and r >= 0][:k] for row, o in zip(rows.tolist(), own.tolist())]


def recall_at(approx: list[list[int]], exact: list[list[int]]) -> float:
    """Mean share of each query's exact neighbours that the approximate search found."""
    shares = [len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact) if e]
    return float(np.mean(shares)) if shares else 1.0


def _sample_pass(latents_url: str, plan: IndexPlan,
                 log: Callable[[str], None]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(training vectors, probe ids, probe vectors): two disjoint id-hash samples, the probe first."""
    train_share = min(1.0, TRAIN_ROWS / plan.rows)
    probe_share = min(1.0, PROBE_ROWS / plan.rows)
    train, probe_ids, probe = [], [], []
    for ids, z in stream_latents(latents_url):
        in_probe = hash_sample(ids, probe_share, PROBE_KEY)
        in_train = hash_sample(ids, train_share, TRAIN_KEY) & ~in_probe
        train.append(z[in_train])
        probe.append(z[in_probe])
        probe_ids += ids[in_probe].tolist()
    train_z = np.concatenate(train) if train else np.zeros((0, plan.dim), np.float32)
    if len(train_z) < 2 ** plan.nbits or len(train_z) < plan.nlist:
        raise InputError(f"only {len(train_z)} latents to train an IVF-PQ index on: use --index flat")
    log(f"neighbours: training the index on {len(train_z):,} vectors; {len(probe_ids):,} probe queries held out")
    return train_z, probe_ids, np.concatenate(probe) if probe else np.zeros((0, plan.dim), np.float32)


def _empty_index(plan: IndexPlan):
    import faiss

    if plan.kind == "flat":
        return faiss.IndexFlatL2(plan.dim)
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(plan.dim), plan.dim, plan.nlist, plan.m, plan.nbits)
    refine = faiss.IndexRefine(ivf, faiss.IndexScalarQuantizer(plan.dim, faiss.ScalarQuantizer.QT_8bit))
    refine.k_factor = plan.k_factor
    return refine


def _tune_nprobe(index, plan: IndexPlan, probe: np.ndarray, own_rows: np.ndarray, exact: _ExactTopK,
                 target: float) -> tuple[int, float, dict[str, float]]:
    """The smallest power-of-two nprobe whose recall@10 (the row itself left out) reaches `target`."""
    k = RECALL_AT
    truth = _without_self(exact.rows, own_rows, k)
    curve: dict[str, float] = {}
    nprobe = 1
    while True:
        set_search_parameters(index, nprobe)
        _, rows = index.search(probe, k + 1)
        recall = recall_at(_without_self(rows, own_rows, k), truth)
        curve[str(nprobe)] = round(recall, 4)
        if recall >= target or nprobe >= plan.nlist:
            return nprobe, recall, curve
        nprobe = min(2 * nprobe, plan.nlist)


def set_search_parameters(index, nprobe: int | None) -> None:
    import faiss

    if nprobe is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe


def build_index(latents_url: str, out_url: str, plan: IndexPlan, target_recall: float, record: dict[str, Any],
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the planned index, write index.faiss, index_ids.parquet and then index.json; its settings.

    `record` (the latents' URL, model, fingerprint) goes into index.json as it is.
    """
    import faiss

    started = time.perf_counter()
    index = _empty_index(plan)
    probe_ids: list[str] = []
    probe = np.zeros((0, plan.dim), np.float32)
    if plan.kind == "ivf-pq":
        train_z, probe_ids, probe = _sample_pass(latents_url, plan, log)
        index.train(train_z)
        del train_z
    exact = _ExactTopK(probe, RECALL_AT + 1)
    wanted = {i: n for n, i in enumerate(probe_ids)}
    own_rows = np.full(len(probe_ids), -1, np.int64)
    rows = 0
    with storage.atomic_write(storage.join(out_url, INDEX_IDS_FILE)) as f:
        with pq.ParquetWriter(f, pa.schema([("id", pa.string())])) as writer:
            for ids, z in stream_latents(latents_url):
                index.add(z)
                exact.add(z, rows)
                for offset, row_id in enumerate(ids.tolist()):
                    if row_id in wanted:
                        own_rows[wanted[row_id]] = rows + offset
                writer.write_table(pa.table({"id": pa.array(ids, pa.string())}))
                rows += len(ids)
    nprobe, recall, curve = None, 1.0, {}
    if plan.kind == "ivf-pq":
        nprobe, recall, curve = _tune_nprobe(index, plan, probe, own_rows, exact, target_recall)
        log(f"neighbours: nprobe {nprobe} gives recall@{RECALL_AT} {recall:.3f} on {len(probe_ids)} probe queries "
            f"(target {target_recall})")
        if recall < target_recall:
            log("neighbours: WARNING: the IVF-PQ index misses its recall target even visiting every cell: these "
                "latents have too little structure for it (random vectors behave so); --index flat is exact")
    with storage.atomic_write(storage.join(out_url, INDEX_FILE)) as f:  # streamed: no second copy in memory
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        size = f.tell()
    settings = {**asdict(plan), "rows": rows, "metric": "l2", "nprobe": nprobe, "bytes": int(size),
                f"recall_at_{RECALL_AT}": recall, "recall_measured_on": len(probe_ids), "target_recall": target_recall,
                "nprobe_recall": curve, "build_seconds": round(time.perf_counter() - started, 3), **record}
    storage.write_text(storage.join(out_url, INDEX_SETTINGS_FILE), json_text(settings))
    return settings


def json_text(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


# ---------------------------------------------------------------- loading and searching


class LoadedIndex:
    """An index read back from its folder: search by vector, answer with ids and Euclidean distances."""

    def __init__(self, out_url: str, threads: int | None = None):
        import json

        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        settings_url = storage.join(out_url, INDEX_SETTINGS_FILE)
        if not storage.exists(settings_url):
            raise InputError(f"no finished index at {out_url}: {INDEX_SETTINGS_FILE} not found "
                             "(run jobs.neighbours, or rerun it to finish)")
        self.settings = json.loads(storage.read_text(settings_url))
        fs, path = storage.filesystem(storage.join(out_url, INDEX_FILE))
        with fs.open(path, "rb") as f:  # streamed into faiss: no copy of the file's bytes in memory
            self.index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        set_search_parameters(self.index, self.settings.get("nprobe"))
        fs, path = storage.arrow_filesystem(storage.join(out_url, INDEX_IDS_FILE))
        self.ids = pq.read_table(path, filesystem=fs).column("id").combine_chunks()
        if len(self.ids) != self.index.ntotal:
            raise InputError(f"{out_url}: {INDEX_IDS_FILE} has {len(self.ids)} ids for {self.index.ntotal} vectors")

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, z: np.ndarray, k: int) -> tuple[list[list[str]], list[list[float]]]:
        """Each row's k nearest ids and Euclidean distances, nearest first (fewer if the index is smaller)."""
        if not len(z):
            return [], []
        squared, rows = self.index.search(np.ascontiguousarray(z, np.float32), min(k, self.index.ntotal))
        found = rows >= 0
        names = self.ids.take(pa.array(np.where(found, rows, 0).ravel())).to_numpy(zero_copy_only=False)
        names = names.reshape(rows.shape)
        distances = np.sqrt(np.maximum(squared, 0)).astype(np.float32)
        return ([n[f].tolist() for n, f in zip(names, found)], [d[f].tolist() for d, f in zip(distances, found)])
