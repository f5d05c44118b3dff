"""The local feature memory: coreset picks, a bank that survives bytes, and distances that find
the place a model has never seen the like of."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import AutoencoderConfig, build_model
from pipeline.patch_memory import (PatchBank, build_patch_bank, greedy_coreset, patch_descriptions, project,
                                   random_projection, standardising_projection, subsample, texture_descriptions)


def _covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance from any point to its nearest chosen point."""
    d = ((points[:, None, :] - points[chosen][None, :, :]) ** 2).sum(axis=2)
    return float(np.sqrt(d.min(axis=1)).max())


def test_the_coreset_covers_a_rare_cluster_that_a_random_sample_misses():
    generator = np.random.default_rng(0)
    common = generator.normal(0.0, 1.0, (2000, 16))
    rare = generator.normal(12.0, 0.2, (5, 16))  # five normal-but-rare patches
    points = np.concatenate([common, rare]).astype(np.float32)
    chosen = greedy_coreset(points, 50, seed=0, selection_dim=16)
    assert len(set(chosen.tolist())) == 50
    assert np.any(chosen >= 2000), "the coreset kept none of the rare patches"
    random = np.random.default_rng(0).permutation(len(points))[:50]
    assert _covering_radius(points, chosen) < _covering_radius(points, random)


def test_subsample_by_either_sampler_keeps_rows_of_the_input():
    points = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    for sampler in ("coreset", "random"):
        kept = subsample(points, 40, sampler)
        assert kept.shape == (40, 8)
        assert all(any(np.array_equal(row, p) for p in points) for row in kept[:5])
    with pytest.raises(ValueError, match="sampler"):
        subsample(points, 40, "best")


def test_descriptions_bring_every_stage_to_the_finest_grid():
    features = [torch.rand(2, 8, 16, 16), torch.rand(2, 12, 8, 8)]
    assert patch_descriptions(features).shape == (2, 20, 16, 16)


def test_texture_descriptions_are_window_statistics_at_seven_by_seven_shared_centres():
    """Each place: every channel's mean and spread over the n/4-cell square around it, then over
    the n/2-cell square with the same centre, then the small square's peak above its mean; a
    square of high variance shows where it is."""
    for side in (16, 24, 32):
        assert texture_descriptions(torch.rand(2, 5, side, side)).shape == (2, 25, 7, 7)
        assert texture_descriptions(torch.rand(2, 5, side, side), peak=False).shape == (2, 20, 7, 7)
    stem = torch.full((1, 2, 32, 32), 0.5)
    stem[0, 1] = 0.25
    stem[0, 0, 12:20, 12:20] = torch.tensor([0.0, 1.0]).repeat(32)[:64].view(8, 8)  # mean 0.5, spread 0.5
    # (10, 7, 7): small window mean, spread; large window mean, spread; small window peak above its mean
    described = texture_descriptions(stem)[0]
    torch.testing.assert_close(described[:8], texture_descriptions(stem, peak=False)[0])
    torch.testing.assert_close(described[8, 3, 3], torch.tensor(0.5))  # the square's 1.0 over its mean 0.5
    assert described[9].abs().max() < 1e-6 and described[8, 0, 0] < 1e-6  # no peak where the map is flat
    torch.testing.assert_close(described[[0, 4]], torch.full((2, 7, 7), 0.5))  # channel 0's means: 0.5 throughout
    torch.testing.assert_close(described[[1, 5]], torch.full((2, 7, 7), 0.25))  # channel 1: constant
    assert described[[3, 7]].abs().max() < 1e-3  # ... so no spread
    # The small window over cells 12-19 is the place whose centre is at cell 16: place 3 (one every 4 cells).
    assert divmod(int(described[2].argmax()), 7) == (3, 3)
    torch.testing.assert_close(described[2, 3, 3], torch.tensor(0.5))
    assert described[2, 0, 0] < 1e-3 and 0 < described[6, 3, 3] < described[2, 3, 3]


