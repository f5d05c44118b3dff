"""Storage faults against the real S3 API server: every stage through a proxy that throttles,
fails, resets and stalls a seeded share of requests (tests/faults.py) finishes exactly once;
an embed job killed in the storm resumes exactly once; a request that fails on every attempt
ends the job naming its URL, with nothing published as finished."""

from __future__ import annotations

import logging
import subprocess

import pyarrow.parquet as pq
import pytest
from builders import kill_part_way, make_tiny_model, rows_written
from faults import REPO, FaultProxy, Storm, embed_command, ids_of, job_env, run_stages, stage_outputs

from pipeline import storage
from pipeline.synth import write_synthetic_corpus


def _shard_ids(data: str) -> list[str]:
    fs, files = storage.arrow_files(data)
    return [i for f in files for i in pq.read_table(f, filesystem=fs, columns=["id"]).column("id").to_pylist()]


def test_a_failed_request_is_retried_and_logged_with_its_url(s3_bucket, monkeypatch, caplog):
    url = f"{s3_bucket}/records/one.json"
    with FaultProxy(storage.os.environ["AWS_ENDPOINT_URL"], Storm(slowdown=1.0, max_in_a_row=2)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
            storage.write_text(url, "{}")
            assert storage.read_text(url) == "{}"
    retried = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert proxy.faults()["slowdown"] >= 4 and len(retried) == proxy.faults()["slowdown"]
    assert any("PUT" in m and "/records/one.json" in m and "503 SlowDown" in m for m in retried), retried


def test_a_request_that_fails_every_attempt_raises_naming_its_url(s3_bucket, monkeypatch):
    with FaultProxy(storage.os.environ["AWS_ENDPOINT_URL"], fail_for_good=lambda method, path: method == "PUT") \
            as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(storage.StorageFailed, match=r"after 5 attempts: PUT http://\S+/records/two.json: 503"):
            storage.write_text(f"{s3_bucket}/records/two.json", "{}")
    assert proxy.faults()["for_good"] == storage.S3_ATTEMPTS
    assert not storage.exists(f"{s3_bucket}/records/two.json")


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_every_stage_finishes_exactly_once_through_a_storage_fault_storm(s3_bucket):
    data = f"{s3_bucket}/shards"
    write_synthetic_corpus(data, n=240, image_size=32, rows_per_shard=80)
    ids = _shard_ids(data)
    with FaultProxy(storage.os.environ["AWS_ENDPOINT_URL"], Storm(seed=26)) as proxy:
        done = run_stages(f"{s3_bucket}/out", data, proxy.url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    faults = proxy.faults()
    assert all(faults[kind] > 0 for kind in ("slowdown", "internal", "reset", "stall")), faults
    outputs = stage_outputs(f"{s3_bucket}/out")
    assert all(out["finished"] for out in outputs.values()), outputs
    for stage in ("embed", "neighbours", "decode", "report"):
        got = outputs[stage]["ids"]
        assert len(got) == len(set(got)) and set(got) == set(ids), stage


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_an_embed_killed_in_a_fault_storm_resumes_exactly_once(s3_bucket, tmp_path):
    data = f"{s3_bucket}/shards"
    write_synthetic_corpus(data, n=1000, image_size=32, rows_per_shard=100)
    model = make_tiny_model(str(tmp_path / "model"))
    out = f"{s3_bucket}/latents"
    with FaultProxy(storage.os.environ["AWS_ENDPOINT_URL"], Storm(seed=7)) as proxy:
        kill_part_way(embed_command(data, model, out), REPO, job_env(proxy.url), out, rows=300, prefix="part-")
        assert 300 <= rows_written(out, "part-") < 1000
        assert not storage.exists(f"{out}/_SUCCESS.json")
        killed_in = dict(proxy.faults())
        finish = subprocess.run(embed_command(data, model, out), cwd=REPO, env=job_env(proxy.url),
                                capture_output=True, text=True, timeout=400)
    assert finish.returncode == 0, finish.stdout[-3000:] + finish.stderr[-3000:]
    assert killed_in["requests"] < proxy.faults()["requests"] and sum(killed_in[k] for k in ("slowdown", "reset")) > 0
    got = ids_of(out)
    assert len(got) == len(set(got)) == 1000 and set(got) == set(_shard_ids(data))
    assert storage.exists(f"{out}/_SUCCESS.json")


@pytest.mark.faults
@pytest.mark.timeout(400)
def test_an_embed_whose_writes_fail_for_good_ends_naming_the_url_and_unfinished(s3_bucket, tmp_path):
    data = f"{s3_bucket}/shards"
    write_synthetic_corpus(data, n=200, image_size=32, rows_per_shard=100)
    model = make_tiny_model(str(tmp_path / "model"))
    out = f"{s3_bucket}/latents"
    bucket = s3_bucket.removeprefix("s3://")
    with FaultProxy(storage.os.environ["AWS_ENDPOINT_URL"],
                    fail_for_good=lambda method, path: method == "PUT" and path.startswith(f"/{bucket}/latents/part-")) \
            as proxy:
        failed = subprocess.run(embed_command(data, model, out), cwd=REPO, env=job_env(proxy.url),
                                capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: storage request failed after 5 attempts: PUT http://"), failed.stderr[-3000:]
    assert f"/{bucket}/latents/part-" in error and "Traceback" not in failed.stderr
    assert not storage.exists(f"{out}/_SUCCESS.json") and rows_written(out, "part-") == 0
