"""A tiled model: images seen at working resolution through model-sized tiles, in the scorer and
in the train, embed and report jobs. One row per image, maps assembled where the pixels were."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.inference import ImageScorer
from pipeline.model import AutoencoderConfig, build_model, fuse_for_inference
from pipeline.scoring import squared_error_map


def _tiled_scorer(scores=None, **config) -> ImageScorer:
    torch.manual_seed(0)
    config = AutoencoderConfig(image_size=32, base_width=8, latent_dim=16, working_size=96, tile_stride=16, **config)
    return ImageScorer(fuse_for_inference(build_model(config)).eval(), scores=scores)


def test_tiling_is_part_of_the_model_config_and_checked():
    config = AutoencoderConfig(image_size=64, working_size=512)
    assert config.input_size == 512 and config.tile_grid().count == 15 * 15  # half-tile stride by default
    assert AutoencoderConfig(image_size=64).tile_grid() is None and AutoencoderConfig().input_size == 64
    for bad in (dict(image_size=64, working_size=48), dict(image_size=64, tile_stride=16),
                dict(image_size=64, working_size=512, tile_stride=65)):
        with pytest.raises(ValueError, match="working_size|tile_stride"):
            AutoencoderConfig(**bad)


def test_train_flags_make_the_tile_the_models_input():
    from jobs.train import parse_args

    cfg = parse_args(["--data", "d", "--out", "o", "--image-size", "512", "--tile", "64", "--tile-stride", "48",
                      "--tiles-per-image", "6"])
    assert (cfg.model.image_size, cfg.model.working_size, cfg.model.tile_stride, cfg.tiles_per_image) == (64, 512, 48, 6)
    assert parse_args(["--data", "d", "--out", "o", "--image-size", "96"]).model.working_size == 0
    with pytest.raises(InputError, match="tile_stride"):
        parse_args(["--data", "d", "--out", "o", "--tile-stride", "8"])


def test_a_tiled_scorer_finds_a_small_mark_at_working_resolution():
    """The assembled error map puts a 3 px mark where it is in the 96 px image, and the image's
    scores are pooled from the assembled maps: mse is their mean, the peak their max."""
    scorer = _tiled_scorer(scores=("mse", "err_max"))
    clean = torch.full((1, 3, 96, 96), 0.5)
    marked = clean.clone()
    marked[..., 70:73, 20:23] = 1.0
    out = scorer(torch.cat([clean, marked]), maps=("err",))
    change = out["maps"]["err"][1] - out["maps"]["err"][0]  # (96, 96): what the mark added
    assert change.shape == (96, 96)
    peak = divmod(int(change.argmax()), 96)
    assert abs(peak[0] - 71) <= 3 and abs(peak[1] - 21) <= 3, peak
    # mse: the mean of the per-pixel squared error assembled from the tiles' (overlaps averaged).
    tiles = scorer.grid.cut(torch.cat([clean, marked]))
    with torch.inference_mode():
        x_hat = scorer.model(tiles)["x_hat"]
    expected = scorer.grid.assemble(squared_error_map(tiles, x_hat)).flatten(1).mean(dim=1)
    np.testing.assert_allclose(out["scores"]["mse"], expected.numpy(), rtol=1e-5)
    assert out["scores"]["err_max"][1] > out["scores"]["err_max"][0]
    assert out["x_hat"].shape == (2, 3, 96, 96)


def test_a_tiled_image_latent_is_its_tiles_mean_and_batches_split_alike(monkeypatch):
    import pipeline.inference as inference

    scorer = _tiled_scorer()
    x = torch.rand(3, 3, 96, 96)
    whole = scorer(x)
    with torch.inference_mode():
        tile_z = scorer.model(scorer.grid.cut(x))["z"]
    np.testing.assert_allclose(whole["z"], tile_z.view(3, scorer.grid.count, -1).mean(dim=1).numpy(), rtol=1e-5,
                               atol=1e-6)
    monkeypatch.setattr(inference, "MAX_TILES", scorer.grid.count)  # one image a call
    split = scorer(x)
    np.testing.assert_allclose(split["z"], whole["z"], rtol=1e-5, atol=1e-6)
    for name, values in whole["scores"].items():
        np.testing.assert_allclose(split["scores"][name], values, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.ray
def test_the_jobs_train_embed_and_draw_a_tiled_model(ray_local, tmp_path):
    """--tile: training on tiles, a patch bank of tile features, one latent row per image with
    scores from the assembled maps, and the report's heat maps at working resolution."""
    from PIL import Image

    from jobs.train import parse_args
    from pipeline.checkpoint import load_checkpoint
    from pipeline.embed import EmbedConfig, embed
    from pipeline.latents import check_model_fits, metadata_of, read_latents
    from pipeline.report.galleries import build_galleries, fetch_images
    from pipeline.shards import Columns, ShardList
    from pipeline.synth import write_synthetic_corpus
    from pipeline.train import train

    data = tmp_path / "shards"
    write_synthetic_corpus(str(data), n=160, image_size=64, anomaly_fraction=0.05, seed=3, rows_per_shard=80)
    cfg = parse_args(["--data", str(data), "--out", str(tmp_path / "run"), "--image-size", "64", "--tile", "32",
                      "--tile-stride", "16", "--tiles-per-image", "3", "--latent-dim", "16", "--base-width", "8",
                      "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.15", "--patch-bank", "200"])
    result = train(cfg)
    assert result.history[-1]["tiles_per_s"] == pytest.approx(3 * result.history[-1]["images_per_s"])

    exported = load_checkpoint(result.model_url)
    assert (exported.config.image_size, exported.config.working_size, exported.config.tile_stride) == (32, 64, 16)
    assert exported.patch_bank.patches.shape[0] == 200

    out = str(tmp_path / "latents")
    summary = embed(EmbedConfig(data_url=str(data), model_url=result.model_url, out_url=out, scores="all"))
    assert summary.tiles_per_s == pytest.approx(summary.images_per_s * 9)  # 3 x 3 tiles of 32 px, 16 apart
    table = read_latents(out)
    assert table.num_rows == 160 and len(set(table.column("id").to_pylist())) == 160
    assert np.isfinite(table.column("patch_knn_top").to_numpy()).all()

    # The report's galleries recompute a row's mse as embed wrote it, at the precision the latents
    # record (embed's "auto" is bfloat16 on a CPU with AMX or AVX512-BF16), and draw 64 px heat maps.
    worst = table.sort_by([("mse", "descending")]).slice(0, 3)
    rows = [{"id": i, "score": s} for i, s in zip(worst.column("id").to_pylist(), worst.column("mse").to_pylist())]
    images = fetch_images(ShardList.under(str(data)), Columns(), [r["id"] for r in rows])
    entries, files, _, _ = build_galleries(result.model_url, images, {"worst": rows}, [], "mse",
                                           metadata_of(table.schema)["precision"])
    for entry, row in zip(entries["worst"], rows):
        assert entry["recomputed_mse"] == pytest.approx(row["score"], rel=1e-4)
        heat = Image.open(io.BytesIO(files[entry["images"]["error"]]))
        assert heat.size == (64, 64)

    # Its image latent is a summary of its tiles: the decoder cannot draw the image from it.
    with pytest.raises(InputError, match="tiled"):
        check_model_fits(out, {"model": exported.config.to_dict(), "weights_sha256": exported.weights_sha256},
                         result.model_url)


