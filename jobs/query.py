"""Query a neighbours index: the k nearest ids of image files (through the model) or of ids it holds.

    python -m jobs.query --neighbours demo-output/neighbours --model demo-output/run/model \\
        --image a.png --image b.jpg --k 5
    python -m jobs.query --neighbours demo-output/neighbours --ids synth-00000001,synth-00000002

Prints one JSON line per query ({"query", "ids", "distances", "error"}), then the summary.
Needs no Ray: the index is loaded in this process. From Python: `pipeline.neighbours.query(...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from jobs.cli import arguments, csv, parser, run_job
from pipeline.neighbours.query import QueryConfig, run_query


def build_parser() -> argparse.ArgumentParser:
    p = parser("query", __doc__)
    p.add_argument("--neighbours", dest="neighbours_url", required=True,
                   help="URL of a neighbours output (the neighbours job's --out)")
    p.add_argument("--model", dest="model_url", default=None,
                   help="the model that made the indexed latents (needed for --image)")
    p.add_argument("--image", dest="images", action="append", default=[], metavar="PATH",
                   help="an image file (path or URL) to find the neighbours of; repeat for more")
    p.add_argument("--ids", type=csv, default=(), help="comma-separated ids of the indexed latents")
    p.add_argument("--k", type=int, default=10, help="neighbours per query")
    return p


def parse_args(argv: Sequence[str] | None = None) -> QueryConfig:
    return QueryConfig(**arguments(build_parser(), argv))


def run(cfg: QueryConfig) -> dict[str, Any]:
    return run_query(cfg, emit=lambda answer: print(json.dumps(answer), flush=True))


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("query", argv, parse_args, run=run, needs_ray=False)


if __name__ == "__main__":
    sys.exit(main())
