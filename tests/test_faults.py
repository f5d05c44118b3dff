"""Storage faults: against the real S3 API server, every stage through a proxy that throttles,
fails, resets and stalls a seeded share of requests (tests/faults.py) finishes exactly once; an
embed killed in the storm resumes exactly once; a request that fails on every attempt ends the
job naming its URL, nothing published as finished. A full disk ends embed with a clear error;
once space is freed the same command finishes exactly once. (Scenarios: fault_scenarios.py.)"""

from __future__ import annotations

import logging
import os
import subprocess

import fault_scenarios as scenarios
import pytest
from faults import FaultProxy, Storm

from pipeline import storage


def _exactly_once(row: dict) -> None:
    assert row["finished"] and row["rows_out"] == row["rows_in"], row
    assert row["duplicates"] == row["lost"] == row["unknown"] == 0, row


def test_a_failed_request_is_retried_and_logged_with_its_url(s3_bucket, monkeypatch, caplog):
    url = f"{s3_bucket}/records/one.json"
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], Storm(slowdown=1.0, max_in_a_row=2)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
            storage.write_text(url, "{}")
            assert storage.read_text(url) == "{}"
    retried = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert proxy.faults()["slowdown"] >= 4 and len(retried) == proxy.faults()["slowdown"]
    assert any("PUT" in m and "/records/one.json" in m and "503 SlowDown" in m for m in retried), retried


def test_a_request_that_fails_every_attempt_raises_naming_its_url(s3_bucket, monkeypatch):
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], fail_for_good=lambda method, path: method == "PUT") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(storage.StorageFailed, match=r"after 5 attempts: PUT http://\S+/records/two.json: 503"):
            storage.write_text(f"{s3_bucket}/records/two.json", "{}")
        # Asked while the proxy still runs (it fails PUTs only): AWS_ENDPOINT_URL names it until
        # the test ends, and a closed proxy refuses the connection (20 runs beside a CPU hog
        # failed so twice when this was asked after the block).
        assert not storage.exists(f"{s3_bucket}/records/two.json")
    assert proxy.faults()["for_good"] == storage.S3_ATTEMPTS


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_every_stage_finishes_exactly_once_through_a_storage_fault_storm(s3_bucket):
    rows = scenarios.storm_through_every_stage(s3_bucket, os.environ["AWS_ENDPOINT_URL"])
    faults = rows[0]["faults"]
    assert all(faults[kind] > 0 for kind in ("slowdown", "internal", "reset", "stall")), faults
    train, *others = rows
    assert train["finished"] and train["rows_seen"] == train["rows_in"], train
    for row in others:
        _exactly_once(row)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_an_embed_killed_in_a_fault_storm_resumes_exactly_once(s3_bucket, tmp_path):
    row = scenarios.killed_in_a_storm("embed", s3_bucket, os.environ["AWS_ENDPOINT_URL"], tmp_path)
    assert 300 <= row["rows_at_kill"] < row["rows_in"] and not row["finished_at_kill"], row
    assert row["faults_at_kill"]["slowdown"] + row["faults_at_kill"]["reset"] > 0, row
    _exactly_once(row)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_an_embed_whose_writes_fail_for_good_ends_naming_the_url_and_unfinished(s3_bucket, tmp_path):
    row = scenarios.failing_for_good(s3_bucket, os.environ["AWS_ENDPOINT_URL"], tmp_path)
    failure = row["after_failure"]
    assert failure["exit"] == 1 and not failure["traceback"] and not failure["finished"], failure
    bucket = s3_bucket.removeprefix("s3://")
    assert failure["error"].startswith("error: storage request failed after 5 attempts: PUT http://"), failure
    assert f"/{bucket}/latents/" in failure["error"] and ".parquet" in failure["error"], failure
    _exactly_once(row)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (the tests run as root, in CI too), unmounted in teardown."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_a_full_disk_ends_embed_with_a_clear_error_and_a_rerun_after_freeing_finishes_once(small_disk, tmp_path):
    row = scenarios.disk_full(small_disk, tmp_path)
    failure = row["after_failure"]
    assert failure["exit"] == 1 and not failure["traceback"] and not failure["finished"], failure
    assert failure["error"].startswith("error: no space left on the device"), failure
    _exactly_once(row)
