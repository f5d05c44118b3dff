"""Input formats as readers: calibration reads every format embed reads, and a format defined here runs embed.

Each format's calibration is checked against the old workaround, `squeeze ingest` first and then
calibrate on the ingested Parquet: the same ids give the same id-hash sample, so the same images,
copies and threshold.

The throwaway format (`PngFolder`, one PNG file per row) is defined and registered in this file
alone: registering it is all a new format needs, no stage or core module changes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pytest
from builders import make_tiny_model, write_tar_shards
from ray.data.datasource import FileBasedDatasource
from test_neighbours import random_latents

from pipeline import storage, tars
from pipeline.embed import EmbedConfig, embed
from pipeline.errors import InputError
from pipeline.formats import FORMATS, ShardReader
from pipeline.formats.base import REASON_COLUMN
from pipeline.images import encode_image
from pipeline.ingest import ingest
from pipeline.latents import read_latents
from pipeline.neighbour_output import RUN_FILE
from pipeline.neighbours.calibrate import calibrate_threshold, sample_images
from pipeline.shards import ROW_ID, Columns, ShardList, write_shard
from pipeline.synth import synthetic_image

ROWS = 48  # two shards of each format
CALIBRATION_IMAGES = 30  # fewer than the rows: the id-hash sample chooses
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

# (name, which data, --id-column): every id kind `embed --data` accepts besides a real id column.
CASES = [("tar __key__", "tar", "id"), ("tar json:<field>", "tar", "json:uid"),
         (ROW_ID, "hub", ROW_ID), ("image.path", "hub", "image.path")]


def write_hub_shards(root) -> None:
    """Parquet without an id column, its images in the Hugging Face struct (path and bytes), two shards."""
    for shard in range(2):
        rows = range(shard * ROWS // 2, (shard + 1) * ROWS // 2)
        images = [{"bytes": encode_image(synthetic_image(i, 2, 32, 3)), "path": f"photos/img_{i:03d}.png"}
                  for i in rows]
        write_shard(str(root / f"train-{shard:05d}-of-00002.parquet"), pa.table({"image": pa.array(images, HF_IMAGE)}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    write_tar_shards(root / "tar", ROWS, shards=2, bad=False)
    write_hub_shards(root / "hub")
    latents, _, _ = random_latents(root / "latents", n=24, dim=16, files=1)  # the tiny model's latent size
    return {"root": str(root), "tar": str(root / "tar"), "hub": str(root / "hub"), "latents": latents,
            "model": make_tiny_model(str(root / "model"))}


def ingested(data: dict[str, str], which: str, id_column: str) -> str:
    """The same data through `squeeze ingest` (the old way to calibrate on it): Parquet with an id column."""
    out = f"{data['root']}/ingested-{which}-{id_column.replace(':', '-').replace('@', '')}"
    if not storage.exists(out):
        summary = ingest(data[which], out, id_column=id_column, use_ray=False)
        assert summary["rows"] == ROWS
    return out


@pytest.mark.parametrize("name, which, id_column", CASES, ids=[case[0] for case in CASES])
def test_the_calibration_sample_is_the_same_rows_in_any_format(data, name, which, id_column):
    shards = ShardList.under(data[which])
    columns = Columns(id=tars.KEY_ID if id_column == "id" and which == "tar" else id_column)
    sample = sample_images(shards, columns, CALIBRATION_IMAGES, seed=3)
    reference = sample_images(ShardList.under(ingested(data, which, id_column)), Columns(), CALIBRATION_IMAGES, seed=3)
    assert len(sample) == CALIBRATION_IMAGES
    assert sample == reference  # same ids, in id order, with byte-identical images
    assert all(image for _, image in sample)


@pytest.mark.ray
@pytest.mark.parametrize("name, which, id_column", CASES, ids=[case[0] for case in CASES])
def test_squeeze_neighbours_calibrates_on_every_format_embed_reads(ray_local, data, tmp_path, name, which, id_column):
    from jobs.squeeze import main

    out = tmp_path / "neighbours"
    assert main(["neighbours", "--latents", data["latents"], "--model", data["model"], "--data", data[which],
                 "--id-column", id_column, "--calibration-images", str(CALIBRATION_IMAGES), "--k", "3",
                 "--out", str(out)]) == 0
    threshold = json.loads(storage.read_text(storage.join(str(out), RUN_FILE)))["threshold"]
    reference = calibrate_threshold(data["model"], ShardList.under(ingested(data, which, id_column)), Columns(),
                                    CALIBRATION_IMAGES, seed=0, latent_dtype="float32")
    assert threshold["images_sampled"] == threshold["images_used"] == CALIBRATION_IMAGES
    assert threshold == json.loads(json.dumps(reference))  # as recorded: the same sample gives the same numbers


# --- a format defined here, and nowhere else ----------------------------------------------


class PngFiles(FileBasedDatasource):
    """Ray Data source of PngFolder: one row per file, its id made as it is read."""

    _FILE_EXTENSIONS = ["png"]

    def __init__(self, paths: Sequence[str], *, root: str, columns: Columns, **kwargs):
        super().__init__(list(paths), **kwargs)
        self._root, self._columns = root, columns

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        yield pa.table({self._columns.id: [path[len(self._root) + 1:]], self._columns.image: pa.array([f.readall()])})


class PngFolder(ShardReader):
    """A folder of PNG files, each one row: its id the file's path under the folder, its image the file."""

    name = kind = "png-folder"
    suffix = ".png"
    description = "PNG files (*.png)"

    def _read(self, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.shards.url, name))

    def sizes(self) -> list[tuple[int, int]]:
        return [(len(self._read(name)), 1) for name in self.shards.names]

    def check(self, passthrough: Sequence[str] = ()) -> pa.Schema:
        if passthrough:
            raise InputError(f"PNG files have no columns to pass through ({', '.join(passthrough)})")
        return pa.schema([(self.columns.id, pa.string()), (self.columns.image, pa.binary())])

    def all_ids(self) -> pa.ChunkedArray:
        return pa.chunked_array([pa.array(self.shards.names, pa.string())])

    def dataset(self, extra: Sequence[str] = (), override_num_blocks: int | None = None, num_cpus: float = 1.0):
        import ray.data

        source = PngFiles(self.shards.paths, root=storage.filesystem(self.shards.url)[1],
                          filesystem=self.shards.arrow_fs, columns=self.columns)
        return ray.data.read_datasource(source, num_cpus=num_cpus)

    def fetch(self, ids: Sequence[str]) -> dict[str, bytes | None]:
        return {row_id: self._read(row_id) for row_id in ids if row_id in self.shards.names}

    def ingest_batches(self, shard_url: str, shard_name: str, copied: Sequence[str],
                       batch_rows: int) -> Iterator[pa.Table]:
        yield pa.table({"id": [shard_name], "image": pa.array([storage.read_bytes(shard_url)]),
                        REASON_COLUMN: pa.nulls(1, pa.string()), "__where__": [shard_url], "__source__": [shard_url]})


