"""Report on a latent dataset: score distribution, threshold, label metrics, the worst images.

Local (embedded Ray):
    python -m jobs.report --latents demo-output/latents --out demo-output/report \\
        --model demo-output/run/model --data demo-output/shards

On a cluster:
    ray job submit --working-dir . -- python -m jobs.report \\
        --latents s3://bucket/latents/r1 --out s3://bucket/reports/r1 \\
        --model s3://bucket/runs/r1/model --data s3://bucket/shards --threshold contamination:0.01

Open <out>/index.html in a browser; <out>/summary.json holds the same figures for programs
(its keys are listed in pipeline/report/__init__.py). Without --model and --data the report has no
image galleries. With --neighbours (a finished jobs.neighbours output) it adds the largest
near-duplicate clusters, with thumbnails from --data. Exit status 2: the input cannot be
reported on as asked (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from jobs.cli import arguments, parser, run_job
from jobs.inputs import add_column_flags
from pipeline import report
from pipeline.scores import SCORE_COLUMNS
from pipeline.report import ReportConfig

D = {f.name: f.default for f in fields(ReportConfig)}


def _id_pair(text: str) -> tuple[str, str]:
    first, sep, second = text.partition(",")
    if not sep or not first or not second:
        raise argparse.ArgumentTypeError(f"expected ID_A,ID_B, got {text!r}")
    return first, second


def build_parser() -> argparse.ArgumentParser:
    p = parser("report", __doc__)
    p.add_argument("--latents", dest="latents_url", required=True,
                   help="URL of the latent dataset (the embed job's --out)")
    p.add_argument("--out", dest="out_url", required=True, help="URL of the report folder to write")
    p.add_argument("--model", dest="model_url", default=None,
                   help="exported model: calibration for quantile thresholds, reconstructions for the galleries")
    p.add_argument("--data", dest="data_url", default=None,
                   help="URL of the image shards the latents were made from (galleries)")
    p.add_argument("--label-column", default=None,
                   help="latent column with 1 = anomaly, 0 = normal (default: 'label' when the latents have one)")
    p.add_argument("--score", default=D["score"], choices=SCORE_COLUMNS,
                   help="score to rank, threshold and plot by (default: the one the embed job flagged by)")
    p.add_argument("--threshold", default=D["threshold"],
                   help="quantile:Q of the model's calibration, contamination:X (flag the top X share), or value:X")
    p.add_argument("--top-k", type=int, default=D["top_k"], help="worst images listed and shown")
    p.add_argument("--typical-k", type=int, default=D["typical_k"], help="typical images shown (nearest the median)")
    add_column_flags(p, D["id_column"], D["image_column"], "of the --data shards")
    p.add_argument("--interpolate", type=_id_pair, default=None, metavar="ID_A,ID_B",
                   help="render a latent interpolation strip between two ids (needs --model)")
    p.add_argument("--interpolation-steps", type=int, default=D["interpolation_steps"],
                   help="images in the interpolation strip, endpoints included")
    p.add_argument("--neighbours", dest="neighbours_url", default=None,
                   help="a neighbours output (jobs.neighbours --out): adds the near-duplicate clusters")
    p.add_argument("--max-exact-rows", type=int, default=D["max_exact_rows"],
                   help="above this many rows, quantiles come from a histogram and metrics from a sample")
    p.add_argument("--allow-partial", action="store_true",
                   help="report on a latent dataset whose embed job never finished (the report says so at the top)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ReportConfig:
    return ReportConfig(**arguments(build_parser(), argv))


def run(inputs: report.Inputs) -> dict[str, Any]:
    """The report, and the one-line summary of it."""
    summary = report.run(inputs)
    threshold = summary["threshold"]
    line = {"out": inputs.cfg.out_url, "rows": summary["counts"]["rows"], "threshold": threshold["value"],
            "policy": threshold["spec"], "flagged_rows": threshold["flagged_rows"]}
    if "metrics" in summary:
        line.update(auroc=summary["metrics"]["auroc"], average_precision=summary["metrics"]["average_precision"])
    return line


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("report", argv, parse_args, prepare=report.check_inputs, run=run)


if __name__ == "__main__":
    sys.exit(main())