def test_the_standardising_projection_divides_each_number_by_its_spread():
    generator = np.random.default_rng(2)
    candidates = generator.normal(size=(4000, 6)) * np.array([1.0, 100.0, 0.01, 1.0, 1.0, 0.0])  # one never varies
    projection = standardising_projection(candidates.astype(np.float32), dim=6, seed=0)  # (6, 6): row i for number i
    random = random_projection(6, 6, seed=0)
    spread = candidates.std(axis=0)
    np.testing.assert_allclose(projection[:5] * spread[:5, None], random[:5], rtol=1e-3)
    np.testing.assert_allclose(projection[5], random[5] / (1e-6 * spread.max()), rtol=1e-3)  # the floor, not 1/0


def test_a_texture_bank_finds_a_rougher_square_of_the_same_brightness():
    """Training images: grey noise of one amplitude. A new image whose square of 16 px has noise
    twice as strong around the same mean: the texture memory's farthest place is over it."""
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=64, base_width=8, latent_dim=16)).eval()
    with torch.no_grad():
        normals = [0.5 + 0.1 * torch.randn(8, 3, 64, 64) for _ in range(4)]
        bank = build_patch_bank([model(x, features=True)["features"] for x in normals], size=512, dim=32,
                                description="texture")
        odd = 0.5 + 0.1 * torch.randn(1, 3, 64, 64)
        odd[..., 8:24, 40:56] = 0.5 + 0.2 * torch.randn(1, 3, 16, 16)
        distances = bank.distance_map(model(odd, features=True)["features"])[0]  # (7, 7): places 8 px apart
    assert distances.shape == (7, 7)
    peak = divmod(int(distances.argmax()), 7)
    # The square spans 8-24 px down and 40-56 across: the places centred at 16 px (row 1) and 48 (column 5).
    assert peak == (1, 5), f"the farthest place is {peak}, not over the square"


def test_the_texture_peak_stands_out_where_a_few_pixels_are_bright():
    """Training stems: noise of one amplitude. A new stem with 4 bright cells: the nearest-patch
    distance at the places whose small squares hold them is far above every other place's. A texture bank saved before
    the peak was added (4 numbers per stem channel) is still searched, as it was built."""
    generator = torch.Generator().manual_seed(0)
    normals = torch.cat([0.5 + 0.1 * torch.randn(8, 4, 32, 32, generator=generator) for _ in range(4)])
    odd = 0.5 + 0.1 * torch.randn(1, 4, 32, 32, generator=generator)
    odd[0, :, 16:18, 16:18] = 1.5  # in the 8-cell squares of places 3 and 4 (one every 4 cells) each way
    inside = torch.zeros(7, 7, dtype=torch.bool)
    inside[3:5, 3:5] = True
    for peak, numbers in ((True, 20), (False, 16)):
        described = texture_descriptions(normals, peak=peak)
        projection = standardising_projection(described.permute(0, 2, 3, 1).reshape(-1, numbers).numpy(), dim=16)
        bank = PatchBank(project(described, projection).reshape(-1, 16).numpy(), projection, "texture")
        distances = bank.distance_map([odd])[0]  # the stem is the texture description's only input
        assert distances.shape == (7, 7) and inside.flatten()[int(distances.argmax())], (peak, distances)
        if peak:
            # The places whose larger squares reach the cells come next; the rest are far below.
            assert distances[inside].min() > 1.5 * distances[~inside].max(), distances


@pytest.mark.parametrize("description", ["stages", "texture"])
def test_the_bank_and_its_description_survive_bytes(description):
    generator = np.random.default_rng(4)
    bank = PatchBank(generator.normal(size=(20, 8)).astype(np.float32), random_projection(12, 8), description)
    restored = PatchBank.from_bytes(bank.to_bytes())
    assert restored.description == description
    np.testing.assert_array_equal(restored.patches, bank.patches)
    np.testing.assert_array_equal(restored.projection, bank.projection)
    # A bank saved before there was a choice holds no description: the stages were its only one.
    from safetensors.numpy import save
    older = save({"patches": bank.patches, "projection": bank.projection})
    assert PatchBank.from_bytes(older).description == "stages"
    with pytest.raises(ValueError, match="description"):
        PatchBank(bank.patches, bank.projection, "colour")


