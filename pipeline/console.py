"""What a job prints: its own lines, and of Ray's only the warnings and errors that matter.

Ray writes to the console from two places. The driver's own loggers (`ray`, `ray.data`,
`ray.train`) log INFO lines for every execution plan and start-up step; and Ray forwards
every worker's and actor's output to the driver ("(MapWorker pid=...) ..."). A job run
as `python -m jobs.<stage>`, under `ray job submit` or in a notebook would drown its epoch,
progress and summary lines in them.

`quiet_ray()` (before `ray.init`), `filter_worker_lines()` (after it) and `filtered_stderr()`
(around a whole job: Ray's C++ core in the driver process writes its own log lines straight
to file descriptor 2) keep the console to:
- the job's own lines (config, progress, epochs, summary);
- Ray's warnings and errors, except the few known to be harmless (`KNOWN_HARMLESS`):
  each was seen on this project's runs and is explained where it is listed.
INFO lines and execution plans still go to Ray's log files (`/tmp/ray/session_*/logs`).
`--verbose` on any job, or a `RAY_*` logging variable in the environment, shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

# Lines that are noise for a user of this project: each pattern, and why it is safe to hide.
KNOWN_HARMLESS = tuple(re.compile(p) for p in (
    # Ray 2.60 heads use token authentication by default; the warning repeats it on every start.
    r"Token authentication is enabled for this Ray cluster",
    # Ray Data's per-dataset INFO, forwarded from the actors that run a dataset.
    r"Starting execution of Dataset", r"Execution plan of Dataset", r"execution finished in",
    r"A new progress UI is available", r"Registered dataset logger", r"Full logs are in",
    # Ray Train's INFO line for every reported epoch (our own epoch line says what matters).
    r"Reporting training result",
    # Ray's note that actors restarted on failure keep their constructor arguments in the
    # object store: the actors here (the training preemption watcher, the model actors) hold
    # no arguments that can be lost.
    r"has constructor arguments in the object store and max_restarts > 0",
    # Ray Train's placement-group cleaner polling a controller that finished a moment earlier.
    r"Failed to query Ray Train Controller actor state",
    # Ray Data's own deprecation of an option Ray Train sets for it (DataConfig ingest options).
    r"`ExecutionOptions.exclude_resources` is deprecated",
    # Ray Data sampling Parquet before the actor pool starts: a race it recovers from at once.
    r"The Ray cluster currently does not have any available CPUs",
    # A decoded batch's pixels fall back from Arrow tensors to pickled arrays: correct, and
    # only a hint about speed that the benchmarks already measure.
    r"Failed to convert column 'pixels' into pyarrow array",
    # Ray Data saying its progress bars are off: they are, on purpose (the job prints its own).
    r"Progress bars disabled\. To enable",
    # Ray Train's autoscaling request timing out on a busy machine; Ray's own text calls it
    # "safe to ignore" (it is retried), and its traceback follows it.
    r"Failed to send resource request for train-",
    # Ray Data reporting, with its traceback, the error a task raised before it re-raises that
    # error in the job: the job runner then names it (`error: ...`, a full disk, a storage
    # request that failed for good) or prints its traceback (a bug). The log files keep both.
    r"An exception was raised from a task of operator",
    r"Exception occurred in Ray Data or Ray Core internal code", r"ERROR exceptions\.py:\d+ -- Full stack trace:",
))
# Ray's housekeeping actors whose output is about themselves, never about the job: Ray
# Train's placement-group cleaner logs tracebacks when the state API cannot pick one of
# several local clusters, and goes on.
QUIET_ACTORS = ("PlacementGroupCleaner",)
_TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s|$|During handling of the above exception"
                             r"|The above exception was the direct cause|[\w.]*(Error|Exception|Exit|StopIteration)\b)")
_VERBOSE_ENV = ("RAY_LOGGING_LEVEL", "RAY_BACKEND_LOG_LEVEL", "RAY_DATA_LOGGING_CONFIG")
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def verbose_requested(argv: list[str] | None) -> bool:
    """`--verbose` among the arguments, or Ray's own logging variables set by the user."""
    return "--verbose" in (argv or []) or any(os.environ.get(name) for name in _VERBOSE_ENV)


