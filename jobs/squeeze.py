"""The `squeeze` command: every stage of the pipeline as a subcommand.

    squeeze --help                 the stages, one line each
    squeeze <stage> --help         the same help as `python -m jobs.<stage> --help`
    squeeze <stage> [options]      runs `python -m jobs.<stage> [options]`

On a cluster, submit the module form, which needs no install: `ray job submit
--working-dir . -- python -m jobs.<stage> ...`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from jobs import cli

# The subcommands in the order data flows; each is the module jobs/<name>.py.
STAGES = ("synth", "ingest", "train", "embed", "neighbours", "query", "report", "decode", "demo")


def summary_line(stage: str) -> str:
    """The first line of a stage's docstring: what it does, in one line."""
    doc = importlib.import_module(f"jobs.{stage}").__doc__ or ""
    return doc.strip().splitlines()[0].rstrip(".")


def usage() -> str:
    width = max(len(stage) for stage in STAGES)
    lines = [f"  {stage:<{width}}  {summary_line(stage)}" for stage in STAGES]
    return ("usage: squeeze <stage> [options]\n\n"
            "Train, embed, score and report on image corpora with a Fire-module autoencoder on Ray.\n\n"
            "stages:\n" + "\n".join(lines) + "\n\n"
            "`squeeze <stage> --help` shows a stage's options; every stage takes --verbose.\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if args else 2
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(usage(), end="", file=sys.stderr)
        print(f"error: unknown stage {stage!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    cli.PROG_PREFIX = "squeeze "
    return importlib.import_module(f"jobs.{stage}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
