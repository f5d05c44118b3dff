"""Anomaly report: latent dataset -> summary.json, index.html, figures and the worst images.

Reads a latent dataset (the embed job's output) with Ray Data in two streaming passes over
its small score columns; each Ray task reduces one block to a small partial and the driver
merges the partials, so no step ever holds the dataset:

1. scores: counts, error reasons, symmetric-log histograms of every score column, per-shard and
   per-kind sums of the report's score (--score), the top-K rows by it, and the score/label arrays the exact quantiles and
   the label metrics use (every row up to `max_exact_rows`; above that a uniform sample
   chosen by a hash of the id, and quantiles come from the histogram).
2. flags, under the threshold the chosen policy gives: flagged rows overall, per shard and
   per kind, the confusion matrix against the label column, and the rows nearest the median
   (the "typical" gallery).

Then the galleries: the worst K and the typical rows are fetched from the image shards by id
with a filtered read (`pc.field(id).isin(ids)`), reconstructed with the model, and shown as
original | reconstruction | anomaly map (the map the report's score pools).

The files, along those steps:
    config.py     ReportConfig and `check_inputs`: every refusal before any pass (InputError)
    scan.py       the two Ray Data passes and their typed partials (`from_block`, `combine`)
    sketch.py     the histogram sketch behind quantiles above max_exact_rows and the histograms
    metrics.py    the threshold, score summaries and label metrics
    summary.py    summary.json's sections
    figures.py    histograms and ROC / PR curves (matplotlib)
    galleries.py  gallery images and the interpolation strip (the only file that needs torch)
    duplicates.py the near-duplicates section from a neighbours output (--neighbours)
    html.py       index.html from templates/index.html (Jinja2, autoescaped)
    output.py     the output folder's file names and writes
    job.py        `report(cfg)`: the steps in order

Precision: counts, sums, flags, means and the confusion matrix are exact at any size. With at
most `max_exact_rows` scored rows, quantiles (numpy's linear interpolation) and the label
metrics are exact too. Above it, quantiles come from a histogram of HIST_BINS bins, log-spaced
on both sides of zero over [-1e4, 1e4] (sketch.py): a reported quantile is within a factor
HIST_RATIO (relative error < 0.74%) of an order statistic next to its rank when |score| >= 1e-6,
within about 1e-9 of it nearer zero, and outside [-1e4, 1e4] it reads as the exact extreme; AUROC,
AP and best F1 then come from the hash sample of about `max_exact_rows` rows.

Thresholds (flag rule: score > threshold, the same as the embed job's is_anomaly when the
report's score is the one the embed job flagged by):
- `quantile:Q`: the Q-quantile of the model's calibration (held-out normal data); needs
  --model, or the latent files' metadata (the embed job's threshold when its spec was the
  same, else the calibration of the model it names).
- `contamination:X`: flag the top X share of this corpus's scored rows.
- `value:X`: a fixed value of the score.
The latent dataset's own `is_anomaly` came from the embed job's threshold; the report
recomputes every flag under its own policy and shows both counts.

Labels: a numeric or boolean column, 1 (non-zero) = anomaly, 0 = normal, null = unknown.

Output folder (any fsspec URL; every file written atomically; no file name comes from data):
    index.html               the report a person opens (relative links only, no script)
    summary.json             machine-readable, keys below
    top_anomalies.parquet    rank, id, score, <every score>, [label], [anomaly_kind], shard, flagged, [image]
    histogram_<score>.png, [roc_pr.png], [interpolation.png]
    images/worst-0001-original.png | -reconstruction.png | -error.png, images/typical-0001-...,
    images/duplicates-0001.png (a thumbnail strip per near-duplicate cluster, with --neighbours)

summary.json keys:
    format, format_version    "squeeze-report", 1
    created                   UTC time, ISO 8601
    partial                   null, or "partial: N of M rows ..." when made with --allow-partial
                              from a latent dataset whose embed job never finished
    config                    the ReportConfig the report was made with (latents_url, out_url, ...)
    latents                   {url, files, rows, metadata: the latent files' "squeeze" metadata or null}
    counts                    {rows, scored_rows, error_rows, errors_by_reason, unscored_rows,
                               embed_flagged_rows (the latent dataset's own is_anomaly)}
    score                     the score the report ranks, thresholds and plots by (--score, default: the
                              one the embed job flagged by, from the latents' metadata; else mse)
    scores                    {<every score column>: {count, min, max, mean, quantiles {"0.5": ...}},
                               quantile_method "exact"|"histogram", quantile_relative_error}
    histogram                 {score, edges, counts, scale ("log"|"symlog"), [linthresh], [counts_label_0, counts_label_1]}
    threshold                 {spec, policy, parameter, value, source, score, rule "<score> > value",
                               flagged_rows, flagged_share, estimated_contamination (the share
                               of the model's held-out split its calibration read as anomalies;
                               null without a calibration), uncertainty {held_out, bulk,
                               confidence, point_estimate} (a quantile threshold is the upper
                               confidence bound on the bulk's quantile; null without a calibration),
                               parts (for a score of scores such as fused: the scores its
                               calibration fuses, `train --fuse`; null otherwise or without one)}
    metrics (labels only)     {label_column, score, positives, negatives, unlabelled_scored_rows,
                               sampled, rows_used, auroc, average_precision, best_f1,
                               best_f1_threshold, best_f1_precision, best_f1_recall,
                               by_score {<every score>: {auroc, average_precision, recall_at_1pct_fpr}},
                               at_threshold {confusion_matrix [[tn, fp], [fn, tp]], tn, fp, fn, tp,
                                             precision, recall, f1}}
    by_kind (anomaly_kind only) [{kind, rows, scored_rows, flagged_rows, flag_rate, mean_score}]
    shards                    [{shard, rows, error_rows, scored_rows, flagged_rows, flag_rate, mean_score, max_score}]
    top_anomalies             [{rank, id, score, <every score>, label, anomaly_kind, shard, flagged}]
    typical_rows              [{rank, id, score, <every score>, label, anomaly_kind, shard}]: nearest the
                              median score
    galleries                 {worst: [...], typical: [...], error_scale, map, precision} or null when
                              omitted; each entry {rank, id, score, <every score>, label, anomaly_kind,
                              recomputed_mse, images {original, reconstruction, error}, note};
                              map: the anomaly map the error images show (one of pipeline.scores.MAPS: the
                              one the report's score pools); precision: the forward pass's, the
                              one the latents record (so recomputed_mse is the row's mse)
    interpolation             {id_a, id_b, steps, image} or null
    near_duplicates           null without --neighbours; else {url, threshold, threshold_rule,
                              recall_on_copies, recall_by_edit {kind: recall}, false_positive_rate,
                              rows, pairs, clusters,
                              rows_in_clusters, rows_to_drop, largest: [{cluster, size, keeper,
                              shown, image, members [{id, keeper, mse}]}]} (up to 10 clusters)
    files                     every file the report wrote, relative to the output folder
    notes                     what was left out and why, model mismatches, sampling
    seconds                   how long the report took
"""

