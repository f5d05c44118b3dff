"""Nothing lost, nothing half-read: byte-exact ids through every stage, unfinished latents
refused (or reported as partial), outputs kept apart from inputs, one job per output folder,
and an embed job killed three times that still ends with exactly one row per id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import kill_part_way, make_tiny_model

from jobs import decode as decode_job
from jobs import report as report_job
from pipeline import storage
from pipeline.decode import DecodeConfig, decode
from pipeline.embed import EmbedConfig, embed
from pipeline.images import encode_image
from pipeline.ingest import ingest
from pipeline.latents import SUCCESS_FILE, read_latents
from pipeline.model import AutoencoderConfig
from pipeline.report import ReportConfig, report
from pipeline.sampling import split_of
from pipeline.shards import ShardList, write_shard
from pipeline.synth import synthetic_image, write_synthetic_corpus
from pipeline.train import METRICS_FILE, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
HOSTILE_IDS = ["null\x00byte", "trailing-nul\x00", " leading space", "trailing space ", "e\u0301 combining",
               "\u202eright-to-left mark", "x" * 1024, "../../etc/passwd", "..\\windows\\path", "tab\tand\nnewline"]


def _bytes(ids) -> set[bytes]:
    return {i.encode("utf-8") for i in ids}


@pytest.mark.ray
def test_hostile_ids_come_out_of_every_stage_byte_identical(ray_local, tmp_path):
    ids = [*HOSTILE_IDS, *(f"plain-{i:03d}" for i in range(30))]
    source = tmp_path / "source"
    images = [encode_image(synthetic_image(i, 4, 32, 3)) for i in range(len(ids))]
    write_shard(str(source / "part-00000.parquet"), pa.table({"id": pa.array(ids, pa.string()),
                                                              "image": pa.array(images, pa.binary())}))
    shards = str(tmp_path / "shards")
    ingest(str(source), shards, use_ray=False)
    assert _bytes(pq.ParquetDataset(shards).read(columns=["id"]).column("id").to_pylist()) == _bytes(ids)

    run = str(tmp_path / "run")
    train(TrainConfig(data_url=shards, out_url=run, epochs=1, batch_size=8, val_fraction=0.25,
                      model=AutoencoderConfig(image_size=32, latent_dim=16, base_width=8)))
    metrics = json.loads(storage.read_text(storage.join(run, METRICS_FILE)).splitlines()[-1])
    assert metrics["val_images"] == int(split_of(ids, 0.25).sum()), "the split hashed the exact ids"

    latents = str(tmp_path / "latents")
    embed(EmbedConfig(data_url=shards, model_url=f"{run}/model", out_url=latents))
    assert _bytes(read_latents(latents, columns=["id"]).column("id").to_pylist()) == _bytes(ids)

    out = str(tmp_path / "report")
    summary = report(ReportConfig(latents_url=latents, out_url=out, model_url=f"{run}/model", data_url=shards,
                                  top_k=len(ids), typical_k=0))
    assert _bytes(r["id"] for r in summary["top_anomalies"]) == _bytes(ids)
    assert _bytes(pq.read_table(f"{out}/top_anomalies.parquet").column("id").to_pylist()) == _bytes(ids)
    worst = summary["galleries"]["worst"]
    assert _bytes(r["id"] for r in worst) == _bytes(ids) and all(r["images"] for r in worst), \
        "every gallery image was found in --data by its exact id"

    decoded = str(tmp_path / "decoded")
    decode(DecodeConfig(latents_url=latents, model_url=f"{run}/model", out_url=decoded))
    assert _bytes(pq.ParquetDataset(decoded).read(columns=["id"]).column("id").to_pylist()) == _bytes(ids)
    picked = decode(DecodeConfig(latents_url=latents, model_url=f"{run}/model", out_url=decoded,
                                 ids=tuple(HOSTILE_IDS[:3])))
    assert picked.written == 3


def test_listing_a_folder_skips_the_outputs_inside_it(tmp_path):
    data = tmp_path / "data"
    write_synthetic_corpus(str(data), n=20, image_size=16, rows_per_shard=10)
    (data / "latents").mkdir()
    pq.write_table(pa.table({"id": ["a"], "mse": [0.1]}), data / "latents" / "part-0.parquet")
    (data / "latents" / "_embed.json").write_text("{}")
    (data / "report").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), data / "report" / "top_anomalies.parquet")
    (data / "report" / "_report.json").write_text("{}")
    listed = ShardList.under(str(data)).files
    assert len(listed) == 2 and all(Path(f).parent == data for f in listed)
    assert storage.list_files(str(data / "latents")) == [str(data / "latents" / "part-0.parquet")]


def _embed_cmd(data: str, model: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.embed", "--data", data, "--model", model, "--out", str(out),
            "--batch-size", "50", "--rows-per-file", "50", "--actors", "1"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_double_submit_ends_with_one_row_per_id(tmp_path):
    data = str(tmp_path / "shards")
    # Enough rows that the first job still holds its lease when the second has imported and
    # checked it, on a loaded machine too: with 1,200 the first could finish in that time.
    write_synthetic_corpus(data, n=6000, image_size=32, rows_per_shard=500)
    model = make_tiny_model(str(tmp_path / "model"))
    out = tmp_path / "latents"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    first = subprocess.Popen(_embed_cmd(data, model, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "_embed.json").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # the same command again, a second later
    second = subprocess.run(_embed_cmd(data, model, out), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    first_out, first_err = first.communicate(timeout=400)
    assert first.returncode == 0, first_out[-2000:] + first_err[-2000:]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert "is in use by another embed job" in second.stderr and "pid" in second.stderr
    ids = read_latents(str(out), columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 6000


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
@pytest.mark.slow
def test_killed_three_times_then_finished_exactly_once_and_refused_while_unfinished(tmp_path, capsys):
    data = str(tmp_path / "shards")
    write_synthetic_corpus(data, n=3000, image_size=64, rows_per_shard=100)
    model = make_tiny_model(str(tmp_path / "model"), image_size=64)
    out = tmp_path / "latents"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    for kill_at in (300, 1100, 2000):  # rows written when each run dies
        kill_part_way(_embed_cmd(data, model, out), REPO, env, out, rows=kill_at)
        assert not (out / SUCCESS_FILE).exists()

    # An unfinished latent dataset: the report and decode refuse it, saying how much is there
    # and how to finish it; with --allow-partial the report says "partial" at the top.
    rows_there = len(read_latents(str(out), columns=["id"]))
    report_out = tmp_path / "report"
    assert report_job.main(["--latents", str(out), "--out", str(report_out)]) == 2
    err = capsys.readouterr().err
    assert f"{rows_there:,} of its 3,000 rows are there" in err and "python -m jobs.embed --data" in err
    assert decode_job.main(["--latents", str(out), "--model", model, "--out", str(tmp_path / "d")]) == 2
    assert "not finished" in capsys.readouterr().err
    assert report_job.main(["--latents", str(out), "--out", str(report_out), "--allow-partial",
                            "--threshold", "contamination:0.05"]) == 0
    summary = json.loads((report_out / "summary.json").read_text())
    assert summary["partial"].startswith(f"partial: {rows_there:,} of 3,000 rows")
    assert summary["counts"]["rows"] == rows_there
    assert "partial: " in (report_out / "index.html").read_text()

    finish = subprocess.run(_embed_cmd(data, model, out), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=400)
    assert finish.returncode == 0, finish.stdout[-3000:] + finish.stderr[-3000:]
    ids = read_latents(str(out), columns=["id"]).column("id").to_pylist()
    expected = pq.ParquetDataset(data).read(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 3000 and set(ids) == set(expected)
    assert (out / SUCCESS_FILE).exists()
    assert report_job.main(["--latents", str(out), "--out", str(report_out), "--threshold", "contamination:0.05"]) == 0
    assert json.loads((report_out / "summary.json").read_text())["partial"] is None
    assert np.isfinite(read_latents(str(out), columns=["mse"]).column("mse").to_numpy()).all()
