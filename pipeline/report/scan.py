"""The two streaming passes over the latent dataset's small columns, as Ray Data tasks.

Each Ray task reduces one block (a pyarrow table) to a small typed partial
(`ScorePartial.from_block`, `FlagPartial.from_block`); the partial crosses Ray pickled in a
one-row table (`pack` / `unpack`, the form `map_batches` can return), and the driver merges
the partials as they arrive (`combine`), so no step ever holds the dataset.

1. scores (`ScorePartial`): counts, error reasons, histograms of every score column,
   per-shard and per-kind sums of the report's score, the top-K rows by it, and the
   score/label sample the exact quantiles and the label metrics use (every scored row, or a
   uniform id-hash sample).
2. flags (`FlagPartial`), under the report's threshold: flagged rows overall, per shard and
   per kind, the confusion matrix against the label column, and the rows nearest the median.

`combine` merges `other` into the partial it is called on and returns it: the driver keeps
one running partial per pass, so merging costs the size of `other`, never of the total.
"""

from __future__ import annotations

import math
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.datasets import PATH_COLUMN, read_parquet
from pipeline.progress import Progress
from pipeline.report.sketch import HIST_BINS, histogram_counts
from pipeline.sampling import hash_sample
from pipeline.shards import id_strings

if TYPE_CHECKING:
    from pipeline.report.config import LatentInfo

PARTIAL_COLUMN = "partial"


@dataclass(frozen=True)
class LatentColumns:
    """Which of the columns the report reads the latent dataset has, and under what names."""

    id_column: str
    label_column: str | None
    kind_column: str | None
    score: str  # the report's score: it ranks, flags and is drawn
    scores: tuple[str, ...]  # every score column the latent dataset has (the report's among them)
    has_error: bool
    has_flag: bool

    @property
    def columns(self) -> list[str]:
        """The columns the passes read (besides the file path)."""
        optional = [("error", self.has_error), ("is_anomaly", self.has_flag)]
        cols = [self.id_column, *self.scores, *[name for name, present in optional if present]]
        cols += [c for c in (self.label_column, self.kind_column) if c and c not in cols]
        return cols

    def latent_columns(self) -> dict[str, Any]:
        """These fields alone, to build another LatentColumns subclass from this one."""
        return {f.name: getattr(self, f.name) for f in fields(LatentColumns)}


@dataclass(frozen=True)
class ScanPlan(LatentColumns):
    """What the per-block functions need to know; small and picklable."""

    top_k: int
    sample_fraction: float  # 1.0: keep every scored row's scores
    threshold: float = math.nan  # pass 2
    median: float = math.nan  # pass 2
    typical_k: int = 0  # pass 2


