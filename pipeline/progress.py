"""Progress of long work: rows done of the total, rows/s and time left.

On a terminal a live bar (tqdm); in logs (a file, a pipe, `ray job submit`) one plain line
every `interval` seconds and a last one at the end, so a log shows progress without
drowning in it.

Work that runs in Ray actors reports to a `RowTally` (a tiny actor that holds no CPU) through
a `TallyClient` the mappers call after each batch; the driver polls the tally and also
learns how many rows each node did (`by_node`), which is how a job shows its work spread
over a cluster.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """A progress display for `total` units of work (None: unknown); thread-safe `update(done)`."""

    def __init__(self, label: str, total: int | None, unit: str = "rows", interval: float = 10.0,
                 stream: TextIO | None = None, bar: bool | None = None, approximate: bool = False):
        self.label, self.total, self.unit, self.interval = label, total, unit, interval
        self.approximate = approximate  # the total is an estimate: shown as "~N", the ETA as such
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._lock = threading.Lock()
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=unit[:-1] if unit.endswith("s") else unit,
                             unit_scale=True, file=self.stream, dynamic_ncols=True, leave=True)

    def line(self) -> str:
        """`<label>: 12,345 / 100,000 rows (12%), 1,234 rows/s, 1m10s left`."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total:
            text += f" / {'~' if self.approximate else ''}{self.total:,} {self.unit} ({self.done / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.0f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", {_duration((self.total - self.done) / rate)} left"
        elif self.total and self.done >= self.total:
            text += f", {_duration(elapsed)}"
        return text

    def update(self, done: int) -> None:
        """Set the units done so far (not an increment: pollers report totals)."""
        with self._lock:
            if self._bar is not None:
                self._bar.update(done - self.done)
                self.done = done
                return
            self.done = done
            now = time.monotonic()
            if now - self._last_line >= self.interval:
                self._last_line = now
                print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        """The last line (or the finished bar)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            else:
                print(self.line(), file=self.stream, flush=True)


class RowTally:
    """Rows done, by node: the state of the tally actor (`start_tally` makes it a Ray actor)."""

    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()

    def add(self, rows: int, node: str) -> None:
        self.rows[node] += rows

    def totals(self) -> dict[str, int]:
        return dict(self.rows)


class TallyClient:
    """What a mapper calls after each batch: `client(rows)`. Picklable; one message per call, no wait."""

    def __init__(self, tally: Any):
        self.tally = tally
        self._node: str | None = None

    def __call__(self, rows: int) -> None:
        if self._node is None:
            import ray

            self._node = ray.get_runtime_context().get_node_id()
        self.tally.add.remote(rows, self._node)


class Poller:
    """A context manager that calls `tick` every `poll` seconds on a daemon thread while it is
    open, and `finish` (one last `tick` unless overridden) when it closes.

    What it shows is a display of work that goes on without it: a tick that fails (storage that
    answers late, a progress actor lost with its node) is said once in a warning and tried again
    at the next poll, never ends the work or prints a traceback over the job's lines.
    """

    def __init__(self, poll: float, name: str):
        self.poll, self.name = poll, name
        self.failures = 0  # ticks that failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        self.tick()

    def failed(self, error: Exception) -> None:
        """Count a failed tick; the first one is said in a warning."""
        self.failures += 1
        if self.failures == 1:
            cause = (str(error).strip().splitlines() or [""])[0][:200]
            print(f"warning: the {self.name} display could not be updated ({type(error).__name__}: {cause}); "
                  "the job goes on", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - a display: said once, the work goes on
                self.failed(error)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.finish()
        except Exception as error:  # noqa: BLE001 - as in _watch; the job's own error, if any, stays its error
            self.failed(error)


class TallyWatch(Poller):
    """Driver side: a Ray tally actor, a thread that feeds its total into a `Progress`, and the
    final rows by node. Use as a context manager around the work; `client` goes to the mappers.

    The tally lives on the driver's node: a worker node that dies takes its mappers with it, which
    Ray replaces, but not the count of the whole job. (The affinity is hard: Ray 2.60 places a
    0-CPU actor with a soft one on other nodes too; the driver's node is alive while it runs.)
    """

    def __init__(self, progress: Progress, poll: float = 1.0):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        super().__init__(poll, "progress")
        self.progress = progress
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.tally = ray.remote(num_cpus=0, scheduling_strategy=here)(RowTally).remote()
        self.client = TallyClient(self.tally)
        self.by_node: dict[str, int] = {}  # the last counts read

    def _read(self) -> dict[str, int]:
        import ray

        self.by_node = ray.get(self.tally.totals.remote())
        return self.by_node

    def tick(self) -> None:
        self.progress.update(sum(self._read().values()))

    def finish(self) -> None:
        import ray

        try:
            # The mappers' last messages may still be on their way: read until the count holds still,
            # or has reached the job's exact total.
            exact = None if self.progress.approximate else self.progress.total
            previous, deadline = self._read(), time.monotonic() + 5.0
            while time.monotonic() < deadline and sum(previous.values()) != exact:
                time.sleep(0.2)
                latest = self._read()
                if latest == previous:
                    break
                previous = latest
        finally:  # a tally that cannot be read leaves the last counts read
            self.progress.update(sum(self.by_node.values()))
            self.progress.close()
            ray.kill(self.tally)
