"""Image shard layouts: reading image bytes from every column form, and footer-only checks."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.errors import InputError
from pipeline.images import decode_batch, encode_image
from pipeline.shards import (
    IMG2DATASET,
    ColumnError,
    Columns,
    DuplicateIdError,
    check_columns,
    check_unique_ids,
    find_duplicate_ids,
    fingerprint,
    image_bytes,
    write_shard,
)

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _pixels(i: int) -> np.ndarray:
    return np.full((8, 8, 3), (i * 40) % 256, np.uint8)


def _shards(url: str, layout: str, ids_per_shard=(("a", "b"), ("c", "d"))) -> list[bytes]:
    """Write one shard per id group in `layout`; returns all image bytes in order."""
    everything = []
    for number, ids in enumerate(ids_per_shard):
        images = [encode_image(_pixels(len(everything) + k)) for k in range(len(ids))]
        everything.extend(images)
        if layout == "binary":
            table = pa.table({"id": list(ids), "image": images, "label": [0] * len(ids)})
        elif layout == "hf":
            structs = [{"bytes": data, "path": f"{i}.png"} for i, data in zip(ids, images)]
            table = pa.table({"id": list(ids), "image": pa.array(structs, HF_IMAGE), "label": [0] * len(ids)})
        else:  # img2dataset
            table = pa.table({"key": list(ids), "jpg": images, "caption": ["x"] * len(ids)})
        write_shard(storage.join(url, f"part-{number:05d}.parquet"), table)
    return everything


@pytest.mark.parametrize("binary_type", [pa.binary(), pa.large_binary(), pa.binary_view()])
def test_image_bytes_from_binary_columns(binary_type):
    column = pa.array([b"one", None, b"three"], binary_type)
    assert image_bytes(column) == [b"one", None, b"three"]
    assert image_bytes(pa.chunked_array([column, column])) == [b"one", None, b"three"] * 2


def test_image_bytes_from_hugging_face_struct_keeps_struct_nulls():
    column = pa.array([{"bytes": b"x", "path": "x.png"}, None, {"bytes": None, "path": "y.png"}], HF_IMAGE)
    assert image_bytes(column) == [b"x", None, None]


def test_image_bytes_from_numpy_object_arrays():
    plain = np.array([b"x", None, b"z"], dtype=object)
    structs = np.array([{"bytes": b"x", "path": "p"}, None, {"bytes": None, "path": "q"}], dtype=object)
    assert image_bytes(plain) == [b"x", None, b"z"]
    assert image_bytes(structs) == [b"x", None, None]
    with pytest.raises(TypeError, match="int"):
        image_bytes(np.array([1, 2], dtype=object))
    with pytest.raises(TypeError, match="string"):
        image_bytes(pa.array(["not", "bytes"]))


@pytest.mark.parametrize("layout", ["binary", "hf", "img2dataset"])
def test_each_layout_reads_and_decodes(tmp_path, layout):
    url = str(tmp_path / "shards")
    written = _shards(url, layout)
    columns = IMG2DATASET if layout == "img2dataset" else Columns()
    schema = check_columns(url, columns, passthrough=["caption"] if layout == "img2dataset" else ["label"])
    assert columns.image in schema.names
    table = pq.read_table(url)
    assert image_bytes(table[columns.image]) == written
    batch, reasons = decode_batch(image_bytes(table[columns.image]), 8, 3)
    assert reasons == [None] * 4
    np.testing.assert_array_equal(batch[3], _pixels(3))


def test_missing_column_lists_the_columns_found(tmp_path):
    url = str(tmp_path / "shards")
    _shards(url, "img2dataset")
    with pytest.raises(ColumnError) as caught:
        check_columns(url, Columns())
    message = str(caught.value)
    assert "'id' (id column)" in message and "'image' (image column)" in message
    assert "columns found: key, jpg, caption" in message
    with pytest.raises(ColumnError, match="'label' \\(passthrough column\\)"):
        check_columns(url, IMG2DATASET, passthrough=["label"])


def test_missing_column_in_one_shard_of_many_is_named(tmp_path):
    url = str(tmp_path / "shards")
    _shards(url, "binary")
    write_shard(storage.join(url, "part-00002.parquet"), pa.table({"id": ["e"], "picture": [b"x"]}))
    with pytest.raises(ColumnError, match="part-00002.parquet has no 'image'.*columns found: id, picture"):
        check_columns(url, Columns())


def test_image_column_of_wrong_type_is_refused(tmp_path):
    url = str(tmp_path / "shards")
    write_shard(storage.join(url, "part-00000.parquet"), pa.table({"id": ["a"], "image": ["a path, not bytes"]}))
    with pytest.raises(ColumnError, match="has type string"):
        check_columns(url, Columns())


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no Parquet shards"):
        check_columns(str(tmp_path), Columns())


def test_duplicate_ids_across_shards_with_examples(tmp_path):
    url = str(tmp_path / "shards")
    _shards(url, "binary", ids_per_shard=(("a", "b", "c"), ("c", "d", "a"), ("a", "e")))
    assert find_duplicate_ids(url, "id") == (2, ["a", "c"])
    assert find_duplicate_ids(url, "id", max_examples=1) == (2, ["a"])
    with pytest.raises(DuplicateIdError, match="2 ids occur more than once.*'a', 'c'"):
        check_unique_ids(url, "id")


def test_unique_ids_pass(tmp_path):
    url = str(tmp_path / "shards")
    _shards(url, "img2dataset")
    assert find_duplicate_ids(url, "key") == (0, [])
    check_unique_ids(url, "key")


def test_fingerprint_is_stable_location_free_and_sensitive(tmp_path):
    first, copy = str(tmp_path / "first"), str(tmp_path / "copy")
    _shards(first, "binary")
    _shards(copy, "binary")
    assert fingerprint(first) == fingerprint(first) == fingerprint(copy)
    assert len(fingerprint(first)) == 16
    write_shard(storage.join(copy, "part-00001.parquet"), pa.table({"id": ["c"], "image": [b"x"], "label": [0]}))
    assert fingerprint(copy) != fingerprint(first)


def test_checks_work_on_s3(s3_bucket, tmp_path):
    url = f"{s3_bucket}/corpus"
    _shards(url, "hf", ids_per_shard=(("a", "b"), ("b", "c")))
    local = str(tmp_path / "local")
    _shards(local, "hf", ids_per_shard=(("a", "b"), ("b", "c")))
    assert "image" in check_columns(url, Columns()).names
    assert find_duplicate_ids(url, "id") == (1, ["b"])
    assert fingerprint(url) == fingerprint(local)


def test_checks_work_on_memory_urls():
    url = "memory://test-shards/corpus"
    _shards(url, "binary")
    assert check_columns(url, Columns()).field("image").type == pa.binary()
    assert find_duplicate_ids(url, "id") == (0, [])
    storage.remove(url, recursive=True)


@pytest.mark.ray
def test_ray_data_numpy_batches_of_each_layout(ray_local, tmp_path):
    """What Ray Data's numpy batch format hands a mapper is read by image_bytes too."""
    for layout in ("binary", "hf"):
        url = str(tmp_path / layout)
        written = _shards(url, layout)
        fs, path = storage.arrow_filesystem(url)
        batch = ray_local.data.read_parquet(path, filesystem=fs).take_batch(10, batch_format="numpy")
        order = np.argsort(batch["id"])
        assert [image_bytes(batch["image"])[i] for i in order] == written


