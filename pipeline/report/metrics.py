"""The report's numbers: its threshold (the policies are in the package docstring), score
summaries and label metrics.

The threshold is `pipeline.thresholds.resolve_threshold`'s; this module finds what it reads
(which calibration, the corpus's scores) and says where the number came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputError
from pipeline.report.sketch import HIST_RATIO, sketch_quantile
from pipeline.scores import SCORES
from pipeline.thresholds import CONFIDENCE, Calibration, ThresholdSpec, parse_threshold, resolve_threshold

if TYPE_CHECKING:
    from pipeline.report.scan import ScorePartial, ScoreStats

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


@dataclass(frozen=True)
class Threshold:
    spec: str
    policy: str
    parameter: float
    value: float
    source: str
    # the share of the model's held-out split its calibration read as anomalies (quantile
    # policy with a reachable calibration only)
    estimated_contamination: float | None = None
    # how sure the quantile is (same cases): held-out images, how many formed the normal bulk,
    # the confidence of the upper bound the threshold is, and the bulk's fitted quantile itself
    uncertainty: dict[str, float] | None = None
    # a score of scores (fused): the parts the calibration fuses (train --fuse); None otherwise or unknown
    parts: tuple[str, ...] | None = None


def report_threshold(spec: str, totals: ScorePartial | None, exact: bool, calibration: dict[str, Any] | None,
                     metadata: dict[str, Any] | None, score: str = "mse") -> Threshold:
    """The threshold on `score` a policy gives, and where it came from (`totals` only for contamination)."""
    parsed = parse_threshold(spec)
    if parsed.policy == "value":
        return Threshold(spec, parsed.policy, parsed.parameter, resolve_threshold(parsed), "the value given",
                         parts=fused_part_names(calibration, score))
    if parsed.policy == "contamination":
        value, source = _contamination(parsed, totals, exact)
        return Threshold(spec, parsed.policy, parsed.parameter, value, source,
                         parts=fused_part_names(calibration, score))
    value, source, used = _calibrated_quantile(spec, parsed.parameter, calibration, metadata, score)
    return Threshold(spec, parsed.policy, parsed.parameter, value, source, estimated_contamination(used, score),
                     threshold_uncertainty(used, score, parsed.parameter), fused_part_names(used, score))


def fused_part_names(calibration: dict[str, Any] | None, score: str) -> tuple[str, ...] | None:
    """The parts `calibration` fuses into `score` when it is a score of scores (fused), if it says."""
    if not calibration or SCORES.get(score) is None or SCORES[score].needs != "scores":
        return None
    return tuple(calibration.get("fused_from") or ()) or None


def estimated_contamination(calibration: dict[str, Any] | None, score: str) -> float | None:
    """The share of the held-out split `calibration` read as anomalies on `score`, if it says."""
    if not calibration:
        return None
    scores = Calibration.from_dict(calibration).scores
    return scores[score].contamination if score in scores else None


def threshold_uncertainty(calibration: dict[str, Any] | None, score: str, q: float) -> dict[str, float] | None:
    """What a `quantile:q` threshold on `score` rests on: {held_out, bulk, confidence, point_estimate}."""
    if not calibration:
        return None
    scores = Calibration.from_dict(calibration).scores
    if score not in scores:
        return None
    fitted = scores[score]
    return {"held_out": fitted.count, "bulk": fitted.bulk_count, "confidence": CONFIDENCE,
            "point_estimate": fitted.estimate(q)}


def _contamination(parsed: ThresholdSpec, totals: ScorePartial, exact: bool) -> tuple[float, str]:
    """The cut that flags the top share of the scored rows: exact, or read off the histogram."""
    share = parsed.parameter
    n, stats = totals.scored, totals.stats.get(totals.score)
    if n == 0:
        return math.inf, "no scored rows"
    if not exact:
        value = sketch_quantile(stats.histogram, 1.0 - share, stats.lowest, stats.highest)
        return value, (f"the {1 - share:g}-quantile of this corpus's {totals.score} (histogram, within "
                       f"{(HIST_RATIO - 1) * 100:.2f}%)")
    value = resolve_threshold(parsed, scores=totals.sample.column(totals.score))
    return value, f"the top {share:g} share ({int(round(share * n)):,} of {n:,} scored rows)"


def _calibrated_quantile(spec: str, q: float, calibration: dict[str, Any] | None,
                         metadata: dict[str, Any] | None, score: str) -> tuple[float, str, dict[str, Any] | None]:
    """A calibration quantile: --model's, the embed job's recorded threshold, or the named
    model's; with where it came from and the calibration it read, when it read one."""
    if calibration:
        return (resolve_threshold(spec, calibration, score=score),
                "calibration of --model (the normal bulk of its held-out scores)", calibration)
    meta = metadata or {}
    recorded = meta.get("threshold_spec")
    same_score = meta.get("score", "mse") == score
    if same_score and recorded and isinstance(meta.get("threshold"), (int, float)) and math.isfinite(meta["threshold"]):
        try:
            recorded_spec = parse_threshold(recorded)
        except InputError:
            recorded_spec = None
        if recorded_spec and (recorded_spec.policy, recorded_spec.parameter) == ("quantile", q):
            return (float(meta["threshold"]), "the embed job's threshold recorded in the latent metadata",
                    _calibration_of(meta.get("model")))
    model_calibration = _calibration_of(meta.get("model"))
    if model_calibration:
        return (resolve_threshold(spec, model_calibration, score=score),
                f"calibration of the model named in the latent metadata ({meta['model']})", model_calibration)
    raise InputError(
        f"--threshold {spec} needs the model's calibration: pass --model, or use contamination:X or value:X "
        f"(the latent metadata records {recorded or 'no threshold spec'} and no reachable model)")


