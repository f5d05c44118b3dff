"""Ingest: folder trees and Parquet layouts -> normalised shards; rejects listed; reruns replace."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from pipeline import storage
from pipeline.images import encode_image
from pipeline.ingest import REJECTS_DIR, SUMMARY_FILE, ingest, read_rejects
from pipeline.shards import (
    ColumnError,
    DuplicateIdError,
    check_columns,
    image_bytes,
    write_shard,
)

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
BAD_FILES = {
    "bad/garbage.jpg": (b"this is not a jpeg", "not an image"),
    "good/empty.png": (b"", "empty bytes"),
    "good/truncated.png": (None, "truncated image"),  # filled in by _tree
}


def _pixels(i: int, height=6, width=9) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (height, width, 3), np.uint8)


def _tree(url: str) -> dict[str, np.ndarray]:
    """An image folder tree under `url` (any fsspec URL): returns {id: pixels} of the good PNGs."""
    good = {}
    for i, name in enumerate(["good/a.png", "good/b.png", "good/sub/c.png", "bad/d.png", "bad/e.png", "top.png"]):
        good[name] = _pixels(i, 6 + i, 9)
        storage.write_bytes(storage.join(url, name), encode_image(good[name]))
    storage.write_bytes(storage.join(url, "good/f.jpg"), encode_image(_pixels(9), "jpeg"))
    storage.write_bytes(storage.join(url, "good/g.webp"), encode_image(_pixels(10), "webp"))
    for name, (data, _) in BAD_FILES.items():
        truncated = encode_image(_pixels(3, 30, 30))[:300]  # cut inside the pixel data
        storage.write_bytes(storage.join(url, name), data if data is not None else truncated)
    storage.write_bytes(storage.join(url, "notes.txt"), b"not an image, not an image extension")
    storage.write_bytes(storage.join(url, ".hidden/h.png"), encode_image(_pixels(4)))
    return good


def _read(url: str) -> pa.Table:
    tables = []
    for shard in storage.list_files(url):
        fs, path = storage.arrow_filesystem(shard)
        tables.append(pq.read_table(path, filesystem=fs))
    return pa.concat_tables(tables).sort_by("id")


def _snapshot(path) -> dict[str, bytes]:
    """Every shard and rejects file under a local output, by relative name."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*.parquet"))}


def _check_folder_output(out: str, good: dict[str, np.ndarray], summary: dict) -> None:
    table = _read(out)
    ids = table["id"].to_pylist()
    assert ids == sorted([*good, "good/f.jpg", "good/g.webp"])
    for row in table.to_pylist():
        if row["id"] in good:  # PNG: the original bytes, so pixel-identical
            decoded = np.asarray(Image.open(io.BytesIO(row["image"])))
            np.testing.assert_array_equal(decoded, good[row["id"]])
            assert (row["width"], row["height"], row["format"]) == (9, good[row["id"]].shape[0], "png")
    assert dict(zip(ids, table["format"].to_pylist()))["good/f.jpg"] == "jpeg"
    rejects = read_rejects(out).sort_by("id").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == sorted((k, v[1]) for k, v in BAD_FILES.items())
    assert all(r["path"].endswith(r["id"]) for r in rejects)
    assert summary["seen"] == summary["rows"] + summary["rejected"] == len(ids) + len(BAD_FILES)
    assert summary["skipped_by_extension"] == {".txt": 1}
    assert summary["rejects_by_reason"] == {"empty bytes": 1, "not an image": 1, "truncated image": 1}
    saved = json.loads(storage.read_text(storage.join(out, SUMMARY_FILE)))
    assert saved["rows"] == summary["rows"] and saved["config"]["source_url"] == summary["source"]