# ---------------------------------------------------------------- reading one block


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as float64 with NaN for null."""
    column = table.column(name)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    return column.to_numpy().astype(np.float64) if column.null_count == 0 else \
        pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def _codes(table: pa.Table, name: str) -> tuple[np.ndarray, list]:
    """Dictionary codes of a column (nulls get their own code) and the values they stand for."""
    encoded = table.column(name).combine_chunks().dictionary_encode(null_encoding="encode")
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


def _label_codes(table: pa.Table, name: str) -> np.ndarray:
    """(N,) int8: 1 anomaly (non-zero), 0 normal, -1 unknown (null or NaN)."""
    values = _floats(table, name)
    return np.where(np.isnan(values), -1, (values != 0).astype(np.int8)).astype(np.int8)


def _ids(table: pa.Table, plan: ScanPlan) -> np.ndarray:
    return id_strings(table.column(plan.id_column))


def _plain_label(label: Any) -> Any:
    """A label as the summary shows it: whole numbers (and booleans) as int, anything else as read."""
    if isinstance(label, (bool, int)) or (isinstance(label, float) and label.is_integer()):
        return int(label)
    return label


def _row_records(table: pa.Table, rows: np.ndarray, plan: ScanPlan) -> list[dict]:
    """Selected rows as small dicts (original values, exact strings) for galleries and top lists:
    {"id", "score" (the report's), "scores" {every score}, "label", "anomaly_kind", "shard"}."""
    picked = table.take(pa.array(rows, pa.int64())) if len(rows) else table.slice(0, 0)
    names = [plan.id_column, *plan.scores, plan.label_column, plan.kind_column, PATH_COLUMN]
    values = {n: picked.column(n).to_pylist() for n in names if n and n in picked.column_names}
    return [{
        "id": str(values[plan.id_column][i]),
        "score": values[plan.score][i],
        "scores": {name: values[name][i] for name in plan.scores},
        "label": _plain_label(values[plan.label_column][i]) if plan.label_column else None,
        "anomaly_kind": values[plan.kind_column][i] if plan.kind_column else None,
        "shard": values[PATH_COLUMN][i] if PATH_COLUMN in values else None,
    } for i in range(len(rows))]


def _smallest(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the k smallest keys (ties broken by id), in order; NaN keys never chosen."""
    valid = np.flatnonzero(~np.isnan(keys))
    if k <= 0 or valid.size == 0:
        return np.zeros(0, np.int64)
    if valid.size > k:
        kth = np.partition(keys[valid], k - 1)[k - 1]
        valid = valid[keys[valid] <= kth]  # every tie at the cut stays a candidate
    order = np.lexsort((ids[valid], keys[valid]))
    return valid[order[:k]]


# ---------------------------------------------------------------- mergeable pieces


@dataclass
class ScoreStats:
    """Count, sum, min, max and histogram of one score's finite values."""

    count: int = 0
    total: float = 0.0
    lowest: float = math.inf
    highest: float = -math.inf
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS + 2, np.int64))

    @classmethod
    def of(cls, values: np.ndarray) -> ScoreStats:
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return cls()
        return cls(count=int(finite.size), total=float(finite.sum()), lowest=float(finite.min()),
                   highest=float(finite.max()), histogram=histogram_counts(finite))

    def combine(self, other: ScoreStats) -> ScoreStats:
        self.count += other.count
        self.total += other.total
        self.lowest = min(self.lowest, other.lowest)
        self.highest = max(self.highest, other.highest)
        self.histogram = self.histogram + other.histogram  # a new array: never shared with `other`
        return self


@dataclass
class GroupStats:
    """The rows of one shard or one anomaly kind."""

    rows: int = 0
    error_rows: int = 0
    scored_rows: int = 0
    score_sum: float = 0.0  # of the report's score
    score_max: float | None = None  # None while no row is scored

    def combine(self, other: GroupStats) -> GroupStats:
        self.rows += other.rows
        self.error_rows += other.error_rows
        self.scored_rows += other.scored_rows
        self.score_sum += other.score_sum
        if other.score_max is not None:
            self.score_max = other.score_max if self.score_max is None else max(self.score_max, other.score_max)
        return self


def _group_stats(codes: np.ndarray, names: list, errors: np.ndarray, scored: np.ndarray,
                 score: np.ndarray) -> dict[Any, GroupStats]:
    """Per-group stats of one block, the groups given as dictionary codes and their values."""
    m = len(names)
    highest = np.full(m, -np.inf)
    np.maximum.at(highest, codes[scored], score[scored])
    columns = zip(names, np.bincount(codes, minlength=m), np.bincount(codes, weights=errors, minlength=m),
                  np.bincount(codes, weights=scored, minlength=m),
                  np.bincount(codes[scored], score[scored], minlength=m), highest)
    return {name: GroupStats(int(rows), int(error_rows), int(scored_rows), float(total),
                             float(top) if scored_rows else None)
            for name, rows, error_rows, scored_rows, total, top in columns}


def _merge_groups(mine: dict[Any, GroupStats], theirs: dict[Any, GroupStats]) -> None:
    for key, stats in theirs.items():
        mine[key] = mine[key].combine(stats) if key in mine else replace(stats)


@dataclass
class RankedRows:
    """The k rows with the smallest keys (ties broken by id); merging keeps the k smallest of both."""

    k: int = 0
    entries: list[tuple[float, str, dict]] = field(default_factory=list)  # (key, id, row record)

    @classmethod
    def pick(cls, table: pa.Table, plan: ScanPlan, keys: np.ndarray, ids: np.ndarray, k: int) -> RankedRows:
        rows = _smallest(keys, ids, k)
        return cls(k, [(float(keys[i]), record["id"], record)
                       for i, record in zip(rows, _row_records(table, rows, plan))])

    def combine(self, other: RankedRows) -> RankedRows:
        self.k = max(self.k, other.k)
        self.entries = sorted([*self.entries, *other.entries], key=lambda entry: entry[:2])[:self.k]
        return self

    @property
    def rows(self) -> list[dict]:
        return [record for _, _, record in self.entries]


@dataclass
class ScoreSample:
    """Every score and the label of the sampled rows (every scored row when the report is exact).

    Kept as the blocks' chunks, so that merging never copies them; float32 as the embed job
    stores scores, which halves the driver's memory at max_exact_rows.
    """

    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)  # {score name: values, "label": codes}

    def combine(self, other: ScoreSample) -> ScoreSample:
        self.chunks.extend(other.chunks)
        return self

    def column(self, name: str) -> np.ndarray:
        """A score's sampled values (float32), or "label": 1 anomaly, 0 normal, -1 unknown."""
        dtype = np.int8 if name == "label" else np.float32
        parts = [chunk[name] for chunk in self.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    def labelled(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(label, score) of the sampled rows whose label is known and whose score is finite."""
        label, values = self.column("label"), self.column(name)
        known = (label >= 0) & np.isfinite(values)
        return label[known], values[known]


# ---------------------------------------------------------------- pass 1: scores


def _error_reasons(table: pa.Table, plan: ScanPlan) -> tuple[np.ndarray, Counter]:
    """(N,) bool for rows with an error, and how often each reason occurs."""
    if not plan.has_error:
        return np.zeros(table.num_rows, dtype=bool), Counter()
    column = table.column("error")
    errors = ~column.is_null().to_numpy(zero_copy_only=False)
    if not errors.any():
        return errors, Counter()
    counts = pc.value_counts(column.drop_null())
    return errors, Counter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


@dataclass
class ScorePartial:
    """Pass 1 over some blocks: everything the report needs before it knows the threshold."""

    rows: int = 0
    error_rows: int = 0
    embed_flagged: int = 0  # the latent dataset's own is_anomaly
    reasons: Counter = field(default_factory=Counter)
    stats: dict[str, ScoreStats] = field(default_factory=dict)  # every score column's
    by_label: dict[int, ScoreStats] = field(default_factory=dict)  # the report's score, 0 normal, 1 anomaly
    shards: dict[str, GroupStats] = field(default_factory=dict)  # by latent file path
    kinds: dict[Any, GroupStats] = field(default_factory=dict)  # by anomaly_kind
    sample: ScoreSample = field(default_factory=ScoreSample)
    top: RankedRows = field(default_factory=RankedRows)  # highest report score first
    score: str = ""  # the report's score: `stats[score]` is the one that counts rows as scored

    @property
    def scored(self) -> int:
        return self.stats[self.score].count if self.score in self.stats else 0

    def labelled_rows(self, label: int) -> int:
        """Scored rows with this label (0 normal, 1 anomaly)."""
        return self.by_label[label].count if label in self.by_label else 0

    @classmethod
    def from_block(cls, table: pa.Table, plan: ScanPlan) -> ScorePartial:
        n = table.num_rows
        values = {name: _floats(table, name) for name in plan.scores}
        score = values[plan.score]
        scored = np.isfinite(score)
        ids = _ids(table, plan)
        errors, reasons = _error_reasons(table, plan)
        part = cls(rows=n, error_rows=int(errors.sum()), reasons=reasons, score=plan.score,
                   stats={name: ScoreStats.of(v) for name, v in values.items()},
                   top=RankedRows.pick(table, plan, -score, ids, plan.top_k))
        if plan.has_flag:
            part.embed_flagged = int(pc.sum(table.column("is_anomaly")).as_py() or 0)
        part.shards = _group_stats(*_codes(table, PATH_COLUMN), errors, scored, score)
        if plan.kind_column:
            part.kinds = _group_stats(*_codes(table, plan.kind_column), errors, scored, score)
        labels = np.full(n, -1, np.int8)
        if plan.label_column:
            labels = _label_codes(table, plan.label_column)
            part.by_label = {label: ScoreStats.of(score[labels == label]) for label in (0, 1)}
        sampled = scored & hash_sample(ids, plan.sample_fraction)
        part.sample.chunks.append({"label": labels[sampled],
                                   **{name: v[sampled].astype(np.float32) for name, v in values.items()}})
        return part

    def combine(self, other: ScorePartial) -> ScorePartial:
        self.rows += other.rows
        self.error_rows += other.error_rows
        self.embed_flagged += other.embed_flagged
        self.reasons.update(other.reasons)
        self.score = self.score or other.score
        for name, stats in other.stats.items():
            self.stats[name] = self.stats[name].combine(stats) if name in self.stats else replace(stats)
        for label, stats in other.by_label.items():
            self.by_label[label] = self.by_label.get(label, ScoreStats()).combine(stats)
        _merge_groups(self.shards, other.shards)
        _merge_groups(self.kinds, other.kinds)
        self.sample.combine(other.sample)
        self.top.combine(other.top)
        return self


# ---------------------------------------------------------------- pass 2: flags


def _confusion(table: pa.Table, plan: ScanPlan, scored: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """[[tn, fp], [fn, tp]] of the flags against the rows' known labels."""
    from sklearn.metrics import confusion_matrix

    labels = _label_codes(table, plan.label_column)
    known = scored & (labels >= 0)
    if not known.any():  # scikit-learn refuses an empty block (all rows undecodable)
        return np.zeros((2, 2), np.int64)
    return confusion_matrix(labels[known], flagged[known].astype(np.int8), labels=[0, 1]).astype(np.int64)


def _flag_counts(table: pa.Table, column: str, flagged: np.ndarray) -> Counter:
    codes, names = _codes(table, column)
    return Counter(dict(zip(names, np.bincount(codes, weights=flagged, minlength=len(names)).astype(int).tolist())))


@dataclass
class FlagPartial:
    """Pass 2 over some blocks: the flags under the report's threshold, and the typical rows."""

    rows: int = 0
    flagged: int = 0
    shards: Counter = field(default_factory=Counter)  # flagged rows by latent file path
    kinds: Counter = field(default_factory=Counter)  # flagged rows by anomaly_kind
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((2, 2), np.int64))  # zeros without labels
    typical: RankedRows = field(default_factory=RankedRows)  # nearest the median report score first

    @classmethod
    def from_block(cls, table: pa.Table, plan: ScanPlan) -> FlagPartial:
        score = _floats(table, plan.score)
        scored = np.isfinite(score)
        flagged = scored & (score > plan.threshold)
        part = cls(rows=table.num_rows, flagged=int(flagged.sum()),
                   shards=_flag_counts(table, PATH_COLUMN, flagged))
        if plan.kind_column:
            part.kinds = _flag_counts(table, plan.kind_column, flagged)
        if plan.label_column:
            part.confusion = _confusion(table, plan, scored, flagged)
        if math.isfinite(plan.median):
            part.typical = RankedRows.pick(table, plan, np.abs(score - plan.median), _ids(table, plan),
                                           plan.typical_k)
        return part

    def combine(self, other: FlagPartial) -> FlagPartial:
        self.rows += other.rows
        self.flagged += other.flagged
        self.shards.update(other.shards)
        self.kinds.update(other.kinds)
        self.confusion = self.confusion + other.confusion
        self.typical.combine(other.typical)
        return self


# ---------------------------------------------------------------- crossing Ray, and the passes


def pack(partial: ScorePartial | FlagPartial) -> pa.Table:
    """A partial as a one-row table, the form a `map_batches` task can return.

    Pickled: the bytes only ever travel from this job's own Ray tasks to its driver.
    """
    return pa.table({PARTIAL_COLUMN: pa.array([pickle.dumps(partial, pickle.HIGHEST_PROTOCOL)], pa.binary())})


def unpack(batch: pa.Table) -> list[ScorePartial | FlagPartial]:
    """The partials of a batch of packed rows (Ray Data may put several blocks' rows in one batch)."""
    return [pickle.loads(data) for data in batch.column(PARTIAL_COLUMN).to_pylist()]


def scan_scores(table: pa.Table, plan: ScanPlan) -> pa.Table:
    """Pass 1 as a Ray Data task: one block in, its packed ScorePartial out."""
    return pack(ScorePartial.from_block(table, plan))


def scan_flags(table: pa.Table, plan: ScanPlan) -> pa.Table:
    """Pass 2 as a Ray Data task: one block in, its packed FlagPartial out."""
    return pack(FlagPartial.from_block(table, plan))


def run_pass(info: LatentInfo, plan: ScanPlan, task: Callable[[pa.Table, ScanPlan], pa.Table],
             label: str) -> Iterator[ScorePartial | FlagPartial]:
    """Stream one pass: read the small columns, reduce each block with `task` in a Ray task, and
    yield the partials on the driver as they arrive."""
    ds = read_parquet(info.paths, info.fs, plan.columns, include_paths=True)
    ds = ds.map_batches(task, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan})
    progress = Progress(f"report {label}", info.rows)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for partial in unpack(batch):
            progress.update(progress.done + partial.rows)
            yield partial
    progress.close()
