"""summary.json's sections, each built from what the two passes found (`Findings`).

The keys and their meaning are listed in the package docstring (pipeline/report/__init__.py).
"""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.report.config import LatentInfo, ReportConfig
from pipeline.report.metrics import (
    Threshold,
    at_threshold,
    label_metrics,
    score_summary,
)
from pipeline.report.scan import FlagPartial, ScorePartial
from pipeline.report.sketch import HIST_RATIO, histogram_bars

FORMAT = "squeeze-report"
FORMAT_VERSION = 1


@dataclass
class Findings:
    """The merged partials of both passes and the threshold between them."""

    info: LatentInfo
    exact: bool  # every scored row kept: exact quantiles and metrics
    scores: ScorePartial
    score_summary: dict[str, Any]  # summary.json's "scores", made before pass 2 (its median picks the typical rows)
    threshold: Threshold
    flags: FlagPartial
    top: list[dict]  # highest report score first; shard paths relative to the latent folder
    typical: list[dict]  # nearest the median report score first; the same


def relative_shard(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path.startswith(root.rstrip("/") + "/") else path


def with_relative_shards(rows: list[dict], root: str) -> list[dict]:
    return [{**row, "shard": relative_shard(row["shard"], root) if row["shard"] else None} for row in rows]


def header(cfg: ReportConfig, info: LatentInfo, partial: str | None) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "partial": partial,
            "config": asdict(cfg),
            "latents": {"url": cfg.latents_url, "files": len(info.paths), "rows": info.rows,
                        "metadata": info.metadata}}


def counts_section(found: Findings) -> dict[str, Any]:
    s = found.scores
    return {"rows": s.rows, "scored_rows": s.scored, "error_rows": s.error_rows,
            "errors_by_reason": dict(sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "unscored_rows": s.rows - s.scored,
            "embed_flagged_rows": s.embed_flagged if found.info.has_flag else None}


def scores_section(scores: ScorePartial, exact: bool) -> dict[str, Any]:
    """Every score column's count, range, mean and quantiles."""
    section: dict[str, Any] = {name: score_summary(stats, scores.sample.column(name), exact)
                               for name, stats in scores.stats.items()}
    section["quantile_method"] = "exact" if exact else "histogram"
    section["quantile_relative_error"] = 0.0 if exact else HIST_RATIO - 1
    return section


def histogram_section(found: Findings) -> dict[str, Any]:
    s = found.scores
    by_label = {label: stats.histogram for label, stats in s.by_label.items()}
    return {"score": s.score, **histogram_bars(s.stats[s.score].histogram, by_label)}


def threshold_section(found: Findings) -> dict[str, Any]:
    t, flagged, scored, score = found.threshold, found.flags.flagged, found.scores.scored, found.scores.score
    return {"spec": t.spec, "policy": t.policy, "parameter": t.parameter, "value": t.value, "source": t.source,
            "score": score, "rule": f"{score} > value", "flagged_rows": flagged,
            "flagged_share": flagged / scored if scored else None,
            "estimated_contamination": t.estimated_contamination, "uncertainty": t.uncertainty,
            "parts": list(t.parts) if t.parts else None}


def _recall_at_fpr(labels: np.ndarray, values: np.ndarray, fpr: float = 0.01) -> float | None:
    """Recall at the threshold that flags `fpr` of the label-0 rows (an ideal, label-chosen cut)."""
    normal, anomalous = values[labels == 0], values[labels == 1]
    if not normal.size or not anomalous.size:
        return None
    return float((anomalous > np.quantile(normal, 1 - fpr)).mean())


def by_score_metrics(found: Findings) -> dict[str, dict[str, Any]]:
    """Every score's AUROC, average precision and recall at 1% false positives, against the labels."""
    out = {}
    for name in found.scores.stats:
        labels, values = found.scores.sample.labelled(name)
        metrics = label_metrics(labels, values)
        out[name] = {"auroc": metrics["auroc"], "average_precision": metrics["average_precision"],
                     "recall_at_1pct_fpr": _recall_at_fpr(labels, values)}
    return out


def metrics_section(found: Findings, notes: list[str]) -> dict[str, Any]:
    """Label metrics: on the sample (every scored row when exact); the confusion matrix on every row."""
    s = found.scores
    labels, values = s.sample.labelled(s.score)
    positives, negatives = s.labelled_rows(1), s.labelled_rows(0)
    metrics = {"label_column": found.info.label_column, "score": s.score, **label_metrics(labels, values)}
    metrics.update(positives=positives, negatives=negatives, unlabelled_scored_rows=s.scored - positives - negatives,
                   sampled=not found.exact, rows_used=len(labels))
    metrics["by_score"] = by_score_metrics(found)
    metrics["at_threshold"] = at_threshold(found.flags.confusion)
    if not found.exact:
        notes.append(f"AUROC, AP and best F1 come from a uniform id-hash sample of {len(labels):,} "
                     f"of {s.scored:,} scored rows")
    if metrics["auroc"] is None:
        notes.append("the label column holds only one class among scored rows: no AUROC")
    return metrics


def _rate(count: int, scored: int) -> float | None:
    return count / scored if scored else None


def by_kind_section(found: Findings) -> list[dict[str, Any]]:
    kinds = sorted(found.scores.kinds.items(), key=lambda kv: "" if kv[0] is None else str(kv[0]))
    return [{"kind": kind, "rows": g.rows, "scored_rows": g.scored_rows, "flagged_rows": found.flags.kinds[kind],
             "flag_rate": _rate(found.flags.kinds[kind], g.scored_rows),
             "mean_score": _rate(g.score_sum, g.scored_rows)}
            for kind, g in kinds]


def shards_section(found: Findings) -> list[dict[str, Any]]:
    flagged = found.flags.shards
    return [{"shard": relative_shard(path, found.info.root), "rows": g.rows, "error_rows": g.error_rows,
             "scored_rows": g.scored_rows, "flagged_rows": flagged[path],
             "flag_rate": _rate(flagged[path], g.scored_rows), "mean_score": _rate(g.score_sum, g.scored_rows),
             "max_score": g.score_max}
            for path, g in sorted(found.scores.shards.items())]


def _row(rank: int, row: dict) -> dict[str, Any]:
    """{rank, id, score (the report's), every score by name, label, anomaly_kind, shard}."""
    return {"rank": rank, "id": row["id"], "score": row["score"], **row["scores"], "label": row["label"],
            "anomaly_kind": row["anomaly_kind"], "shard": row["shard"]}


def top_anomalies(found: Findings) -> list[dict[str, Any]]:
    return [{**_row(rank, row), "flagged": bool(row["score"] > found.threshold.value)}
            for rank, row in enumerate(found.top, start=1)]


def typical_rows(found: Findings) -> list[dict[str, Any]]:
    return [_row(rank, row) for rank, row in enumerate(found.typical, start=1)]


def assemble(cfg: ReportConfig, found: Findings, notes: list[str], partial: str | None = None) -> dict[str, Any]:
    """Every section the passes decide, in summary.json's order (galleries and the rest follow)."""
    summary = {**header(cfg, found.info, partial), "score": found.scores.score, "counts": counts_section(found),
               "scores": found.score_summary,
               "histogram": histogram_section(found), "threshold": threshold_section(found)}
    if found.info.label_column:
        summary["metrics"] = metrics_section(found, notes)
    if found.info.kind_column:
        summary["by_kind"] = by_kind_section(found)
    summary["shards"] = shards_section(found)
    summary["top_anomalies"] = top_anomalies(found)
    summary["typical_rows"] = typical_rows(found)
    return summary