def test_folder_round_trip_is_pixel_identical_and_rejects_are_listed(tmp_path):
    good = _tree(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    summary = ingest(str(tmp_path / "src"), out, use_ray=False, rows_per_shard=3)
    _check_folder_output(out, good, summary)
    assert summary["shards"] == [f"part-0000{i}.parquet" for i in range(4)]  # 11 files / 3, rejects included
    assert check_columns(out, ingest_job.IngestConfig("x", "y", use_ray=False).columns).field("width").type == pa.int32()
    assert (tmp_path / "out" / REJECTS_DIR).is_dir()
    assert all(not s.split("/")[-2].startswith("_") for s in storage.list_files(out))  # rejects are not shards


def test_rerun_is_idempotent_and_resizing_leaves_no_orphans(tmp_path):
    _tree(str(tmp_path / "src"))
    out = tmp_path / "out"
    first = ingest(str(tmp_path / "src"), str(out), use_ray=False, rows_per_shard=2)
    before = _snapshot(out)
    again = ingest(str(tmp_path / "src"), str(out), use_ray=False, rows_per_shard=2)
    assert _snapshot(out) == before and again["shards"] == first["shards"] and again["stale_removed"] == []
    assert len(first["shards"]) == 6 and len(first["rejects_files"]) == 3
    pq.write_table(pa.table({"note": ["someone else's file"]}), out / "user-notes.parquet")
    resized = ingest(str(tmp_path / "src"), str(out), use_ray=False, rows_per_shard=100)
    assert resized["shards"] == ["part-00000.parquet"]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet", "user-notes.parquet"]
    assert sorted(p.name for p in (out / REJECTS_DIR).glob("*.parquet")) == ["part-00000.parquet"]
    assert len(resized["stale_removed"]) == 5 + 3
    (out / "user-notes.parquet").unlink()
    assert _read(str(out))["id"].to_pylist() == _read_ids_from(before)


def _read_ids_from(snapshot: dict[str, bytes]) -> list[str]:
    shards = [pq.read_table(io.BytesIO(data)) for name, data in snapshot.items() if not name.startswith("_")]
    return sorted(pa.concat_tables(shards)["id"].to_pylist())


def test_mib_sizing_cuts_shards_by_image_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sizes = []
    for i in range(6):
        data = encode_image(_pixels(i, 40, 40))  # incompressible: ~4.8 KB each
        (src / f"{i}.png").write_bytes(data)
        sizes.append(len(data))
    limit_mib = 2.5 * max(sizes) / (1 << 20)  # two images fit, a third does not
    summary = ingest(str(src), str(tmp_path / "out"), use_ray=False, mib_per_shard=limit_mib)
    assert summary["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(tmp_path / "out" / s).num_rows for s in summary["shards"]] == [2, 2, 2]


def test_labels_from_folders(tmp_path):
    _tree(str(tmp_path / "src"))
    ingest(str(tmp_path / "src"), str(tmp_path / "names"), use_ray=False, labels_from_folders=True)
    names = dict(zip(*_read(str(tmp_path / "names")).select(["id", "label"]).to_pydict().values()))
    assert names["good/sub/c.png"] == "good" and names["bad/d.png"] == "bad" and names["top.png"] is None
    ingest(str(tmp_path / "src"), str(tmp_path / "binary"), use_ray=False, labels_from_folders=True, normal_label="good")
    table = _read(str(tmp_path / "binary"))
    rows = {r["id"]: (r["label"], r["anomaly_kind"]) for r in table.to_pylist()}
    assert rows["good/a.png"] == (0, "") and rows["bad/e.png"] == (1, "bad") and rows["top.png"] == (1, "")
    assert table.schema.field("label").type == pa.int64()


def _parquet_source(url: str, layout: str) -> list[bytes]:
    images = [encode_image(_pixels(i)) for i in range(5)]
    rows = [*images[:2], b"broken", None, *images[2:]]
    ids = [f"img-{i}" for i in range(len(rows))]
    if layout == "hf":
        column = pa.array([None if d is None else {"bytes": d, "path": f"{i}.png"} for i, d in zip(ids, rows)], HF_IMAGE)
        tables = [pa.table({"id": ids, "image": column, "label": [0, 1, 0, 1, 0, 1, 0], "caption": list("abcdefg")})]
    else:
        name_id, name_image = ("key", "jpg") if layout == "img2dataset" else ("id", "image")
        tables = [pa.table({name_id: ids[:4], name_image: rows[:4]}), pa.table({name_id: ids[4:], name_image: rows[4:]})]
    for number, table in enumerate(tables):
        write_shard(storage.join(url, f"shard-{number}.parquet"), table, image_column="image" if layout != "img2dataset" else "jpg")
    return images


@pytest.mark.parametrize("layout", ["binary", "hf", "img2dataset"])
def test_parquet_layouts_normalise(tmp_path, layout):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    images = _parquet_source(src, layout)
    options = {"id_column": "key", "image_column": "jpg"} if layout == "img2dataset" else {}
    if layout == "hf":
        options["passthrough"] = ("caption",)
    summary = ingest(src, out, use_ray=False, rows_per_shard=2, **options)
    table = _read(out)
    assert table["id"].to_pylist() == ["img-0", "img-1", "img-4", "img-5", "img-6"]
    assert image_bytes(table["image"]) == images
    assert table.column_names[:5] == ["id", "image", "width", "height", "format"]
    assert set(table["width"].to_pylist()) == {9} and set(table["format"].to_pylist()) == {"png"}
    if layout == "hf":
        assert table["label"].to_pylist() == [0, 1, 0, 1, 0] and table["caption"].to_pylist() == list("abefg")
        assert summary["shards"] == ["part-00000-0000.parquet", "part-00000-0001.parquet", "part-00000-0002.parquet"]
    else:
        assert "label" not in table.column_names
        assert summary["shards"] == ["part-00000-0000.parquet", "part-00001-0000.parquet", "part-00001-0001.parquet"]
    rejects = read_rejects(out).sort_by("id").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [("img-2", "not an image"), ("img-3", "missing image")]
    assert rejects[0]["path"].endswith("#2")
    assert summary["seen"] == 7 and summary["rows"] == 5


def test_parquet_input_is_checked_before_any_work(tmp_path):
    src, out = str(tmp_path / "src"), tmp_path / "out"
    _parquet_source(src, "img2dataset")
    with pytest.raises(ColumnError, match="columns found: key, jpg"):
        ingest(src, str(out), use_ray=False)
    assert not out.exists()
    write_shard(storage.join(src, "shard-9.parquet"), pa.table({"key": ["img-0"], "jpg": [b"x"]}), image_column="jpg")
    with pytest.raises(DuplicateIdError, match="'img-0'"):
        ingest(src, str(out), use_ray=False, id_column="key", image_column="jpg")
    assert not out.exists()


def test_memory_urls_without_ray():
    src, out = "memory://ingest-test/src", "memory://ingest-test/out"
    good = _tree(src)
    summary = ingest(src, out, use_ray=False)
    _check_folder_output(out, good, summary)
    with pytest.raises(ValueError, match="memory://.*use_ray=False"):
        ingest(src, out)
    storage.remove("memory://ingest-test", recursive=True)


def test_s3_without_ray(s3_bucket):
    src, out = f"{s3_bucket}/src", f"{s3_bucket}/out"
    good = _tree(src)
    summary = ingest(src, out, use_ray=False, rows_per_shard=4)
    _check_folder_output(out, good, summary)
    again = ingest(src, out, use_ray=False, rows_per_shard=100)
    assert again["shards"] == ["part-00000.parquet"] and len(storage.list_files(out)) == 1


def test_job_cli_without_ray(tmp_path, capsys):
    _parquet_source(str(tmp_path / "src"), "img2dataset")
    argv = ["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-ray"]
    assert ingest_job.main(argv) == 2
    assert "columns found: key, jpg" in capsys.readouterr().err
    assert ingest_job.main([*argv, "--id-column", "key", "--image-column", "jpg", "--passthrough", ""]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ingest config:") and json.loads(lines[-1])["rows"] == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"nope")
    assert ingest_job.main(["--source", str(empty), "--out", str(tmp_path / "o2"), "--no-ray"]) == 1
    config = ingest_job.parse_args(["--source", "a", "--out", "b", "--extensions", "png,JPG", "--mib-per-shard", "0"])
    assert config.extensions == (".png", ".jpg") and config.mib_per_shard is None and config.use_ray


@pytest.mark.ray
def test_ray_path_writes_the_same_bytes_as_the_local_path(ray_local, tmp_path):
    _tree(str(tmp_path / "src"))
    local = ingest(str(tmp_path / "src"), str(tmp_path / "local"), use_ray=False, rows_per_shard=3)
    distributed = ingest(str(tmp_path / "src"), str(tmp_path / "ray"), use_ray=True, rows_per_shard=3)
    assert _snapshot(tmp_path / "ray") == _snapshot(tmp_path / "local")
    assert {k: v for k, v in distributed.items() if k not in ("seconds", "out", "config")} == {
        k: v for k, v in local.items() if k not in ("seconds", "out", "config")}
    _parquet_source(str(tmp_path / "pq"), "hf")
    a = ingest(str(tmp_path / "pq"), str(tmp_path / "pq-local"), use_ray=False, rows_per_shard=2)
    b = ingest(str(tmp_path / "pq"), str(tmp_path / "pq-ray"), rows_per_shard=2)
    assert a["shards"] == b["shards"] and _snapshot(tmp_path / "pq-local") == _snapshot(tmp_path / "pq-ray")


@pytest.mark.ray
def test_ray_path_on_s3(ray_local, s3_bucket):
    src, out = f"{s3_bucket}/src", f"{s3_bucket}/out"
    good = _tree(src)
    summary = ingest(src, out, rows_per_shard=4)
    _check_folder_output(out, good, summary)
    assert summary["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    rerun = ingest(src, out, rows_per_shard=100)
    assert rerun["stale_removed"] == [
        "part-00001.parquet", "part-00002.parquet", f"{REJECTS_DIR}/part-00001.parquet", f"{REJECTS_DIR}/part-00002.parquet"]
    assert len(storage.list_files(out)) == 1


@pytest.mark.ray
def test_job_cli_with_ray(ray_local, tmp_path, capsys):
    _tree(str(tmp_path / "src"))
    assert ingest_job.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--labels-from-folders"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rows"] == 8


def test_parquet_input_is_cut_by_mib_and_pixel_cap_rejects(tmp_path):
    images = [encode_image(_pixels(i, 40, 40)) for i in range(6)]
    images.append(encode_image(_pixels(7, 50, 50)))  # 2,500 pixels: over the cap below
    write_shard(str(tmp_path / "src" / "one.parquet"), pa.table({"id": [f"i{i}" for i in range(7)], "image": images}))
    limit_mib = 2.5 * max(map(len, images[:6])) / (1 << 20)
    summary = ingest(str(tmp_path / "src"), str(tmp_path / "out"), use_ray=False, mib_per_shard=limit_mib,
                     max_pixels=2_000)
    assert [pq.read_metadata(tmp_path / "out" / s).num_rows for s in summary["shards"]] == [2, 2, 2]
    assert read_rejects(str(tmp_path / "out")).to_pylist() == [
        {"path": f"{tmp_path / 'src' / 'one.parquet'}#6", "id": "i6", "reason": "too many pixels (50 x 50 > 2000)"}]