@pytest.fixture
def png_format(monkeypatch):
    """PngFolder registered for one test (the registry is restored after it). Ray's workers cannot
    import a test module, so its classes travel to them by value."""
    from ray import cloudpickle

    monkeypatch.setitem(FORMATS, PngFolder.name, PngFolder)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield PngFolder
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.ray
def test_a_format_registered_from_outside_runs_embed(ray_local, png_format, data, tmp_path):
    folder, images = tmp_path / "pngs", {}
    for i in range(12):
        name = f"{'cats' if i % 2 else 'dogs'}/{i:03d}.png"
        images[name] = encode_image(synthetic_image(i, 4, 32, 3), "png")
        storage.write_bytes(str(folder / name), images[name])
    assert ShardList.under(str(folder)).format == png_format.kind
    reference = tmp_path / "reference"
    write_shard(str(reference / "part-00000.parquet"), pa.table({"id": list(images), "image": list(images.values())}))

    for data_url, out in ((folder, tmp_path / "latents"), (reference, tmp_path / "reference-latents")):
        summary = embed(EmbedConfig(data_url=str(data_url), model_url=data["model"], out_url=str(out)))
        assert (summary.rows_in, summary.rows_out, summary.error_rows) == (12, 12, 0)
    got = read_latents(str(tmp_path / "latents")).sort_by("id")
    want = read_latents(str(tmp_path / "reference-latents")).sort_by("id")
    assert got.column("id").to_pylist() == sorted(images)
    np.testing.assert_array_equal(np.stack(got.column("latent").to_numpy(zero_copy_only=False)),
                                  np.stack(want.column("latent").to_numpy(zero_copy_only=False)))
    # Fetch by id (the report's galleries) and the calibration sample read through the same reader.
    sample = sample_images(ShardList.under(str(folder)), Columns(), 5, seed=1)
    assert len(sample) == 5 and all(images[row_id] == image for row_id, image in sample)


def test_an_unregistered_suffix_is_not_a_shard(tmp_path):
    storage.write_bytes(str(tmp_path / "a.png"), encode_image(synthetic_image(0, 4, 32, 3), "png"))
    with pytest.raises(InputError, match=r"no Parquet shards \(\*\.parquet\) or WebDataset shards \(\*\.tar\) found"):
        ShardList.under(str(tmp_path))
