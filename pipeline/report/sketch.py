"""The log-histogram sketch: score counts in fixed log-spaced bins, mergeable by addition.

Quantiles above the report's exact size, the contamination threshold on sampled data and
the histogram figures all read the same bins. Bin i (1..HIST_BINS) covers
[HIST_EDGES[i-1], HIST_EDGES[i]); bin 0 holds values below HIST_LOW (zeros included), bin
HIST_BINS + 1 values at or above HIST_HIGH.
"""

from __future__ import annotations

import math

import numpy as np

HIST_LOW, HIST_HIGH, HIST_BINS = 1e-9, 2.0, 4096
HIST_EDGES = np.geomspace(HIST_LOW, HIST_HIGH, HIST_BINS + 1)
HIST_RATIO = float(HIST_EDGES[1] / HIST_EDGES[0])  # 1.00524: a value is known to within this factor
DISPLAY_BARS = 60


def histogram_counts(values: np.ndarray) -> np.ndarray:
    """Finite values -> counts in the HIST_BINS + 2 bins (underflow, HIST_BINS, overflow)."""
    values = values[np.isfinite(values)]
    index = np.searchsorted(HIST_EDGES, values, side="right")  # 0: < LOW, BINS+1: >= HIGH
    return np.bincount(index, minlength=HIST_BINS + 2).astype(np.int64)


def sketch_quantile(counts: np.ndarray, q: float, lowest: float, highest: float) -> float:
    """The q-quantile (numpy's linear definition, rank q * (n - 1)) read off the histogram.

    The answer lies in the bin holding the order statistic at floor(rank), interpolated
    geometrically inside it, and clamped to the exact [lowest, highest].
    """
    n = int(counts.sum())
    if n == 0:
        return math.nan
    rank = q * (n - 1)
    below = np.cumsum(counts)
    b = int(np.searchsorted(below, math.floor(rank), side="right"))
    if b == 0:
        value = min(HIST_LOW, highest)
    elif b == HIST_BINS + 1:
        value = highest
    else:
        start = below[b] - counts[b]
        inside = (rank - start + 0.5) / counts[b]
        lo, hi = HIST_EDGES[b - 1], HIST_EDGES[b]
        value = float(lo * (hi / lo) ** min(max(inside, 0.0), 1.0))
    return float(min(max(value, lowest), highest))


def _regular_bins(counts: np.ndarray) -> np.ndarray:
    """The HIST_BINS regular bins, with under- and overflow folded into the end bins (for display)."""
    regular = counts[1:HIST_BINS + 1].copy()
    regular[0] += counts[0]
    regular[-1] += counts[HIST_BINS + 1]
    return regular


def display_histogram(counts: np.ndarray, bars: int = DISPLAY_BARS) -> tuple[np.ndarray, np.ndarray]:
    """The sketch's bins merged into at most `bars` log-spaced bars over the occupied range."""
    regular = _regular_bins(counts)
    occupied = np.flatnonzero(regular)
    if occupied.size == 0:
        return HIST_EDGES[:2].copy(), np.zeros(1, np.int64)
    first, last = int(occupied[0]), int(occupied[-1])
    width = max(1, math.ceil((last - first + 1) / bars))
    starts = np.arange(first, last + 1, width)
    merged = np.add.reduceat(regular[first:last + 1], starts - first)
    edges = np.append(HIST_EDGES[starts], HIST_EDGES[min(starts[-1] + width, HIST_BINS)])
    return edges, merged


def display_histogram_on(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of sketch bins regrouped onto display `edges` (which are sketch edges)."""
    starts = np.searchsorted(HIST_EDGES, edges, side="left")
    cumulative = np.concatenate([[0], np.cumsum(_regular_bins(counts))])
    return np.diff(cumulative[np.clip(starts, 0, HIST_BINS)])


def histogram_bars(counts: np.ndarray, by_label: dict[int, np.ndarray] | None = None) -> dict[str, list]:
    """{edges, counts, [counts_label_0, counts_label_1]}: the bars the histogram figure draws."""
    edges, merged = display_histogram(counts)
    bars = {"edges": edges.tolist(), "counts": merged.astype(int).tolist()}
    for label, label_counts in sorted((by_label or {}).items()):
        bars[f"counts_label_{label}"] = display_histogram_on(label_counts, edges).astype(int).tolist()
    return bars
