"""Decoding job: shards that read back exactly, the ids asked for, null latents counted, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import decode as decode_job
from pipeline import storage
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.decode import (
    OUTPUT_SCHEMA,
    RUN_FILE,
    DecodeConfig,
    LatentDecoder,
    decode,
    select_rows,
)
from pipeline.embed import EmbedConfig, embed_reference
from pipeline.errors import InputError
from pipeline.images import decode_batch
from pipeline.inference import decode_latents, interpolation_grid, load_inference_model
from pipeline.latents import dequantize_latents, latents_from_batch, write_success
from pipeline.model import AutoencoderConfig, build_model
from pipeline.shards import Columns, check_columns, image_bytes
from pipeline.synth import write_synthetic_corpus
from builders import load_with_datasets

SIZE = 32
GOOD = 40
BAD_IDS = ("bad-empty", "bad-junk")


def _make_latents(root: Path, model_url: str, dtype: str) -> str:
    """A real latent dataset (the embed job's plain-loop twin) with two failed rows, in two files."""
    shards = root / "shards"
    write_synthetic_corpus(str(shards), n=GOOD, image_size=SIZE, seed=3, rows_per_shard=GOOD)
    pq.write_table(pa.table({"id": list(BAD_IDS), "image": pa.array([b"", b"junk"], pa.binary()), "label": [1, 1],
                             "anomaly_kind": ["bad", "bad"]}), shards / "zz-bad.parquet")
    table = embed_reference(EmbedConfig(data_url=str(shards), model_url=model_url, out_url="", latent_dtype=dtype), 1.0)
    out = root / f"latents-{dtype}"
    out.mkdir()
    pq.write_table(table.slice(0, 25), out / "a.parquet")
    pq.write_table(table.slice(25), out / "b.parquet")
    write_success(str(out), {"rows": table.num_rows})
    return str(out)


@pytest.fixture(scope="module")
def model_url(tiny_trained_model):
    return tiny_trained_model


@pytest.fixture(scope="module")
def latents(tmp_path_factory, model_url):
    return _make_latents(tmp_path_factory.mktemp("data"), model_url, "float32")


@pytest.fixture(scope="module")
def latents_int8(tmp_path_factory, model_url):
    return _make_latents(tmp_path_factory.mktemp("data8"), model_url, "int8")


def _stored(latents_url: str) -> dict[str, np.ndarray]:
    """{id: dequantized latent} for the rows that have one, read straight from the Parquet."""
    table = pq.ParquetDataset(latents_url).read()
    rows = table.to_pydict()
    valid, z = latents_from_batch(rows)
    return dict(zip(np.asarray(rows["id"])[valid].tolist(), z))


def _reference_pixels(model_url: str, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """model.decode of the stored latents, in one batch, with the model the job runs (BatchNorm folded)."""
    ids = sorted(stored)
    z = np.stack([stored[i] for i in ids])
    pixels = decode_latents(load_inference_model(model_url)[0], z)
    # The folded model is the checkpoint's model up to float rounding: at most one level apart.
    unfolded = decode_latents(load_checkpoint(model_url).model, z)
    assert np.abs(pixels.astype(int) - unfolded).max() <= 1
    return dict(zip(ids, pixels))


def _read_images(out: str) -> pa.Table:
    check_columns(out, Columns())  # the image-shard contract, from the footers
    return pq.ParquetDataset(out).read()


def test_mapper_works_without_ray_on_a_plain_dict(model_url, latents_int8):
    stored = _stored(latents_int8)
    table = pq.ParquetDataset(latents_int8).read()
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ("id", "latent", "latent_scale")}
    out = LatentDecoder(model_url)(batch)
    assert out.schema == OUTPUT_SCHEMA
    assert sorted(out.column("id").to_pylist()) == sorted(stored), "null-latent rows are dropped, the rest kept"
    assert set(out.column("source").to_pylist()) == {"decoded"} and set(out.column("width").to_pylist()) == {SIZE}
    pixels, errors = decode_batch(image_bytes(out.column("image")), SIZE, 3)
    assert errors == [None] * len(errors)
    # int8 latents are dequantized (latent * scale) before decoding.
    raw = dict(zip(table.column("id").to_pylist(), table.column("latent").to_pylist()))
    scale = dict(zip(table.column("id").to_pylist(), table.column("latent_scale").to_pylist()))
    some = out.column("id")[0].as_py()
    np.testing.assert_allclose(stored[some], np.asarray(raw[some], np.float32) * scale[some], rtol=1e-6)
    reference = _reference_pixels(model_url, stored)
    for row_id, got in zip(out.column("id").to_pylist(), pixels):
        np.testing.assert_array_equal(got, reference[row_id])


@pytest.mark.ray
def test_decode_job_writes_shards_that_read_back_exactly(ray_local, model_url, latents, tmp_path):
    out = str(tmp_path / "decoded")
    cfg = DecodeConfig(latents_url=latents, model_url=model_url, out_url=out, batch_size=16)
    summary = decode(cfg)
    assert (summary.rows_in, summary.selected, summary.skipped_null_latent, summary.written) == (42, 42, 2, 40)
    assert summary.rows_without_latent == 2
    assert sum(summary.skipped_by_reason.values()) == 2 and len(summary.skipped_by_reason) == 2

    table = _read_images(out)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    first = pq.ParquetFile(storage.list_files(out)[0]).metadata.row_group(0)
    codecs = {first.column(i).path_in_schema: first.column(i).compression for i in range(first.num_columns)}
    assert codecs["image.bytes"] == "UNCOMPRESSED" and codecs["id"] == "ZSTD"  # PNG bytes do not compress further
    ids = table.column("id").to_pylist()
    stored = _stored(latents)
    assert len(ids) == len(set(ids)) == GOOD and set(ids) == set(stored)
    assert set(table.column("format").to_pylist()) == {"png"} and set(table.column("source").to_pylist()) == {"decoded"}
    pixels, errors = decode_batch(image_bytes(table.column("image")), SIZE, 3)
    assert errors == [None] * GOOD
    reference = _reference_pixels(model_url, stored)
    for row_id, got in zip(ids, pixels):
        np.testing.assert_array_equal(got, reference[row_id])  # PNG is lossless: exact

    # Other tools open them: the Hugging Face image feature gives PIL images with `datasets`.
    loaded = load_with_datasets(storage.list_files(out), tmp_path / "hf-cache")
    assert len(loaded) == GOOD and loaded[0]["image"].size == (SIZE, SIZE)
    assert set(loaded["id"]) == set(stored)

    # Embeddable again: the decoded shards are input the embedder takes as they are.
    again = embed_reference(EmbedConfig(data_url=out, model_url=model_url, out_url=""), 1.0)
    assert again.num_rows == GOOD and again.column("error").null_count == GOOD

    # A rerun into the same folder replaces rather than adds: here with --ids and JPEG through the job's CLI.
    wanted = sorted(stored)[3:7]
    argv = ["--latents", latents, "--model", model_url, "--out", out, "--format", "jpeg",
            "--ids", ",".join([*wanted, "bad-junk"])]
    assert decode_job.main(argv) == 0
    table = _read_images(out)
    assert sorted(table.column("id").to_pylist()) == wanted, "exactly the ids asked for, nothing left of the first run"
    assert set(table.column("format").to_pylist()) == {"jpeg"}
    run = json.loads(storage.read_text(storage.join(out, RUN_FILE)))["summary"]
    assert (run["selected"], run["skipped_null_latent"], run["written"]) == (5, 1, 4)
    assert sorted(run["files"]) == sorted(p.name for p in Path(out).glob("*.parquet")), "the first run's are gone"
    assert not set(run["files"]) & set(summary.files)
    pixels, errors = decode_batch(image_bytes(table.column("image")), SIZE, 3)
    for row_id, got in zip(table.column("id").to_pylist(), pixels):
        assert np.abs(got.astype(int) - reference[row_id]).mean() < 4  # JPEG q95: close, not exact


@pytest.mark.ray
def test_decode_job_sample_gives_n_distinct_ids_from_the_seed(ray_local, model_url, latents_int8, tmp_path):
    out = str(tmp_path / "sample")
    assert decode_job.main(["--latents", latents_int8, "--model", model_url, "--out", out, "--sample", "6",
                            "--seed", "4"]) == 0
    table = _read_images(out)
    sampled = table.column("id").to_pylist()
    assert len(set(sampled)) == 6 and sorted(sampled) == select_rows(latents_int8, sample=6, seed=4).ids
    pixels, _ = decode_batch(image_bytes(table.column("image")), SIZE, 3)
    reference = _reference_pixels(model_url, _stored(latents_int8))  # int8: dequantized, then decoded
    for row_id, got in zip(sampled, pixels):
        np.testing.assert_array_equal(got, reference[row_id])


def test_sample_is_deterministic_and_drawn_from_rows_with_a_latent(latents):
    first = select_rows(latents, sample=10, seed=0)
    assert len(set(first.ids)) == 10 and first.ids == select_rows(latents, sample=10, seed=0).ids
    assert not set(first.ids) & set(BAD_IDS)
    assert select_rows(latents, sample=10, seed=1).ids != first.ids
    assert set(select_rows(latents, sample=GOOD, seed=7).ids) == set(_stored(latents))
    with pytest.raises(InputError, match="more ids than the 40 rows"):
        select_rows(latents, sample=GOOD + 1)


def test_missing_ids_are_a_clear_error(latents, model_url, tmp_path, capsys):
    missing = [f"nope-{i}" for i in range(8)]
    with pytest.raises(InputError, match=r"8 of the 9 requested ids are not in .*'nope-0'.*and 3 more"):
        select_rows(latents, ids=["synth-00000001", *missing])
    out = tmp_path / "never"
    assert decode_job.main(["--latents", latents, "--model", model_url, "--out", str(out), "--ids", "nope-0"]) == 2
    assert "'nope-0'" in capsys.readouterr().err and not out.exists()


def test_refusals_before_any_work(latents, model_url, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not this job's output"):
        decode(DecodeConfig(latents_url=latents, model_url=model_url, out_url=str(tmp_path)))
    torch.manual_seed(1)
    other = str(tmp_path / "other-model")
    save_checkpoint(other, build_model(AutoencoderConfig(image_size=SIZE, channels=3, latent_dim=16, base_width=8)))
    with pytest.raises(InputError, match="made by another model"):
        decode(DecodeConfig(latents_url=latents, model_url=other, out_url=str(tmp_path / "o")))
    with pytest.raises(InputError, match="not both"):
        select_rows(latents, ids=["synth-00000001"], sample=3)


def test_latents_with_unreadable_metadata_are_refused_not_taken_for_unchecked(latents, model_url, tmp_path):
    from pipeline.checkpoint import read_checkpoint_meta
    from pipeline.latents import METADATA_KEY, check_model_fits
    from pipeline.neighbours import NeighboursConfig, prepare

    table = pq.read_table(storage.list_files(latents)[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: b"{not json"}),
                   broken / "part-00000.parquet")
    with pytest.raises(InputError, match=f"the latents under {broken} carry unreadable metadata .*not valid JSON"):
        check_model_fits(str(broken), read_checkpoint_meta(model_url), model_url)
    with pytest.raises(InputError, match=f"the latents under {broken} carry unreadable metadata"):
        prepare(NeighboursConfig(latents_url=str(broken), out_url=str(tmp_path / "n"), duplicate_threshold="value:0.5"))


def test_only_null_latents_selected_writes_no_shards_but_counts_them(latents, model_url, tmp_path):
    out = tmp_path / "none"
    summary = decode(DecodeConfig(latents_url=latents, model_url=model_url, out_url=str(out), ids=BAD_IDS))
    assert (summary.selected, summary.skipped_null_latent, summary.written) == (2, 2, 0)
    assert sum(summary.skipped_by_reason.values()) == 2
    assert storage.list_files(str(out)) == [] and (out / RUN_FILE).exists()


@pytest.mark.parametrize("fixture", ["latents", "latents_int8"])
def test_interpolation_endpoints_are_the_reconstructions(request, fixture, model_url):
    latents_url = request.getfixturevalue(fixture)
    stored = _stored(latents_url)
    a, b = sorted(stored)[:2]
    strip = interpolation_grid(model_url, latents_url, a, b, steps=5)
    assert strip.shape == (SIZE, 5 * SIZE, 3) and strip.dtype == np.uint8
    reference = _reference_pixels(model_url, {a: stored[a], b: stored[b]})
    np.testing.assert_array_equal(strip[:, :SIZE], reference[a])
    np.testing.assert_array_equal(strip[:, -SIZE:], reference[b])
    assert not np.array_equal(strip[:, 2 * SIZE:3 * SIZE], reference[a])  # the middle is neither end
    if fixture == "latents":  # float32 latents: the endpoint is the model's own x_hat of the image
        model = load_checkpoint(model_url).model
        shard = pq.ParquetDataset(Path(latents_url).parent / "shards").read().to_pydict()
        image = shard["image"][shard["id"].index(a)]
        x = torch.from_numpy(decode_batch([image], SIZE, 3)[0]).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():
            x_hat = model(x)["x_hat"]
        expected = (x_hat * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()
        assert np.abs(strip[:, :SIZE].astype(int) - expected).max() <= 1
    with pytest.raises(InputError, match="no latent"):
        interpolation_grid(model_url, latents_url, a, BAD_IDS[0])
    with pytest.raises(InputError, match="'ghost'"):
        interpolation_grid(model_url, latents_url, a, "ghost")


def test_latents_from_batch_reads_ray_numpy_and_object_forms(latents_int8):
    """Ray's numpy batches give an (N, D) array when no row is null, an object array otherwise."""
    table = pq.ParquetDataset(latents_int8).read()
    table = table.filter(pa.compute.is_valid(table.column("latent")))
    stored = np.stack(table.column("latent").to_numpy(zero_copy_only=False))
    scale = table.column("latent_scale").to_numpy()
    assert stored.dtype == np.int8
    valid, z = latents_from_batch({"latent": stored, "latent_scale": scale})
    assert valid.all()
    np.testing.assert_array_equal(z, dequantize_latents(stored, scale))
    with_null = np.array([*stored[:2], None], dtype=object)
    valid, z2 = latents_from_batch({"latent": with_null, "latent_scale": np.array([*scale[:2], np.nan])})
    assert valid.tolist() == [True, True, False]
    np.testing.assert_array_equal(z2, z[:2])


@pytest.mark.ray
def test_output_on_s3_is_replaced_on_a_rerun(ray_local, s3_bucket, model_url, latents):
    out = f"{s3_bucket}/decoded"
    first = decode(DecodeConfig(latents_url=latents, model_url=model_url, out_url=out, sample=5))
    again = decode(DecodeConfig(latents_url=latents, model_url=model_url, out_url=out, ids=("synth-00000002",)))
    assert (first.written, again.written) == (5, 1)
    ids = [i for f in storage.list_files(out)
           for i in pq.read_table(pa.BufferReader(storage.read_bytes(f))).column("id").to_pylist()]
    assert ids == ["synth-00000002"], "the first run's shards are gone"


@pytest.mark.ray
def test_a_row_decoded_twice_fails_the_job_with_its_summary(ray_local, model_url, latents, tmp_path, capsys):
    # A latent dataset holding one row twice (a part file copied in by hand): the sampled id is drawn once,
    # but both of its rows decode. The job says so (exit 1, the summary, one error line), not a traceback.
    first = select_rows(latents, sample=1, seed=0).ids[0]
    doubled = tmp_path / "doubled"
    doubled.mkdir()
    table = pq.ParquetDataset(latents).read()
    pq.write_table(table, doubled / "a.parquet")
    pq.write_table(table.filter(pa.compute.equal(table.column("id"), first)), doubled / "b.parquet")
    write_success(str(doubled), {"rows": table.num_rows + 1})
    out = tmp_path / "decoded"
    code = decode_job.main(["--latents", str(doubled), "--model", model_url, "--out", str(out), "--sample", "1"])
    captured = capsys.readouterr()
    assert code == 1, captured.out[-2000:] + captured.err[-2000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["selected"], summary["written"]) == (1, 2)
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 1 latent rows selected but 2 decoded rows in {out} (does {doubled} hold an id more "
                      "than once, or did it change during the run?)"]
    assert "Traceback" not in captured.out + captured.err
    assert _read_images(str(out)).column("id").to_pylist() == [first, first]