from pipeline.datasets import PATH_COLUMN
from pipeline.report.config import (
    Inputs,
    LatentInfo,
    ReportConfig,
    check_inputs,
    inspect_latents,
)
from pipeline.report.job import report, run
from pipeline.report.metrics import Threshold, label_metrics, report_threshold
from pipeline.report.scan import (
    FlagPartial,
    GroupStats,
    RankedRows,
    ScanPlan,
    ScorePartial,
    ScoreStats,
    pack,
    scan_flags,
    scan_scores,
    unpack,
)
from pipeline.report.sketch import (
    HIST_BINS,
    HIST_EDGES,
    HIST_HIGH,
    HIST_LOW,
    HIST_RATIO,
    histogram_counts,
    sketch_quantile,
)

__all__ = [
    "HIST_BINS", "HIST_EDGES", "HIST_HIGH", "HIST_LOW", "HIST_RATIO", "PATH_COLUMN", "FlagPartial", "GroupStats",
    "Inputs", "LatentInfo", "RankedRows", "ReportConfig", "ScanPlan", "ScorePartial", "ScoreStats", "Threshold",
    "check_inputs", "histogram_counts", "inspect_latents", "label_metrics", "pack", "report", "report_threshold",
    "run", "scan_flags", "scan_scores", "sketch_quantile", "unpack",
]