def is_harmless(line: str) -> bool:
    return any(pattern.search(line) for pattern in KNOWN_HARMLESS)


class UsefulLines:
    """The known-harmless lines left out of a stream of lines, with the traceback that follows
    each: call it on each piece of the stream as it arrives. A line and its traceback may come
    in different pieces (a pipe read mid-write, a batch of forwarded worker lines), so whether a
    traceback is being left out carries over from one piece to the next."""

    def __init__(self) -> None:
        self.skipping = False

    def __call__(self, lines: list[str]) -> list[str]:
        kept = []
        for line in lines:
            if is_harmless(line):
                self.skipping = True
                continue
            if self.skipping and _TRACEBACK_LINE.match(line):
                continue
            self.skipping = False
            kept.append(line)
        return kept


class _HarmlessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_harmless(record.getMessage())


def _quiet_loggers() -> None:
    """Ray's driver-side loggers: warnings and up, without the known-harmless ones."""
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):  # the log files keep everything
                handler.setLevel(max(handler.level, logging.WARNING))
                handler.addFilter(_HarmlessFilter())
        logger.addFilter(_HarmlessFilter())


def quiet_ray(verbose: bool = False) -> None:
    """Before `ray.init`: quiet Ray's driver-side logging and Ray Data's progress bars."""
    if verbose:
        return
    warnings.filterwarnings("ignore", message=r".*`ExecutionOptions\.exclude_resources` is deprecated")
    import ray.data  # configures Ray Data's loggers, which we then quiet

    _quiet_loggers()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job prints its own progress (pipeline.progress)
    context.print_on_execution_start = False


def init_kwargs(verbose: bool = False) -> dict[str, Any]:
    """Arguments for `ray.init` that keep its own start-up lines off the console."""
    return {} if verbose else {"logging_level": logging.WARNING}


def filter_worker_lines(verbose: bool = False) -> None:
    """After `ray.init`: drop the known-harmless lines Ray forwards from workers and actors.

    Ray prints forwarded lines through one handler of its stream dispatcher; this wraps it.
    Should a Ray release move that hook, the lines simply stay unfiltered.
    """
    if verbose:
        return
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    pairs = dict(getattr(dispatcher, "handlers", None) or [])
    original = pairs.get("ray_print_logs")
    if original is None or getattr(original, "squeeze_filtered", False):
        return

    by_source: dict[tuple, UsefulLines] = {}  # one filter per worker stream: its batches are pieces of one stream

    def print_useful(data: dict[str, Any]) -> None:
        if data.get("actor_name") in QUIET_ACTORS:
            return
        source = (data.get("ip"), data.get("pid"), data.get("is_err"))
        lines = by_source.setdefault(source, UsefulLines())(list(data.get("lines", [])))
        if lines:
            original({**data, "lines": lines})

    print_useful.squeeze_filtered = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_useful)


def _pump(read_fd: int, write_fd: int) -> None:
    """Copy lines from `read_fd` to `write_fd`, leaving out the known-harmless ones, until EOF;
    both descriptors are the pump's own and closed by it."""
    pending, useful = b"", UsefulLines()
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as source:
            while chunk := source.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = useful([line.decode("utf-8", "replace") for line in lines])
                if kept:
                    os.write(write_fd, "\n".join(kept).encode("utf-8") + b"\n")
        if pending and useful([pending.decode("utf-8", "replace")]):
            os.write(write_fd, pending)
    finally:
        os.close(write_fd)


@contextlib.contextmanager
def filtered_stderr(verbose: bool = False) -> Iterator[None]:
    """Route this process's file descriptor 2 through a filter of the known-harmless lines.

    Python's own writes to stderr pass through unchanged (in order); what Ray's C++ core
    prints there is filtered as its Python loggers are. Child processes do not inherit the
    pipe. Restored on exit, however the job ends.
    """
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2, inheritable=False)
    os.close(write_fd)
    # The pump writes to a copy of the real stderr that it closes itself: should it still be at work
    # when the wait below gives up (a busy machine), closing `saved` cannot hand its number to
    # another file that the pump would then write into.
    pump = threading.Thread(target=_pump, args=(read_fd, os.dup(saved)), name="stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's only write end: the pump sees EOF and finishes
        pump.join(timeout=5)
        os.close(saved)