@pytest.mark.parametrize("working_size", [0, 96])
def test_an_empty_batch_gives_empty_columns(working_size):
    """A batch whose every row failed to decode (or held none of the held-out split) still scores."""
    torch.manual_seed(0)
    config = AutoencoderConfig(image_size=32, base_width=8, latent_dim=16, working_size=working_size)
    out = ImageScorer(fuse_for_inference(build_model(config)).eval())(torch.zeros(0, 3, config.input_size,
                                                                                  config.input_size))
    assert out["z"].shape == (0, 16) and all(values.shape == (0,) for values in out["scores"].values())


def test_patch_candidates_of_a_tiled_model_come_from_every_tile(monkeypatch):
    """`per_input` places of each tile, gathered one model call at a time (a batch's tile features
    at once would not fit in memory at a large working size)."""
    import pipeline.inference as inference
    from pipeline.train.export import candidates_of, patch_projection

    scorer = _tiled_scorer(scores=())
    monkeypatch.setattr(inference, "MAX_TILES", 2 * scorer.grid.count)  # two images a call
    projection = patch_projection(scorer.model, scorer.model.config, seed=0)
    patches = candidates_of(scorer, torch.rand(5, 3, 96, 96), projection, 3, np.random.default_rng(0))
    assert patches.shape == (5 * scorer.grid.count * 3, projection.shape[1])
