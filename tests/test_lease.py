"""One job at a time per output folder: the lease, locally and on a real S3 API."""

from __future__ import annotations

import json
import socket
import threading
import time
import types

import pytest

from pipeline import storage
from pipeline.errors import JobFailed
from pipeline.lease import LEASE_DIR, Lease, LeaseHeld


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


def _race(folder: str, n: int = 4) -> tuple[list[Lease], list[str]]:
    """`n` threads acquire at the same moment; (the leases won, the refusals' messages)."""
    start = threading.Barrier(n)
    won, refused = [], []

    def contender(i: int) -> None:
        start.wait()
        try:
            won.append(Lease.acquire(folder, f"job {i}"))
        except LeaseHeld as e:
            refused.append(str(e))

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_of_jobs_racing_for_a_folder_exactly_one_holds_it(folder):
    won, refused = _race(folder)
    assert len(won) == 1 and len(refused) == 3
    assert all("is in use by another job" in message and "pid" in message for message in refused)
    with pytest.raises(LeaseHeld, match=r"in use by another job 0|in use by another job \d"):
        Lease.acquire(folder, "late job")
    won[0].release()
    again = Lease.acquire(folder, "next job")  # released: free at once
    again.release()


def test_a_killed_holder_frees_the_folder_when_stale_or_when_its_process_is_gone(folder):
    lease = Lease.acquire(folder, "embed job", heartbeat_seconds=60)
    lease._stop.set()  # the holder dies without releasing: no more heartbeats
    with pytest.raises(LeaseHeld, match="embed job .*since"):
        Lease.acquire(folder, "second job", stale_seconds=60)
    time.sleep(1.2)
    taker = Lease.acquire(folder, "second job", stale_seconds=1)  # its heartbeat is over 1 s old
    with pytest.raises(JobFailed, match="taken over"):
        lease.check()  # the old holder learns it lost the folder before it marks anything finished
    taker.release()

    # A record of this host whose process is gone is free at once, whatever its heartbeat says.
    record = {"job": "embed job", "owner": "x", "host": socket.gethostname(), "pid": 2**22 + 12345,
              "started": "earlier", "heartbeat": time.time(), "released": False}
    storage.write_text(storage.join(folder, LEASE_DIR, "00000099.json"), json.dumps(record))
    Lease.acquire(folder, "third job").release()


def test_the_heartbeat_keeps_a_long_job_holding_the_folder(folder, monkeypatch):
    # The lease's clock is the test's: the job "runs" 100 s, longer than stale_seconds, however
    # slowly this machine schedules the heartbeat thread.
    from pipeline import lease as lease_module

    clock = types.SimpleNamespace(time=lambda: 1_000.0)
    monkeypatch.setattr(lease_module, "time", clock)
    lease = Lease.acquire(folder, "long job", heartbeat_seconds=0.05)
    clock.time = lambda: 1_100.0
    record_url = storage.join(folder, LEASE_DIR, f"{lease.generation:08d}.json")
    while json.loads(storage.read_text(record_url))["heartbeat"] != 1_100.0:  # the next beat lands
        assert lease._thread.is_alive()
        time.sleep(0.01)
    with pytest.raises(LeaseHeld, match="long job"):
        Lease.acquire(folder, "impatient job", stale_seconds=60)  # started 100 s ago: stale but for the heartbeat
    lease.check()
    lease.release()
    lease.release()  # idempotent
    history = storage.list_files(storage.join(folder, LEASE_DIR), suffix=".json")
    assert len(history) <= 2, "older records are cleaned up as generations pass"


class _RewrittenBetweenOpenAndRead:
    """An fsspec filesystem in front of the real one: each file opened for reading is
    rewritten (`rewrite(path)`, a PUT) after the open and before the first read, exactly
    the moment a holder's heartbeat can land while another job reads the record."""

    def __init__(self, fs, rewrite):
        self._fs, self._rewrite = fs, rewrite

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="rb", **kwargs):
        f = self._fs.open(path, mode, **kwargs)
        if "r" in mode:
            self._rewrite(path)
        return f


def test_a_record_rewritten_while_another_job_reads_it_still_says_the_folder_is_held(s3_bucket, monkeypatch):
    import boto3
    from s3fs.utils import FileExpired

    folder = f"{s3_bucket}/out"
    holder = Lease.acquire(folder, "long job", heartbeat_seconds=60)
    client = boto3.client("s3")
    rewrites = []

    def heartbeat(path: str) -> None:  # the holder's next beat: the same record, a newer time
        bucket, key = path.split("/", 1)
        holder.record["heartbeat"] = time.time()
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps(holder.record).encode())
        rewrites.append(key)

    real_filesystem = storage.filesystem

    def wrapped_filesystem(url: str):
        fs, path = real_filesystem(url)
        return _RewrittenBetweenOpenAndRead(fs, heartbeat), path

    monkeypatch.setattr(storage, "filesystem", wrapped_filesystem)
    record_url = storage.join(folder, LEASE_DIR, f"{holder.generation:08d}.json")

    # The wrapper does force the race: an open-then-read of the record fails on S3...
    fs, path = storage.filesystem(record_url)
    with pytest.raises(FileExpired):
        with fs.open(path, "rb") as f:
            f.read()
    assert rewrites, "the record was rewritten between open and read"

    # ...and a second job reading the same record, however it is rewritten, is told who holds it.
    with pytest.raises(LeaseHeld, match="in use by another long job"):
        Lease.acquire(folder, "second job")
    assert json.loads(storage.read_text(record_url))["owner"] == holder.record["owner"]
    monkeypatch.undo()
    holder.release()


def test_a_heartbeat_that_keeps_failing_says_why_and_fails_the_job(tmp_path, monkeypatch, capsys):
    from pipeline import lease as lease_module

    monkeypatch.setattr(lease_module, "MAX_FAILED_BEATS", 3)
    lease = Lease.acquire(str(tmp_path / "out"), "long job", heartbeat_seconds=0.05)

    def unreachable(url: str, text: str) -> None:
        raise ConnectionResetError(f"connection reset writing {url}")

    monkeypatch.setattr(storage, "write_text", unreachable)
    lease._thread.join(timeout=300)  # the heartbeat gives up on its own after 3 failures in a row
    assert not lease._thread.is_alive()
    assert lease.failed_beats == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    assert all("lease heartbeat" in w and "ConnectionResetError: connection reset writing" in w for w in warnings)
    with pytest.raises(JobFailed, match="failed 3 times in a row .*ConnectionResetError"):
        lease.check()
    monkeypatch.undo()
    lease.release()
