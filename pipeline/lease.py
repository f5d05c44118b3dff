"""One job at a time in an output folder: a lease with a heartbeat, on any storage.

Two jobs started at once into the same `--out` (a double submit) would interleave their
rows; the second must refuse while the first holds the folder, and a killed job must not
lock the folder forever.

Layout: `<out>/_lease/<generation>.json`, one small JSON record per holder in turn:
{job, owner, host, pid, started, heartbeat, released}. The highest generation is the
current holder. To acquire, a job reads it; the folder is free when there is none, or it
is released, or it is stale (no heartbeat for `STALE_SECONDS`, or its holder ran on this
host under a process id that is gone). It then creates the next generation with
create-if-absent (`storage.create_exclusive`: a hard link locally, a conditional PUT with
If-None-Match on S3), so of two jobs racing for the same free folder exactly one wins. A
live holder, or a lost race, is refused with `LeaseHeld`, saying who holds the folder and
since when.

While it holds the lease, a thread rewrites the holder's record every `HEARTBEAT_SECONDS`.
If it ever finds a newer generation (it was taken for dead, say after a long network
stall), the lease is lost: `check()` raises `JobFailed`, and jobs call it before they mark
their output finished. A beat that fails is printed as a warning with its cause; after
`MAX_FAILED_BEATS` in a row (half of `STALE_SECONDS` at the defaults: past that another job
may soon take the folder for free) the heartbeat gives up and `check()` fails the job,
naming the last cause. `release()` marks the record released (and stops the heartbeat).

A record is read in one request (`storage.read_bytes`): a reader that opened it and then
read it in a second, conditional request would fail whenever a heartbeat replaced it in
between.

Every stage that writes an output folder takes the lease in its `prepare`, before its first
write, and puts it in its plan (the stages are listed in `jobs.cli`); `run_prepared` runs the
stage holding it and lets it go however the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar

from pipeline import storage
from pipeline.errors import InputError, JobFailed

LEASE_DIR = "_lease"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
MAX_FAILED_BEATS = 6


class LeaseHeld(InputError):
    """Another live job holds the output folder."""


def _now_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def _generations(folder_url: str) -> list[int]:
    fs, path = storage.filesystem(storage.join(folder_url, LEASE_DIR))
    fs.invalidate_cache(path)  # other processes write here; object-store listings are cached
    if not fs.exists(path):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _record_url(folder_url: str, generation: int) -> str:
    return storage.join(folder_url, LEASE_DIR, f"{generation:08d}.json")


def _read(folder_url: str, generation: int) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(_record_url(folder_url, generation)))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_free(record: dict[str, Any] | None, stale_seconds: float) -> bool:
    if record is None or record.get("released"):
        return True
    if time.time() - float(record.get("heartbeat", 0)) > stale_seconds:
        return True
    return record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1)))


def _describe(folder_url: str, record: dict[str, Any]) -> str:
    age = time.time() - float(record.get("heartbeat", 0))
    return (f"{folder_url} is in use by another {record.get('job', 'job')} (host {record.get('host')}, "
            f"pid {record.get('pid')}, since {record.get('started')}; last heartbeat {age:.0f}s ago). "
            f"Wait for it to finish; if it was killed, the folder frees itself {STALE_SECONDS:.0f}s after its "
            "last heartbeat (at once on the same host)")


class Lease:
    """The lease on one output folder held by this process; use `Lease.acquire`."""

    def __init__(self, folder_url: str, generation: int, record: dict[str, Any], heartbeat_seconds: float):
        self.folder_url, self.generation, self.record = folder_url, generation, record
        self.lost = False
        self.failed_beats = 0  # all beats that failed while this lease was held
        self.gave_up: str | None = None  # why the heartbeat stopped trying, once it did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_seconds,), name="lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, folder_url: str, job: str, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                stale_seconds: float = STALE_SECONDS) -> Lease:
        """Hold `folder_url` for `job`, or raise LeaseHeld naming the live holder."""
        generations = _generations(folder_url)
        current = generations[-1] if generations else -1
        record = _read(folder_url, current) if current >= 0 else None
        if not _is_free(record, stale_seconds):
            raise LeaseHeld(_describe(folder_url, record))
        now = time.time()
        mine = {"job": job, "owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                "started": _now_iso(now), "heartbeat": now, "released": False}
        if not storage.create_exclusive(_record_url(folder_url, current + 1), json.dumps(mine).encode()):
            winner = _read(folder_url, current + 1) or {"job": "job", "started": "just now", "heartbeat": now}
            raise LeaseHeld(_describe(folder_url, winner))
        for old in generations[:-1]:  # the records before the last are history: keep the folder small
            storage.remove(_record_url(folder_url, old))
        return cls(folder_url, current + 1, mine, heartbeat_seconds)

    def _taken_over(self) -> bool:
        return storage.exists(_record_url(self.folder_url, self.generation + 1))

    def _beat(self, seconds: float) -> None:
        in_a_row = 0
        while not self._stop.wait(seconds):
            try:
                if self._taken_over():
                    self.lost = True
                    return
                self.record["heartbeat"] = time.time()
                storage.write_text(_record_url(self.folder_url, self.generation), json.dumps(self.record))
                in_a_row = 0
            except Exception as error:  # noqa: BLE001 - counted and printed; the job fails in check() if it persists
                self.failed_beats += 1
                in_a_row += 1
                cause = f"{type(error).__name__}: {error}"
                print(f"warning: the lease heartbeat on {self.folder_url} failed ({in_a_row} in a row, "
                      f"giving up at {MAX_FAILED_BEATS}): {cause}", file=sys.stderr, flush=True)
                if in_a_row >= MAX_FAILED_BEATS:
                    self.gave_up = cause
                    return

    def check(self) -> None:
        """JobFailed if another job took the folder over while this one ran (it was taken for dead),
        or if the heartbeat gave up (another job may take the folder for free any moment)."""
        if self.gave_up is not None:
            raise JobFailed(f"the lease heartbeat on {self.folder_url} failed {MAX_FAILED_BEATS} times in a row "
                            f"(last: {self.gave_up}); another job could take the folder over, so this one stops "
                            "before marking its output finished: fix the storage, then rerun (it resumes)")
        if self.lost or self._taken_over():
            self.lost = True
            raise JobFailed(f"the lease on {self.folder_url} was taken over by another job while this one ran "
                            "(no heartbeat reached the storage for too long); its output there may be mixed: "
                            "check the other job, then rerun")

    def release(self) -> None:
        """Stop the heartbeat and mark the folder free (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if not self.lost and not self._taken_over():
            self.record.update(released=True, heartbeat=time.time())
            storage.write_text(_record_url(self.folder_url, self.generation), json.dumps(self.record))

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[Lease]:
        """Around the first writes after acquiring: a refusal there lets the folder go at once."""
        try:
            yield self
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        """Let the folder go. Storage that fails here (the disk that just filled up) leaves the
        record unreleased, which the next job takes for a dead holder's: said in a warning, so
        the job's own error stays the last word."""
        try:
            self.release()
        except Exception as e:
            failed = storage.storage_failure(e)
            if failed is None:
                raise
            print(f"warning: the output folder was not marked free ({failed}); the next job takes it once this one "
                  f"has ended (from another host: once its heartbeat is stale)", file=sys.stderr, flush=True)


Config = TypeVar("Config")
Plan = TypeVar("Plan")
Result = TypeVar("Result")


def run_prepared(prepare: Callable[[Config], Plan], run: Callable[[Plan], Result], cfg: Config) -> Result:
    """`run(prepare(cfg))`, holding the lease `prepare` took (the plan's `lease`) until `run` ends, however it
    ends. The one way every stage runs: `embed(cfg)`, `decode(cfg)`, ... and the job runner (`jobs.cli`)."""
    plan = prepare(cfg)
    lease = getattr(plan, "lease", None)  # a stage that writes no folder (query) holds none
    with lease if lease is not None else contextlib.nullcontext():
        return run(plan)
