"""Synthetic corpus: deterministic bytes, labelled anomalies in the asked share, valid image shards."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import synth as synth_job
from pipeline import storage
from pipeline.images import decode_batch
from pipeline.shards import Columns, check_columns, find_duplicate_ids, image_bytes
from pipeline.synth import (
    ANOMALY_KINDS,
    SUMMARY_FILE,
    anomaly_plan,
    synthetic_image,
    write_synthetic_corpus,
)


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_gives_byte_identical_shards(tmp_path):
    write_synthetic_corpus(str(tmp_path / "a"), 60, image_size=32, anomaly_fraction=0.2, seed=7, rows_per_shard=25)
    write_synthetic_corpus(str(tmp_path / "b"), 60, image_size=32, anomaly_fraction=0.2, seed=7, rows_per_shard=25)
    write_synthetic_corpus(str(tmp_path / "c"), 60, image_size=32, anomaly_fraction=0.2, seed=8, rows_per_shard=25)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(a) == ["_synth_summary.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert a == b
    assert a["part-00000.parquet"] != c["part-00000.parquet"]


def test_images_do_not_depend_on_shard_size(tmp_path):
    write_synthetic_corpus(str(tmp_path / "small"), 30, image_size=32, seed=1, rows_per_shard=7)
    write_synthetic_corpus(str(tmp_path / "big"), 30, image_size=32, seed=1, rows_per_shard=100)
    small, big = pq.read_table(tmp_path / "small"), pq.read_table(tmp_path / "big")
    assert small.sort_by("id").equals(big.sort_by("id"))


@pytest.mark.parametrize("channels", [1, 3])
def test_corpus_is_valid_image_shards_with_labels(tmp_path, channels):
    url = str(tmp_path / "corpus")
    summary = write_synthetic_corpus(url, 100, image_size=32, anomaly_fraction=0.1, seed=0,
                                     rows_per_shard=40, channels=channels)
    schema = check_columns(url, Columns(), passthrough=["label", "anomaly_kind"])
    assert schema.field("label").type == pa.int64() and schema.field("anomaly_kind").type == pa.string()
    assert find_duplicate_ids(url, "id") == (0, [])
    table = pq.read_table(url)
    assert table.num_rows == 100 and summary["images"] == 100 and summary["anomalies"] == 10
    labels, kinds = table["label"].to_pylist(), table["anomaly_kind"].to_pylist()
    assert sum(labels) == 10
    assert all((kind == "") == (label == 0) for kind, label in zip(kinds, labels))
    assert sorted(k for k in kinds if k) == sorted(list(ANOMALY_KINDS) * 2)
    pixels, reasons = decode_batch(image_bytes(table["image"]), 32, channels)
    assert reasons == [None] * 100 and pixels.shape == (100, 32, 32, channels)
    assert pixels.std(axis=(1, 2, 3)).min() > 2  # structured images (at least the ripple), not flat fills
    saved = json.loads((tmp_path / "corpus" / SUMMARY_FILE).read_text())
    assert saved["anomalies_by_kind"] == {kind: 2 for kind in ANOMALY_KINDS}


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_anomaly_kind_changes_the_image(kind):
    normal = synthetic_image(3, seed=0, image_size=32, channels=3).astype(int)
    anomalous = synthetic_image(3, seed=0, image_size=32, channels=3, kind=kind).astype(int)
    changed = np.abs(anomalous - normal).max(axis=-1) > 30
    assert changed.sum() >= 8, f"{kind} changed only {changed.sum()} pixels"


def test_anomaly_plan_is_seeded_and_exact():
    plan = anomaly_plan(1000, 0.05, seed=3)
    assert plan == anomaly_plan(1000, 0.05, seed=3) != anomaly_plan(1000, 0.05, seed=4)
    assert len(plan) == 50 and all(0 <= i < 1000 for i in plan)
    assert anomaly_plan(10, 0.0, seed=0) == {}
    with pytest.raises(ValueError, match="anomaly_fraction"):
        anomaly_plan(10, 1.5, seed=0)


def test_rerun_with_fewer_shards_leaves_no_stale_shards(tmp_path):
    url = str(tmp_path / "corpus")
    write_synthetic_corpus(url, 50, image_size=16, rows_per_shard=10)
    (tmp_path / "corpus" / "notes.parquet").write_bytes(b"not ours")
    summary = write_synthetic_corpus(url, 50, image_size=16, rows_per_shard=25)
    assert summary["stale_shards_removed"] == [f"part-0000{i}.parquet" for i in (2, 3, 4)]
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == [
        "_synth_summary.json", "notes.parquet", "part-00000.parquet", "part-00001.parquet"]


def test_memory_url():
    url = "memory://synth-test/corpus"
    write_synthetic_corpus(url, 12, image_size=16, rows_per_shard=5)
    assert len(storage.list_files(url)) == 3
    storage.remove(url, recursive=True)


def test_job_cli(tmp_path, capsys):
    out = str(tmp_path / "job")
    assert synth_job.main(["--out", out, "--n", "20", "--image-size", "16", "--channels", "1", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert '"seed": 5' in printed.splitlines()[0]  # the config is logged first
    assert pq.read_table(out).num_rows == 20
    assert synth_job.parse_args(["--out", "x"]).n == 2000
    assert synth_job.main(["--out", out, "--n", "0"]) == 2


# sha256 of the pixels of images 0-2 of seed 7, at 32 px RGB and 64 px grey, per kind. A change
# to any kind's drawing changes every number measured on the synthetic corpus (the benches,
# the detection bounds in the tests): if one of these moves, that change was not meant.
GOLDEN_PIXELS = {
    "": "e52c0e1a82233d9d288ec8eb0227613016426d42ab24e4cefd10837e209b1a62",
    "scratch": "02e5d3354db2bf3a9d7ffaa455c8442db5762d5459605a60e43f54e83d56169a",
    "blot": "01831bbf9c07737e8b18d6bf5d1b81284d302a0c862f81f18643e710ac29dbae",
    "noise": "e541860131f525659e6651c8cc58be5d2d84f2e936d2a9f0c8272d16ff304a96",
    "colour_shift": "a6a8bc51f051e0d41684efdbca7065b6e6b7ce3bf3d6a130907b5c666dc957db",
    "foreign_object": "426bb95248e44b9ebe29261d3e8afd9108837bcb0a57d69d6331cda0836cdc5b",
}
GOLDEN_PLAN = "795b17e831ed94ffe1d29745d64ce57f7a3f28caef7d3b38523e08c1db3d07a7"  # anomaly_plan(200, 0.1, seed=7)


@pytest.mark.parametrize("kind", ["", *ANOMALY_KINDS])
def test_the_seeded_images_of_each_kind_are_pinned(kind):
    import hashlib

    digest = hashlib.sha256()
    for index in range(3):
        for size, channels in ((32, 3), (64, 1)):
            digest.update(synthetic_image(index, 7, size, channels, kind).tobytes())
    assert digest.hexdigest() == GOLDEN_PIXELS[kind]
    assert set(GOLDEN_PIXELS) == {"", *ANOMALY_KINDS}, "a new kind gets its own golden hash"
    plan = hashlib.sha256(repr(sorted(anomaly_plan(200, 0.1, seed=7).items())).encode()).hexdigest()
    assert plan == GOLDEN_PLAN
