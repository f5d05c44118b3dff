"""One job at a time per output folder: the lease, locally and on a real S3 API."""

from __future__ import annotations

import json
import socket
import threading
import time

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


def test_the_heartbeat_keeps_a_long_job_holding_the_folder(folder):
    lease = Lease.acquire(folder, "long job", heartbeat_seconds=0.2)
    time.sleep(1.5)
    with pytest.raises(LeaseHeld, match="long job"):
        Lease.acquire(folder, "impatient job", stale_seconds=1.0)  # older than 1 s but for the heartbeat
    lease.check()
    lease.release()
    lease.release()  # idempotent
    history = storage.list_files(storage.join(folder, LEASE_DIR), suffix=".json")
    assert len(history) <= 2, "older records are cleaned up as generations pass"