def test_the_bank_survives_bytes_and_scores_alike():
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=32, base_width=8, latent_dim=16)).eval()
    with torch.no_grad():
        batches = [model(torch.rand(4, 3, 32, 32), features=True)["features"] for _ in range(3)]
        bank = build_patch_bank(batches, size=64, dim=16)
        restored = PatchBank.from_bytes(bank.to_bytes())
        np.testing.assert_array_equal(restored.patches, bank.patches)
        query = model(torch.rand(2, 3, 32, 32), features=True)["features"]
        torch.testing.assert_close(restored.distance_map(query), bank.distance_map(query))
    assert bank.distance_map(query).shape == (2, 8, 8)  # a quarter of the 32 px input


def test_the_device_search_finds_what_faiss_finds():
    """On a GPU the nearest-patch search is a chunked matrix product on the device (no host round
    trip); run here on the CPU, it must give faiss's exact distances, chunk boundaries included."""
    generator = np.random.default_rng(3)
    bank = PatchBank(generator.normal(size=(500, 16)).astype(np.float32),
                     random_projection(24, dim=16, seed=1))
    queries = torch.from_numpy(generator.normal(size=(777, 16)).astype(np.float32))
    exact = bank._faiss_nearest(queries)
    for chunk in (500 * 100, 500 * 777, 1):  # several chunks with a ragged last one; one chunk; a row at a time
        torch.testing.assert_close(bank._nearest_on_device(queries, chunk_elements=chunk), exact,
                                   rtol=1e-4, atol=1e-3)
    # Through distance_map: the device path's map equals the faiss map (the path is chosen by device).
    features = [torch.rand(2, 4, 12, 12), torch.rand(2, 8, 6, 6), torch.rand(2, 16, 3, 3)]  # the stem's, two stages'
    located = project(patch_descriptions(features[1:]), bank.projection).reshape(-1, 16)
    torch.testing.assert_close(bank._nearest_on_device(located).clamp_min(0).sqrt().view(2, 6, 6),
                               bank.distance_map(features), rtol=1e-4, atol=1e-3)


def test_a_place_unlike_the_training_patches_is_the_farthest():
    """Smooth grey images train the memory; a bright checkerboard square in one corner of a new
    image is the place the bank has never seen."""
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=64, base_width=8, latent_dim=16)).eval()
    ramp = torch.linspace(0.3, 0.6, 64)
    with torch.no_grad():
        normals = [(ramp[None, None, :, None] * torch.ones(4, 3, 64, 64) + 0.02 * torch.rand(4, 3, 64, 64))
                   for _ in range(4)]
        bank = build_patch_bank([model(x, features=True)["features"] for x in normals], size=256, dim=32)
        odd = normals[0][:1].clone()
        checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
        odd[..., 40:56, 40:56] = checker.float()
        distances = bank.distance_map(model(odd, features=True)["features"])[0]  # (16, 16)
    peak = divmod(int(distances.argmax()), 16)
    assert 9 <= peak[0] <= 14 and 9 <= peak[1] <= 14, f"the farthest patch is at {peak}, not over the square"


