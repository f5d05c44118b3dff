"""What every job's command line shares: one runner, and help that states each default once.

Every `jobs/<stage>.py` has `build_parser()`, `parse_args(argv)` (arguments -> the stage's
frozen config) and `main(argv)`, which is `run_job(...)`:

1. parse the arguments into the config (a bad value: `error: ...`, exit 2);
2. print the config once, as `<stage> config: {json}`;
3. `prepare(config)`: every check that needs no cluster (columns, ids, checkpoints, output
   folders); an `InputError` here or later is printed as `error: <message>`, exit 2.
   Every stage that writes an output folder (synth, ingest, train, embed, neighbours,
   report, decode) takes the folder's lease here, before its first write, so that a second
   job into the same folder is refused ("... is in use by another ... job") instead of
   mixing its files in; the lease is held until `run` ends (`pipeline.lease.run_prepared`).
   `query` writes no folder, and `demo` runs train, embed and report through their library
   calls (`train(cfg)`, ...), which hold their folders' leases the same way;
4. connect to Ray only when the stage needs it (plain `ray.init()`, which joins the cluster
   of `RAY_ADDRESS` / `ray job submit`, or reuses one this process already has), with Ray's
   INFO chatter kept off the console unless `--verbose` (`pipeline.console`);
5. `run(prepared)`, and print its summary as one JSON line; a `JobFailed` (the job ran but
   broke a promise, e.g. rows in != rows out) prints the summary and `error: ...`, exit 1;
   so does storage that failed: a request on every attempt, or a full disk (`storage.storage_failure`).

Anything else that escapes is a bug in this project and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import storage
from pipeline.console import filtered_stderr, verbose_requested
from pipeline.errors import InputError, JobFailed
from pipeline.lease import run_prepared

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default,
    or there is none to state (required options, flags, "decided at run time" Nones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default == "" or action.default is argparse.SUPPRESS
        if ("default" in text or action.required or nothing or action.nargs == 0):  # nargs 0: a flag
            return text
        return super()._get_help_string(action)


# How a job names itself in its help: `python -m jobs.<stage>`, or `squeeze <stage>` when
# the `squeeze` command runs it (jobs/squeeze.py sets this before building the parser).
PROG_PREFIX = "python -m jobs."


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser for a job: the docstring's first line as its description, the rest
    (the exact local and cluster commands) after the options, and `--verbose`."""
    first, _, rest = doc.strip().partition("\n")
    p = argparse.ArgumentParser(prog=f"{PROG_PREFIX}{prog}", description=first, epilog=rest.strip() or None,
                                formatter_class=_Formatter)
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own INFO logging, execution plans and progress bars too")
    return p


def arguments(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """The parsed options as a dict, without the ones every job shares (`--verbose`)."""
    args = vars(p.parse_args(argv))
    args.pop("verbose", None)
    return args


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """HelpFormatter that keeps the epilog's command examples as written."""


def csv(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'): comma-separated option values."""
    return tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


def as_dict(value: Any) -> Any:
    """A config or summary as plain JSON-able values."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def connect_ray(verbose: bool = False) -> None:
    """Join the cluster this process should use: the one it already has, else plain `ray.init()`;
    either way with Ray's console chatter kept to what matters (`pipeline.console`)."""
    import ray

    from pipeline import console

    console.quiet_ray(verbose)
    if not ray.is_initialized():  # a test or notebook may have started one already
        ray.init(**console.init_kwargs(verbose))
    console.filter_worker_lines(verbose)


def run_job(name: str, argv: Sequence[str] | None, parse_args: Callable[[Sequence[str] | None], Any],
            run: Callable[[Any], Any], prepare: Callable[[Any], Any] | None = None,
            needs_ray: bool | Callable[[Any], bool] = True) -> int:
    """Parse, print the config, check, connect, run, print the summary; the exit status."""
    verbose = verbose_requested(list(argv) if argv is not None else sys.argv[1:])
    with filtered_stderr(verbose):
        return _run(name, argv, parse_args, run, prepare, needs_ray, verbose)


def _run(name: str, argv: Sequence[str] | None, parse_args: Callable[[Sequence[str] | None], Any],
         run: Callable[[Any], Any], prepare: Callable[[Any], Any] | None,
         needs_ray: bool | Callable[[Any], bool], verbose: bool) -> int:
    def connect_and_run(prepared: Any) -> Any:
        if needs_ray(config) if callable(needs_ray) else needs_ray:
            connect_ray(verbose)
        return run(prepared)

    try:
        config = parse_args(argv)
        print(f"{name} config: {json.dumps(as_dict(config), default=str)}", flush=True)
        summary = run_prepared(prepare or (lambda given: given), connect_and_run, config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    except JobFailed as e:
        if e.summary is not None:
            print(json.dumps(as_dict(e.summary), default=str), flush=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as e:
        # Storage that failed (a request on every attempt, naming its URL; a full disk), here or
        # in a Ray worker: the job failed as JobFailed does; anything else is a bug.
        failed = storage.storage_failure(e)
        if failed is None:
            raise
        print(f"error: {failed}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(json.dumps(as_dict(summary), default=str), flush=True)
    return EXIT_OK

