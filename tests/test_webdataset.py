"""WebDataset tar shards in img2dataset's layout: train -> embed -> report on them, ingest, refusals.

The shards are real tar files built with `tarfile` as img2dataset writes them
(`000000012.jpg`, `000000012.json`, `000000012.txt`), with a sample whose image is not an
image and one that has no image member at all: both must keep their row, with a reason.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import (
    BAD_IMAGE_KEY,
    NO_IMAGE_KEY,
    kill_part_way,
    load_with_datasets,
    rows_written,
    write_tar_shards,
)

from pipeline import storage, tars
from pipeline.embed import EmbedConfig, embed
from pipeline.errors import InputError
from pipeline.ingest import ingest, read_rejects
from pipeline.latents import read_latents
from pipeline.shards import Columns, DuplicateIdError, ShardList, check_columns, check_unique_ids, fingerprint

REPO = Path(__file__).resolve().parents[1]
N = 48


@pytest.fixture(scope="module")
def tar_data(tmp_path_factory) -> tuple[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("wds") / "tars"
    return str(root), write_tar_shards(root, N, shards=2)


def _tar(path: Path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:cut] if cut else data)


# ---------------------------------------------------------------- no Ray: names, headers, refusals


def test_member_names_split_at_the_first_dot_of_the_file_name():
    assert tars.split_name("000010012.jpg") == ("000010012", "jpg")
    assert tars.split_name("a/b.c/000010012.seg.png") == ("a/b.c/000010012", "seg.png")
    assert tars.split_name("README") == (None, None)


def test_headers_give_rows_keys_and_json_ids(tar_data):
    url, samples = tar_data
    shards = ShardList.under(url)
    assert shards.format == "tar" and len(shards.files) == 2 and shards.rows == N
    keys = [key for index in shards.tar_index() for key in index.keys]
    assert keys == list(samples)
    assert [i for index in shards.tar_index("json:uid") for i in index.ids] == [s["uid"] for s in samples.values()]
    schema = check_columns(shards, Columns(tars.KEY_ID), ["txt", "json:width"])
    assert schema.names == [tars.KEY_ID, "image", "txt", "json:width"]
    check_unique_ids(shards, tars.KEY_ID)
    assert fingerprint(shards) == fingerprint(ShardList.under(url))


def test_a_sample_without_an_image_is_a_row_with_a_reason():
    samples = [tars.Sample("k1", {"jpg": b"x", "json": b'{"w": 3, "s": "a"}', "txt": b"cap"}),
               tars.Sample("k2", {"json": b"{}"}), tars.Sample("k3", {"webp": b"y", "png": b"z"})]
    table = tars.rows_table(samples, "json:s", "image", ["txt", "json:w", tars.KEY_ID])
    assert table.column("json:s").to_pylist() == ["a", None, None]
    assert table.column("image").to_pylist() == [b"x", None, b"z"]  # png before webp, as IMAGE_MEMBERS says
    assert table.column(tars.REASON_COLUMN).to_pylist() == [None, tars.NO_IMAGE, None]
    assert table.column("json:w").to_pylist() == ["3", None, None]  # non-string JSON values as their text
    assert table.column(tars.KEY_ID).to_pylist() == ["k1", "k2", "k3"]
    assert table.schema.field("txt").type == pa.string()


def test_bad_tar_shards_are_named_before_any_work(tmp_path):
    good = [("000000001.jpg", b"a"), ("000000001.json", b"{}"), ("000000002.jpg", b"b")]
    _tar(tmp_path / "cut" / "00000.tar", good)
    _tar(tmp_path / "cut" / "00001.tar", good, cut=1536)  # an upload cut short
    with pytest.raises(InputError, match=r"00001.tar is not a readable tar file"):
        ShardList.under(str(tmp_path / "cut")).rows
    _tar(tmp_path / "split" / "00000.tar", [("k1.jpg", b"a"), ("k2.jpg", b"b"), ("k1.json", b"{}")])
    with pytest.raises(InputError, match="'k1' are not next to each other"):
        ShardList.under(str(tmp_path / "split")).rows
    _tar(tmp_path / "twice" / "00000.tar", [("k1.jpg", b"a"), ("k1.jpg", b"b")])
    with pytest.raises(InputError, match="'k1.jpg' occurs twice"):
        ShardList.under(str(tmp_path / "twice")).rows
    _tar(tmp_path / "dup" / "00000.tar", good)
    _tar(tmp_path / "dup" / "00001.tar", good[2:])
    with pytest.raises(DuplicateIdError, match="'000000002'"):
        check_unique_ids(ShardList.under(str(tmp_path / "dup")), tars.KEY_ID)
    _tar(tmp_path / "mixed" / "00000.tar", good)
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), tmp_path / "mixed" / "part-0.parquet")
    with pytest.raises(InputError, match=r"mixes shard formats: 1 parquet \(part-0.parquet, ...\); 1 tar"):
        ShardList.under(str(tmp_path / "mixed"))


def test_ingest_converts_tar_shards_with_reasons(tar_data, tmp_path):
    url, samples = tar_data
    summary = ingest(url, str(tmp_path / "out"), use_ray=False, passthrough=("txt", "json:width"))
    assert summary["mode"] == "tar" and (summary["seen"], summary["rows"], summary["rejected"]) == (N, N - 2, 2)
    assert summary["rejects_by_reason"] == {"no image member": 1, "not an image": 1}
    rejects = {r["id"]: r["reason"] for r in read_rejects(str(tmp_path / "out")).to_pylist()}
    assert rejects == {NO_IMAGE_KEY: "no image member", BAD_IMAGE_KEY: "not an image"}
    table = pq.ParquetDataset(str(tmp_path / "out")).read()
    assert table.column_names == ["id", "image", "width", "height", "format", "source", "txt", "json:width"]
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == set(samples) - set(rejects)
    assert rows["000000006"]["format"] == "png" and rows["000000000"]["format"] == "jpeg"
    assert rows["000000000"]["txt"] == samples["000000000"]["caption"] and rows["000000000"]["json:width"] == "32"


# ---------------------------------------------------------------- Ray: the stages on tar shards


@pytest.mark.ray
def test_train_embed_report_on_tar_shards(ray_local, tar_data, tmp_path):
    from pipeline.model import AutoencoderConfig
    from pipeline.report import ReportConfig, report
    from pipeline.train import TrainConfig, train

    url, samples = tar_data
    trained = train(TrainConfig(data_url=url, out_url=str(tmp_path / "run"), epochs=1, val_fraction=0.25,
                                model=AutoencoderConfig(image_size=32, latent_dim=16, base_width=8)))
    assert trained.history[0]["decode_failures"] == 2  # the bad image and the sample without one
    cfg = EmbedConfig(data_url=url, model_url=trained.model_url, out_url=str(tmp_path / "latents"),
                      passthrough=("txt", "json:width"))
    summary = embed(cfg)
    assert (summary.rows_in, summary.rows_out, summary.error_rows) == (N, N, 2)
    assert summary.errors_by_reason == {"no image member": 1, "not an image": 1}
    rows = {r["id"]: r for r in read_latents(cfg.out_url).to_pylist()}
    assert sorted(rows) == list(samples)  # one row per key, ids byte-exact
    assert all(r[tars.KEY_ID] == i for i, r in rows.items())  # kept for Ray's write checkpoint
    assert rows[NO_IMAGE_KEY]["error"] == "no image member" and rows[NO_IMAGE_KEY]["latent"] is None
    assert rows[BAD_IMAGE_KEY]["error"] == "not an image"
    assert rows["000000001"]["txt"] == "image number 1" and rows["000000001"]["json:width"] == "32"

    out = tmp_path / "report"
    found = report(ReportConfig(latents_url=cfg.out_url, out_url=str(out), model_url=trained.model_url,
                                data_url=url, top_k=5, typical_k=2))
    assert [e["note"] for e in found["galleries"]["worst"]] == [None] * 5  # every image fetched from the tars
    assert found["counts"]["errors_by_reason"] == {"no image member": 1, "not an image": 1}
    top = load_with_datasets([out / "top_anomalies.parquet"], tmp_path / "hf-cache")
    assert top["id"] == [e["id"] for e in found["top_anomalies"]]
    assert all(image.size == (32, 32) for image in top["image"])  # PIL images: the originals


@pytest.mark.ray
def test_a_json_field_as_the_id(ray_local, tar_data, tiny_model, tmp_path):
    url, samples = tar_data
    cfg = EmbedConfig(data_url=url, model_url=tiny_model, out_url=str(tmp_path / "latents"), id_column="json:uid")
    assert embed(cfg).rows_out == N
    table = read_latents(cfg.out_url, columns=["id", "json:uid"])
    assert sorted(table.column("id").to_pylist()) == sorted(s["uid"] for s in samples.values())
    assert table.column("id").to_pylist() == table.column("json:uid").to_pylist()


@pytest.mark.ray
def test_tar_shards_on_s3(ray_local, s3_bucket, tar_data, tiny_model, tmp_path):
    from pipeline.report import ReportConfig, report

    url, samples = tar_data
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(url + "/", f"{s3_bucket[5:]}/tars/", recursive=True)
    data = f"{s3_bucket}/tars"
    cfg = EmbedConfig(data_url=data, model_url=tiny_model, out_url=f"{s3_bucket}/latents", passthrough=("txt",))
    summary = embed(cfg)
    assert (summary.rows_in, summary.rows_out, summary.error_rows) == (N, N, 2)
    assert sorted(read_latents(cfg.out_url, columns=["id"]).column("id").to_pylist()) == list(samples)
    found = report(ReportConfig(latents_url=cfg.out_url, out_url=f"{s3_bucket}/report", model_url=tiny_model,
                                data_url=data, top_k=3, typical_k=0))
    assert [e["note"] for e in found["galleries"]["worst"]] == [None] * 3
    ingested = ingest(data, f"{s3_bucket}/shards", use_ray=True)
    assert (ingested["rows"], ingested["rejected"]) == (N - 2, 2)


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
@pytest.mark.slow
def test_train_embed_killed_and_resumed_report_on_tar_shards(tmp_path):
    """The jobs as a user runs them: train, embed SIGKILLed part way and rerun, report."""
    n = 3000
    samples = write_tar_shards(tmp_path / "tars", n, shards=30, image_size=64)
    data, run, out = str(tmp_path / "tars"), str(tmp_path / "run"), tmp_path / "latents"
    env = {**os.environ, "RAY_ADDRESS": "local"}

    def job(*argv: str, timeout: int = 400) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    job("jobs.train", "--data", data, "--out", run, "--epochs", "1", "--image-size", "64", "--latent-dim", "16",
        "--base-width", "8")
    cmd = [sys.executable, "-m", "jobs.embed", "--data", data, "--model", f"{run}/model", "--out", str(out),
           "--batch-size", "50", "--rows-per-file", "50", "--actors", "1", "--passthrough", "txt"]

    before = kill_part_way(cmd, REPO, env, out, rows=1650)
    assert rows_written(out) >= 1500

    job(*cmd[2:])
    after = {f: pq.read_metadata(f).num_rows for f in storage.list_files(str(out))}
    new_rows = sum(rows for f, rows in after.items() if f not in before)
    assert new_rows < 0.6 * n, f"the rerun wrote {new_rows} rows: it redid finished work"
    table = read_latents(str(out), columns=["id", "error"])
    ids = table.column("id").to_pylist()
    assert len(ids) == n and sorted(ids) == list(samples)  # one row per key, never more
    errors = dict(zip(ids, table.column("error").to_pylist()))
    assert errors[NO_IMAGE_KEY] == "no image member" and errors[BAD_IMAGE_KEY] == "not an image"

    job("jobs.report", "--latents", str(out), "--out", str(tmp_path / "report"), "--model", f"{run}/model",
        "--data", data, "--top-k", "5")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"]["rows"] == n and summary["counts"]["error_rows"] == 2
    assert [e["note"] for e in summary["galleries"]["worst"]] == [None] * 5
