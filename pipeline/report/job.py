"""`report(cfg)` = `run(check_inputs(cfg))` (holding --out's lease): the report job as named steps, on the
connected Ray cluster.

scan scores -> resolve the threshold -> scan flags -> assemble the summary -> figures ->
galleries -> interpolation strip -> write the folder. Every check that needs no pass over
the data has already run in `check_inputs`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from functools import reduce
from typing import Any

from pipeline.lease import run_prepared
from pipeline.report.config import Inputs, LatentInfo, ReportConfig, check_inputs
from pipeline.report.duplicates import near_duplicates_section
from pipeline.report.figures import histogram_figure, roc_pr_figure
from pipeline.report.galleries import build_galleries, fetch_images, interpolation_strip
from pipeline.report.html import render_html
from pipeline.report.metrics import Threshold, report_threshold
from pipeline.report.output import (
    MARKER_FILE,
    histogram_file,
    json_clean,
    top_anomalies_parquet,
    write_report,
)
from pipeline.report.scan import (
    FlagPartial,
    ScanPlan,
    ScorePartial,
    run_pass,
    scan_flags,
    scan_scores,
)
from pipeline.report.summary import (
    Findings,
    assemble,
    scores_section,
    with_relative_shards,
)


def _scan_scores(cfg: ReportConfig, info: LatentInfo, exact: bool) -> tuple[ScanPlan, ScorePartial]:
    """Pass 1: every scored row's numbers, or (above max_exact_rows) an id-hash sample of them."""
    fraction = 1.0 if exact else cfg.max_exact_rows / info.rows
    plan = ScanPlan(**info.latent_columns(), top_k=cfg.top_k, sample_fraction=fraction)
    print(f"report: pass 1/2 (scores) over {info.rows:,} rows in {len(info.paths)} file(s) of {cfg.latents_url}"
          f"{'' if exact else f'; quantiles from a histogram, metrics on a {fraction:.3g} sample'}", flush=True)
    return plan, reduce(ScorePartial.combine, run_pass(info, plan, scan_scores, "pass 1/2"), ScorePartial())


def _scan_flags(info: LatentInfo, plan: ScanPlan, threshold: Threshold, median: float, typical_k: int) -> FlagPartial:
    """Pass 2: the flags under the report's threshold, and the rows nearest the median."""
    print(f"report: threshold {plan.score} > {threshold.value:.6g} ({threshold.spec}: {threshold.source}); "
          "pass 2/2 (flags)", flush=True)
    plan = replace(plan, threshold=threshold.value, median=median, typical_k=typical_k)
    return reduce(FlagPartial.combine, run_pass(info, plan, scan_flags, "pass 2/2"), FlagPartial())


def _scan(cfg: ReportConfig, inputs: Inputs) -> Findings:
    """Both passes, with the threshold resolved between them (contamination needs the scores)."""
    info = inputs.info
    exact = info.rows <= cfg.max_exact_rows
    plan, scores = _scan_scores(cfg, info, exact)
    threshold = inputs.threshold or report_threshold(cfg.threshold, scores, exact, inputs.calibration,
                                                      info.metadata, info.score)
    score_summary = scores_section(scores, exact)
    median = score_summary[info.score]["quantiles"].get("0.5", math.nan) if scores.scored else math.nan
    flags = _scan_flags(info, plan, threshold, median, cfg.typical_k)
    return Findings(info=info, exact=exact, scores=scores, score_summary=score_summary, threshold=threshold,
                    flags=flags, top=with_relative_shards(scores.top.rows, info.root),
                    typical=with_relative_shards(flags.typical.rows, info.root))


def _figures(found: Findings, summary: dict[str, Any]) -> dict[str, bytes]:
    """The histograms, and the ROC / PR curves when the labels hold both classes."""
    score = found.scores.score
    files = {histogram_file(score): histogram_figure(summary["histogram"], f"{score} ({summary['histogram']['scale']} scale)",
                                                     found.threshold.value)}
    if "metrics" in summary and summary["metrics"]["auroc"] is not None:
        labels, values = found.scores.sample.labelled(score)
        files["roc_pr.png"] = roc_pr_figure(labels, values, summary["metrics"])
    return files


