"""The report's figures as PNG bytes: score histograms and the ROC / precision-recall curves.

matplotlib is imported inside the functions (its Agg canvas, never pyplot's global state),
so the Ray tasks that import this package do not load it.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

LABEL_STYLES = {0: ("tab:blue", "label 0 (normal)"), 1: ("tab:red", "label 1 (anomaly)")}


def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def histogram_figure(bars: dict[str, list], xlabel: str, threshold: float | None) -> bytes:
    """A histogram of `bars` (sketch.histogram_bars; split by label when they are) on the x axis
    scale they name (log, or symlog for scores around zero), the threshold marked."""
    edges, counts = np.asarray(bars["edges"]), np.asarray(bars["counts"])
    fig = _figure()
    ax = fig.add_subplot()
    labelled = [label for label in LABEL_STYLES if f"counts_label_{label}" in bars]
    for label in labelled:
        colour, text = LABEL_STYLES[label]
        ax.stairs(np.asarray(bars[f"counts_label_{label}"]), edges, fill=True, alpha=0.55, color=colour, label=text)
    if labelled:
        ax.stairs(counts, edges, color="black", linewidth=0.8, label="all scored rows")
    else:
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.7, label="scored rows")
    log = bars.get("scale", "log") == "log"
    if threshold is not None and math.isfinite(threshold) and (threshold > 0 or not log):
        ax.axvline(threshold, color="tab:orange", linestyle="--", linewidth=1.5, label=f"threshold {threshold:.4g}")
        lo, hi = min(edges[0], threshold), max(edges[-1], threshold)
        if log:
            ax.set_xlim(lo / 1.2, hi * 1.2)
    if log:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=bars["linthresh"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    return _png(fig)


def roc_pr_figure(labels: np.ndarray, scores: np.ndarray, metrics: dict[str, Any]) -> bytes:
    """ROC and precision-recall curves side by side, titled with AUROC and AP."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = _figure(8.0, 3.6)
    roc, pr = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(labels, scores)
    roc.plot(fpr, tpr, color="tab:blue")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC (AUROC {metrics['auroc']:.3f})")
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr.plot(recall, precision, color="tab:red")
    pr.set(xlabel="recall", ylabel="precision", title=f"PR (AP {metrics['average_precision']:.3f})",
           ylim=(0, 1.02))
    return _png(fig)