def test_the_calibration_pass_scores_the_held_out_rows_and_describes_the_rest(tmp_path):
    """The train job's calibration pass: every row gets its latent and stem statistics, only the
    held-out rows get scores (the calibration reads no other row's), and those are what the
    embed job's scorer gives the same images, patch scores included."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.inference import ImageScorer, load_inference_model
    from pipeline.train.export import CalibrationScorer

    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(image_size=32, base_width=8, latent_dim=16)).eval()
    with torch.no_grad():
        bank = build_patch_bank([model(torch.rand(4, 3, 32, 32), features=True)["features"] for _ in range(2)],
                                size=32, dim=16)
    save_checkpoint(str(tmp_path / "m"), model, patch_bank=bank)
    generator = np.random.default_rng(0)
    batch = {"id": np.array([f"r{i}" for i in range(10)], dtype=object),
             "pixels": generator.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
             "ok": np.array([True] * 9 + [False]),
             "val": np.array([True, False, False, True, False, False, False, True, False, True])}
    rows = CalibrationScorer(str(tmp_path / "m"))(batch)
    val = batch["val"][:9]
    np.testing.assert_array_equal(rows["val"], val)
    assert list(rows["id"]) == [f"r{i}" for i in range(9)]

    folded, _ = load_inference_model(str(tmp_path / "m"))
    x = torch.from_numpy(batch["pixels"][:9]).permute(0, 3, 1, 2).float() / 255
    expected = ImageScorer(folded, precision="auto", patch_bank=bank).rows(x)
    assert {"patch_knn_max", "mse", "ssim_top"} <= set(rows)
    for name, values in expected.items():
        if name in ("z", "stem_stats"):  # every row's
            np.testing.assert_allclose(rows[name], values, rtol=1e-4, atol=1e-5)
        else:  # the held-out rows' only
            np.testing.assert_allclose(rows[name][val], values[val], rtol=1e-4, atol=1e-6)
            assert np.isnan(rows[name][~val]).all(), name
    # A batch with no held-out row (or no bank row) has the same columns, so the blocks line up.
    for held_out in (False, True):
        alike = CalibrationScorer(str(tmp_path / "m"))({**batch, "val": np.full(10, held_out)})
        assert set(alike) == set(rows) and all(len(v) == 9 for v in alike.values())


@pytest.mark.ray
def test_fuse_names_single_scores_that_the_model_will_compute():
    """train --fuse: the fused score's parts, refused before any work when one is not a single score
    or needs what the run will not build."""
    from jobs.train import parse_args
    from pipeline.errors import InputError
    from pipeline.scores import FUSED_FROM

    base = ["--data", "d", "--out", "o"]
    assert parse_args(base).fuse == FUSED_FROM
    fuse = parse_args([*base, "--patch-bank", "64", "--fuse", " mse, patch_knn_max,mse "]).fuse
    assert fuse == ("mse", "patch_knn_max")
    assert parse_args([*base, "--defect-head", "--fuse", "defect_top,stem_knn"]).fuse == ("defect_top", "stem_knn")
    for fuse, told in (("mse,fused,nope", "fused, nope, which are not a single score; name one or more of: mse"),
                       (",", "fuse names no score"),
                       ("mse,patch_knn_max", "patch_knn_max, which needs a model trained with --patch-bank N"),
                       ("defect_max", "defect_max, which needs a model trained with --defect-head")):
        with pytest.raises(InputError, match=told):
            parse_args([*base, "--fuse", fuse])


@pytest.mark.parametrize("description", ["stages", "texture"])
def test_the_train_job_builds_a_patch_bank_that_survives_export_load_and_embedding(ray_local, tmp_path, description):
    """--patch-bank N: the exported model carries N training patches under its digest, calibrated
    patch scores for its held-out images, and the embed job computes them when asked; with
    --patch-features texture its places are described by the stem's window statistics."""
    from jobs.train import parse_args
    from pipeline.checkpoint import PATCH_BANK_FILE, CheckpointError, load_checkpoint, scores_of
    from pipeline.checkpoint import read_checkpoint_meta
    from pipeline.embed import EmbedConfig, embed
    from pipeline.inference import ImageScorer, load_inference_model
    from pipeline.latents import read_latents
    from pipeline.scores import FUSED_FROM
    from pipeline.synth import synthetic_image, write_synthetic_corpus
    from pipeline.thresholds import Calibration
    from pipeline.train import train
    from pipeline.train.export import patch_projection

    data = tmp_path / "shards"
    write_synthetic_corpus(str(data), n=240, image_size=32, anomaly_fraction=0.0, seed=4, rows_per_shard=120)
    # The texture memory's patch peak fused as one more part (--fuse); the stages' model keeps the default parts.
    fuse = ["--fuse", ",".join((*FUSED_FROM, "patch_knn_max"))] if description == "texture" else []
    cfg = parse_args(["--data", str(data), "--out", str(tmp_path / "run"), "--image-size", "32", "--latent-dim", "16",
                      "--base-width", "8", "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.1",
                      "--patch-bank", "300", "--patch-sampler", "coreset", "--patch-features", description, *fuse])
    assert (cfg.patch_bank, cfg.patch_sampler, cfg.patch_features) == (300, "coreset", description)
    assert cfg.fuse == ((*FUSED_FROM, "patch_knn_max") if fuse else FUSED_FROM)
    result = train(cfg)

    exported = load_checkpoint(result.model_url)
    assert exported.patch_bank is not None and exported.patch_bank.patches.shape == (300, 64)
    assert exported.patch_bank.description == description
    gathered_in = patch_projection(exported.model, exported.config, cfg.seed, description)
    if description == "stages":  # the random projection every scorer rebuilds from the model and the run's seed
        np.testing.assert_array_equal(exported.patch_bank.projection, gathered_in)
    else:  # the stem's 8 channels' mean and spread in two windows and their peak, each scaled by its spread, projected
        assert gathered_in.shape == (40, 40) and exported.patch_bank.projection.shape == (40, 64)
        assert (exported.patch_bank.projection != 0).all()
    assert {"patch_knn_max", "patch_knn_top"} <= set(scores_of(read_checkpoint_meta(result.model_url)))
    calibration = Calibration.from_dict(exported.calibration)
    held_out = calibration.get("mse").count
    assert calibration.get("patch_knn_max").count == calibration.get("patch_knn_top").count == held_out > 0
    assert calibration.fused_from == cfg.fuse

    # A place unlike every training patch: a bright checkerboard pasted on a normal image.
    model, checkpoint = load_inference_model(result.model_url)
    scorer = ImageScorer(model, scores=("patch_knn_max",), patch_bank=checkpoint.patch_bank)
    normal = torch.from_numpy(np.stack([synthetic_image(i, 9, 32, 3) for i in range(8)])).permute(0, 3, 1, 2) / 255
    odd = normal.clone()
    odd[..., 8:24, 8:24] = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float()
    normal_scores, odd_scores = (scorer(x.float())["scores"]["patch_knn_max"] for x in (normal, odd))
    assert (odd_scores > normal_scores).all(), (odd_scores, normal_scores)

    # The embed job: the default scores are fused's parts (with --fuse, the patch peak) and mse;
    # --scores all computes both patch scores. `fused` reads its parts as the calibration says.
    for scores, expect in ((None, False), ("all", True)):
        out = str(tmp_path / f"latents-{scores}")
        embed(EmbedConfig(data_url=str(data), model_url=result.model_url, out_url=out, scores=scores))
        table = read_latents(out)
        assert table.num_rows == 240 and ("patch_knn_top" in table.column_names) == expect
        assert ("patch_knn_max" in table.column_names) == (expect or description == "texture")
        if expect:
            assert np.isfinite(table.column("patch_knn_top").to_numpy()).all()
        parts = {name: table.column(name).to_numpy() for name in calibration.fused_from}
        np.testing.assert_allclose(table.column("fused").to_numpy(), calibration.fuse(parts), rtol=1e-5, atol=1e-5)

    # Its digest guards it like the training bank.
    bank_file = tmp_path / "run" / "model" / PATCH_BANK_FILE
    bank_file.write_bytes(bank_file.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="does not match the digest"):
        load_checkpoint(result.model_url)