def _fetch_originals(cfg: ReportConfig, inputs: Inputs, found: Findings) -> dict[str, bytes | None] | None:
    """The original images of the worst and typical rows, fetched once from --data (None without it):
    for the galleries and for top_anomalies.parquet's image column."""
    if not inputs.shards:
        return None
    ids = list(dict.fromkeys(row["id"] for row in [*found.top, *found.typical]))
    print(f"report: fetching {len(ids)} original images from {cfg.data_url}", flush=True)
    return fetch_images(inputs.shards, cfg.columns, ids)


def _galleries(cfg: ReportConfig, info: LatentInfo, originals: dict[str, bytes | None] | None,
               summary: dict[str, Any], files: dict[str, bytes], notes: list[str]) -> dict[str, Any] | None:
    """The worst and typical images reconstructed; None (and a note) without --model and --data."""
    if not (cfg.model_url and originals is not None):
        notes.append("galleries omitted: they need both --model (to reconstruct) and --data (the image shards)")
        return None
    worst = [{k: v for k, v in row.items() if k != "flagged"} for row in summary["top_anomalies"]]
    # Reconstructed as the embed job ran the model: at the precision the latents record (files
    # written before --precision existed were float32).
    precision = (info.metadata or {}).get("precision", "float32")
    entries, images, scale, map_name = build_galleries(cfg.model_url, originals,
                                                       {"worst": worst, "typical": summary["typical_rows"]}, notes,
                                                       summary["score"], precision)
    files.update(images)
    return {**entries, "error_scale": scale, "map": map_name, "precision": precision}


def _interpolation(cfg: ReportConfig, files: dict[str, bytes]) -> dict[str, Any] | None:
    if not cfg.interpolate:
        return None
    id_a, id_b = cfg.interpolate
    print(f"report: interpolating {id_a!r} -> {id_b!r}", flush=True)
    files["interpolation.png"] = interpolation_strip(cfg.model_url, cfg.latents_url, cfg.interpolate,
                                                     cfg.interpolation_steps)
    return {"id_a": id_a, "id_b": id_b, "steps": cfg.interpolation_steps, "image": "interpolation.png"}


def _near_duplicates(cfg: ReportConfig, inputs: Inputs, files: dict[str, bytes],
                     notes: list[str]) -> dict[str, Any] | None:
    if inputs.neighbours is None:
        return None
    print(f"report: near-duplicates from {cfg.neighbours_url}", flush=True)
    return near_duplicates_section(cfg.neighbours_url, inputs.neighbours, inputs.shards, cfg.columns, files, notes)


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Make the report `cfg` describes on the connected Ray cluster; returns summary.json's content."""
    return run_prepared(check_inputs, run, cfg)


def run(inputs: Inputs) -> dict[str, Any]:
    """Make the report `check_inputs` prepared, on the connected Ray cluster; returns summary.json's content."""
    started = time.perf_counter()
    cfg = inputs.cfg
    notes = list(inputs.notes)
    found = _scan(cfg, inputs)
    summary = assemble(cfg, found, notes, inputs.partial)
    files = _figures(found, summary)
    originals = _fetch_originals(cfg, inputs, found)
    summary["galleries"] = _galleries(cfg, found.info, originals, summary, files, notes)
    summary["interpolation"] = _interpolation(cfg, files)
    summary["near_duplicates"] = _near_duplicates(cfg, inputs, files, notes)
    files["top_anomalies.parquet"] = top_anomalies_parquet(
        summary["top_anomalies"], found.info.scores, labelled=found.info.label_column is not None,
        has_kind=found.info.kind_column is not None, originals=originals)
    summary["notes"] = notes
    summary["files"] = sorted([*files, MARKER_FILE, "summary.json", "index.html"])
    summary["seconds"] = time.perf_counter() - started
    summary = json_clean(summary)
    print(f"report: writing {len(files) + 2} files to {cfg.out_url}", flush=True)
    inputs.lease.check()
    write_report(cfg.out_url, files, summary, render_html(summary))
    return summary
