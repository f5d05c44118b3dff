"""Hugging Face Parquet without an id column: the error names what could serve, and the two
derived ids (`image.path`, `@row`) run train -> embed with the same ids on every run.

The shards are written by the `datasets` library itself (an Image feature), as a Hub export is.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline.embed import EmbedConfig, embed
from pipeline.images import encode_image
from pipeline.ingest import ingest
from pipeline.latents import SUCCESS_FILE, read_latents
from pipeline.shards import ROW_ID, ColumnError, Columns, DuplicateIdError, ShardList, check_columns, check_unique_ids
from pipeline.synth import synthetic_image

ROWS_PER_SHARD = 20
NAMES = ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet")


def write_hub_export(root, paths=None) -> list[str]:
    """Two shards as `datasets` writes them: image (Image feature), name (unique), caption, label."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string"),
                                  "caption": datasets.Value("string"), "label": datasets.Value("int64")})
    every = []
    for shard, file_name in enumerate(NAMES):
        rows = range(shard * ROWS_PER_SHARD, (shard + 1) * ROWS_PER_SHARD)
        images = [{"bytes": encode_image(synthetic_image(i, 1, 32, 3)),
                   "path": paths[i] if paths else f"photos/img_{i:03d}.png"} for i in rows]
        every += [image["path"] for image in images]
        datasets.Dataset.from_dict(
            {"image": images, "name": [f"n{i}" for i in rows], "caption": ["a photo"] * len(rows),
             "label": [int(i % 10 == 0) for i in rows]}, features=features).to_parquet(str(root / file_name))
    return every


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("hub") / "data"
    return str(root), write_hub_export(root)


def test_a_missing_id_lists_the_columns_that_could_serve(hub):
    url, _ = hub
    assert b"huggingface" in pq.read_schema(f"{url}/{NAMES[0]}").metadata  # as a Hub export is written
    with pytest.raises(ColumnError) as refused:
        check_columns(ShardList.under(url), Columns())
    message = str(refused.value)
    assert "has no 'id' (id column)" in message
    assert "--id-column name (unique)" in message
    assert "--id-column caption (not unique: 1 values repeat)" in message
    assert "--id-column image.path (the image's path, unique)" in message
    assert f"--id-column {ROW_ID} (shard file + row number" in message


def test_duplicate_or_null_image_paths_are_refused(tmp_path):
    url = tmp_path / "dup"
    write_hub_export(url, paths=[f"img_{i % 5}.png" for i in range(2 * ROWS_PER_SHARD)])
    with pytest.raises(DuplicateIdError, match=f"use --id-column {ROW_ID}"):
        check_unique_ids(ShardList.under(str(url)), "image.path")


def test_ingest_with_a_row_id(hub, tmp_path):
    url, _ = hub
    summary = ingest(url, str(tmp_path / "out"), id_column=ROW_ID, use_ray=False)
    assert summary["rows"] == 2 * ROWS_PER_SHARD
    ids = pq.ParquetDataset(str(tmp_path / "out")).read(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"{name}:{row}" for name in NAMES for row in range(ROWS_PER_SHARD))


@pytest.mark.ray
@pytest.mark.parametrize("id_column", ["image.path", ROW_ID])
def test_derived_ids_run_train_then_embed_with_the_same_ids_every_run(ray_local, hub, tmp_path, id_column):
    from pipeline.model import AutoencoderConfig
    from pipeline.report import ReportConfig, report
    from pipeline.train import TrainConfig, train

    url, paths = hub
    expected = paths if id_column == "image.path" else [f"{n}:{r}" for n in NAMES for r in range(ROWS_PER_SHARD)]
    trained = train(TrainConfig(data_url=url, out_url=str(tmp_path / "run"), epochs=1, val_fraction=0.3,
                                id_column=id_column, model=AutoencoderConfig(image_size=32, latent_dim=16,
                                                                             base_width=8)))
    runs = []
    for attempt in ("a", "b"):
        cfg = EmbedConfig(data_url=url, model_url=trained.model_url, out_url=str(tmp_path / f"latents-{attempt}"),
                          id_column=id_column, passthrough=("label",))
        assert embed(cfg).rows_out == len(expected)
        table = read_latents(cfg.out_url, columns=["id", id_column, "mse", "label"])
        assert table.column("id").to_pylist() == table.column(id_column).to_pylist()
        runs.append(dict(zip(table.column("id").to_pylist(), table.column("mse").to_pylist())))
    assert sorted(runs[0]) == sorted(expected)
    assert runs[0] == runs[1]  # the same ids, and each id the same image, on every run

    # The report finds each worst row's image in --data by its derived id.
    found = report(ReportConfig(latents_url=str(tmp_path / "latents-b"), out_url=str(tmp_path / "report"),
                                model_url=trained.model_url, data_url=url, id_column=id_column, top_k=3,
                                typical_k=1))
    assert [e["note"] for e in found["galleries"]["worst"] + found["galleries"]["typical"]] == [None] * 4

    # Resume: Ray's write checkpoint finds every derived id done, and the rerun writes nothing new.
    done = tmp_path / "latents-a"
    files = sorted(p.name for p in done.glob("*.parquet"))
    (done / SUCCESS_FILE).unlink()
    again = embed(EmbedConfig(data_url=url, model_url=trained.model_url, out_url=str(done), id_column=id_column,
                              passthrough=("label",)))
    assert again.rows_out == len(expected) and sorted(p.name for p in done.glob("*.parquet")) == files