def _blob_shards(url: str, rows: tuple[int, ...], blob_bytes: int) -> list[list[str]]:
    """Shards of {id, image, blob} (`blob`: a column the readers below never ask for), one per count in
    `rows` (0: a file with no rows); the ids of each, in file order."""
    ids, rng = [], np.random.default_rng(0)  # random blobs: no encoding makes them small
    for number, n in enumerate(rows):
        shard_ids = [f"s{number}-{i:03d}" for i in range(n)]
        table = pa.table({"id": pa.array(shard_ids, pa.string()),
                          "image": pa.array([encode_image(_pixels(i)) for i in range(n)], pa.binary()),
                          "blob": pa.array([rng.bytes(blob_bytes) for _ in range(n)], pa.binary())})
        write_shard(storage.join(url, f"part-{number:05d}.parquet"), table)
        ids.append(shard_ids)
    return ids


@pytest.mark.ray
def test_read_parquet_gives_the_named_columns_of_every_row_once_with_their_file(ray_local, tmp_path):
    from pipeline.datasets import PATH_COLUMN, read_parquet

    url = str(tmp_path / "shards")
    ids = _blob_shards(url, (7, 0, 12), blob_bytes=10)
    fs, root = storage.arrow_filesystem(url)
    paths = [f"{root}/part-{number:05d}.parquet" for number in range(3)]
    ds = read_parquet(paths, fs, ["id", "image"], include_paths=True, override_num_blocks=3)
    rows = ds.take_all()
    assert set(rows[0]) == {"id", "image", PATH_COLUMN}  # blob was never read
    by_file = {path: [row["id"] for row in rows if row[PATH_COLUMN] == path] for path in paths}
    assert [sorted(by_file[path]) for path in paths] == ids
    assert sorted(row["id"] for row in rows) == sorted(sum(ids, []))
    first = next(row for row in rows if row["id"] == "s2-005")
    assert first["image"] == encode_image(_pixels(5))


@pytest.mark.ray
def test_parquet_blocks_keep_file_order_and_stay_within_the_target_block_size(ray_local, tmp_path):
    """Block rows come from the footer's sizes of the columns read (not the big column left unread),
    within the DataContext's target block size when the reader was made; a file with no rows gives
    one empty block of the columns asked for."""
    import ray.data

    from pipeline.formats.sources import PARQUET_BATCH_ROWS, ParquetColumns

    url = str(tmp_path / "shards")
    ids = _blob_shards(url, (300, 0), blob_bytes=4096)
    fs, root = storage.arrow_filesystem(url)
    full, empty = (f"{root}/part-{number:05d}.parquet" for number in range(2))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    try:
        ctx.target_max_block_size = 64 * 1024  # about 16 rows with the blob, hundreds without
        small = ParquetColumns([full, empty], columns=["id", "image"], filesystem=fs)
        with_blob = ParquetColumns([full, empty], columns=["id", "blob"], filesystem=fs)
    finally:
        ctx.target_max_block_size = saved

    def blocks(source: ParquetColumns, path: str) -> list[pa.Table]:
        with fs.open_input_file(path) as f:
            return list(source._read_stream(f, path))

    whole = blocks(small, full)
    assert len(whole) == 1 and whole[0].num_rows == 300 <= PARQUET_BATCH_ROWS
    assert whole[0].column_names == ["id", "image"]
    parts = blocks(with_blob, full)
    assert len(parts) > 10 and all(0 < t.num_rows <= 16 for t in parts)
    assert sum((t.column("id").to_pylist() for t in parts), []) == ids[0]  # file order
    (nothing,) = blocks(with_blob, empty)
    assert nothing.num_rows == 0 and nothing.column_names == ["id", "blob"]
