"""The histogram sketch: score counts in fixed symmetric-log bins, mergeable by addition.

Quantiles above the report's exact size, the contamination threshold on sampled data and
the histogram figures all read the same bins. Scores may be negative or above 1 (`fused` is
a z-score), so the bins are uniform in t = sign(x) * log10(1 + |x| / HIST_LOW): about
logarithmic for |x| well above HIST_LOW, on both sides of zero, and linear near it. Bin i
(1..HIST_BINS) covers [HIST_EDGES[i-1], HIST_EDGES[i]); bin 0 holds values below -HIST_HIGH,
bin HIST_BINS + 1 values at or above HIST_HIGH (a quantile there reads as the exact lowest or
highest score).
"""

from __future__ import annotations

import math

import numpy as np

HIST_LOW, HIST_HIGH, HIST_BINS = 1e-9, 1e4, 8192
_T_HIGH = math.log10(1.0 + HIST_HIGH / HIST_LOW)
_T_EDGES = np.linspace(-_T_HIGH, _T_HIGH, HIST_BINS + 1)


def _from_t(t):
    return np.sign(t) * HIST_LOW * np.expm1(np.abs(t) * math.log(10.0))


HIST_EDGES = _from_t(_T_EDGES)
HIST_EDGES[HIST_BINS // 2] = 0.0  # exactly: t = 0
# A value with |x| >= 1000 * HIST_LOW is known to within this factor (1.0073) from its bin.
HIST_RATIO = float(10.0 ** (_T_EDGES[1] - _T_EDGES[0]))
DISPLAY_BARS = 60


def histogram_counts(values: np.ndarray) -> np.ndarray:
    """Finite values -> counts in the HIST_BINS + 2 bins (underflow, HIST_BINS, overflow)."""
    values = values[np.isfinite(values)]
    index = np.searchsorted(HIST_EDGES, values, side="right")  # 0: < -HIGH, BINS+1: >= HIGH
    return np.bincount(index, minlength=HIST_BINS + 2).astype(np.int64)


def sketch_quantile(counts: np.ndarray, q: float, lowest: float, highest: float) -> float:
    """The q-quantile (numpy's linear definition, rank q * (n - 1)) read off the histogram.

    The answer lies in the bin holding the order statistic at floor(rank), interpolated
    inside it on the bins' own (symmetric-log) scale, and clamped to the exact [lowest, highest].
    """
    n = int(counts.sum())
    if n == 0:
        return math.nan
    rank = q * (n - 1)
    below = np.cumsum(counts)
    b = int(np.searchsorted(below, math.floor(rank), side="right"))
    if b == 0:
        value = lowest
    elif b == HIST_BINS + 1:
        value = highest
    else:
        start = below[b] - counts[b]
        inside = min(max((rank - start + 0.5) / counts[b], 0.0), 1.0)
        value = float(_from_t(_T_EDGES[b - 1] + inside * (_T_EDGES[b] - _T_EDGES[b - 1])))
    return float(min(max(value, lowest), highest))


def _regular_bins(counts: np.ndarray) -> np.ndarray:
    """The HIST_BINS regular bins, with under- and overflow folded into the end bins (for display)."""
    regular = counts[1:HIST_BINS + 1].copy()
    regular[0] += counts[0]
    regular[-1] += counts[HIST_BINS + 1]
    return regular


def _symlog(x: np.ndarray, linthresh: float) -> np.ndarray:
    """Matplotlib's symlog axis coordinate (base 10, linscale 1), in units of decades."""
    x = np.asarray(x, np.float64) / linthresh
    return np.where(np.abs(x) <= 1, x, np.sign(x) * (1 + np.log10(np.maximum(np.abs(x), 1))))


def _symlog_inverse(u: np.ndarray, linthresh: float) -> np.ndarray:
    return linthresh * np.where(np.abs(u) <= 1, u, np.sign(u) * 10.0 ** (np.abs(u) - 1))


def display_bins(counts: np.ndarray, bars: int = DISPLAY_BARS) -> tuple[np.ndarray, np.ndarray, str, float | None]:
    """(sketch edge indices, their values, axis scale, symlog linthresh) of at most `bars`
    display bars, even on the axis over the occupied range.

    Every counted score >= 0: a log axis, the bin holding zero drawn from its upper edge. Else
    (a score such as `fused` spreads around zero): a symlog axis, linear out to the 0.9-quantile
    of |score| and logarithmic beyond, so that neither the bulk nor the tail is squeezed.
    """
    regular = _regular_bins(counts)
    occupied = np.flatnonzero(regular)
    if occupied.size == 0:
        middle = HIST_BINS // 2
        return np.array([middle, middle + 1]), HIST_EDGES[middle:middle + 2].copy(), "log", None
    first, last = int(occupied[0]), int(occupied[-1]) + 1  # edge indices around the occupied bins
    if HIST_EDGES[first] >= 0:
        scale, linthresh = "log", None
        lo, hi = (HIST_EDGES[first + 1] if HIST_EDGES[first] == 0 else HIST_EDGES[first]), HIST_EDGES[last]
        targets = np.geomspace(lo, hi, bars + 1) if hi > lo else np.array([lo, hi])
    else:
        scale = "symlog"
        # The 0.9-quantile of |score|, from the bins ordered by the magnitude of their centres.
        magnitude = np.abs(HIST_EDGES[1:] + HIST_EDGES[:-1]) / 2
        order = np.argsort(magnitude, kind="stable")
        at = order[np.searchsorted(np.cumsum(regular[order]), 0.9 * regular.sum())]
        linthresh = float(max(magnitude[at], HIST_LOW))
        span = _symlog(np.array([HIST_EDGES[first], HIST_EDGES[last]]), linthresh)
        targets = _symlog_inverse(np.linspace(span[0], span[1], bars + 1), linthresh)
    index = np.unique(np.clip(np.searchsorted(HIST_EDGES, targets), first, last))
    index[0], index[-1] = first, last
    index = np.unique(index)
    edges = HIST_EDGES[index].copy()
    if scale == "log" and edges[0] == 0:
        edges[0] = min(HIST_EDGES[first + 1], edges[1]) / HIST_RATIO
    return index, edges, scale, linthresh


def histogram_bars(counts: np.ndarray, by_label: dict[int, np.ndarray] | None = None) -> dict[str, list]:
    """{edges, counts, scale, [linthresh], [counts_label_0, counts_label_1]}: the bars the
    histogram figure draws, on the axis scale it draws them on."""
    index, edges, scale, linthresh = display_bins(counts)

    def regroup(c: np.ndarray) -> list[int]:
        cumulative = np.concatenate([[0], np.cumsum(_regular_bins(c))])
        return np.diff(cumulative[index]).astype(int).tolist()

    bars = {"edges": edges.tolist(), "counts": regroup(counts), "scale": scale}
    if linthresh is not None:
        bars["linthresh"] = linthresh
    for label, label_counts in sorted((by_label or {}).items()):
        bars[f"counts_label_{label}"] = regroup(label_counts)
    return bars