def _calibration_of(model_url: str | None) -> dict[str, Any] | None:
    """The calibration of the model the latent metadata names (None if it names none or the model
    has none); InputError naming the model and the cause when it cannot be read."""
    from pipeline.checkpoint import read_checkpoint_meta

    if not model_url:
        return None
    try:
        return (read_checkpoint_meta(model_url).get("training") or {}).get("calibration")
    except (OSError, ValueError) as e:  # ValueError: pipeline.checkpoint's CheckpointError among others
        raise InputError(f"the model {model_url} named in the latent metadata cannot be read for its calibration "
                         f"({type(e).__name__}: {e}); pass --model, or use --threshold contamination:X or value:X"
                         ) from e


def score_summary(stats: ScoreStats, sample: np.ndarray, exact: bool) -> dict[str, Any]:
    """{count, min, max, mean, quantiles}: quantiles of the sample when exact, else of the histogram."""
    if stats.count == 0:
        return {"count": 0, "min": None, "max": None, "mean": None, "quantiles": {}}
    if exact:
        quantiles = np.quantile(sample.astype(np.float64), QUANTILES)
    else:
        quantiles = [sketch_quantile(stats.histogram, q, stats.lowest, stats.highest) for q in QUANTILES]
    return {"count": stats.count, "min": stats.lowest, "max": stats.highest, "mean": stats.total / stats.count,
            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)}}


def label_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUROC, average precision and the best-F1 threshold of `scores` against 0/1 `labels`."""
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
    )

    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    out: dict[str, Any] = {"positives": positives, "negatives": negatives, "auroc": None, "average_precision": None,
                           "best_f1": None, "best_f1_threshold": None, "best_f1_precision": None,
                           "best_f1_recall": None}
    if positives == 0:
        return out
    out["average_precision"] = float(average_precision_score(labels, scores))
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The curve's last point (precision 1, recall 0) has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    best = int(np.argmax(f1))
    out.update(best_f1=float(f1[best]), best_f1_threshold=float(thresholds[best]),
               best_f1_precision=float(p[best]), best_f1_recall=float(r[best]))
    if negatives:
        out["auroc"] = float(roc_auc_score(labels, scores))
    return out


def at_threshold(confusion: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of the report's flags, from [[tn, fp], [fn, tp]]."""
    (tn, fp), (fn, tp) = confusion.tolist()
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if tp + fp + fn else None)
    return {"confusion_matrix": [[tn, fp], [fn, tp]], "tn": tn, "fp": fp, "fn": fn, "tp": tp,
            "precision": precision, "recall": recall, "f1": f1}
