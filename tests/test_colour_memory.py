"""The colour memory (pipeline.colour_memory): rare colours score high, where they are, and the
memory travels with the exported model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.colour_memory import LEVELS, ColourMemory, colour_bins, sample_bins, samples_per_input
from pipeline.model import AutoencoderConfig, build_model

BLUE, SAND, RED = (60, 90, 170), (200, 180, 120), (180, 40, 40)


def _two_tone(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: blue left, sand right, split at a random column, with a little noise."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        split = rng.integers(4, size - 4)
        images[i, :, :split], images[i, :, split:] = BLUE, SAND
    return np.clip(images + rng.normal(0, 3, images.shape), 0, 255).astype(np.uint8)


def _input(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def test_bins_are_channel_major_and_cover_every_pixel_value():
    x = torch.tensor([[0, 0, 0], [255, 255, 255], [8, 16, 255]], dtype=torch.float32).T.reshape(1, 3, 1, 3) / 255
    level = [8 * LEVELS // 255, 16 * LEVELS // 255]
    assert colour_bins(x).tolist() == [[[0, LEVELS ** 3 - 1, (level[0] * LEVELS + level[1]) * LEVELS + LEVELS - 1]]]
    grey = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16) / 255
    assert colour_bins(grey).min() == 0 and colour_bins(grey).max() == LEVELS - 1
    every = torch.arange(256, dtype=torch.float32).repeat(3, 1).reshape(1, 3, 16, 16) / 255
    expected = (every * LEVELS).floor().clamp(0, LEVELS - 1).int()
    expected = (expected[:, 0] * LEVELS + expected[:, 1]) * LEVELS + expected[:, 2]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an embed forward pass's context changes no bin
        assert torch.equal(colour_bins(every), expected)


def test_a_colour_never_seen_is_rarer_than_the_training_colours_and_its_place_shows():
    memory = ColourMemory.from_pixels(_two_tone(200), seed=0)
    normal = _two_tone(1, seed=1)
    stained = normal.copy()
    stained[0, 4:10, 20:26] = RED
    rarity = memory.rarity_map(_input(np.concatenate([normal, stained]))).numpy()
    assert rarity[0].max() < rarity[1, 4:10, 20:26].min(), "every training colour is commoner than the stain's"
    peak = np.unravel_index(rarity[1].argmax(), rarity[1].shape)
    assert 4 <= peak[0] < 10 and 20 <= peak[1] < 26, peak
    # A whole image in swapped channels is made of colours the memory has not seen either.
    swapped = normal[..., [2, 0, 1]]
    assert memory.rarity_map(_input(swapped)).mean() > rarity[0].max()
    # Each pixel's value is its bin's rarity (the lookup reads int32 bins).
    x = _input(np.concatenate([normal, stained, swapped]))
    assert np.array_equal(memory.rarity_map(x).numpy(), memory.rarity[colour_bins(x).numpy()])


def test_grey_images_have_a_grey_memory():
    rng = np.random.default_rng(0)
    mid = rng.integers(100, 160, (100, 16, 16, 1), dtype=np.uint8)
    memory = ColourMemory.from_pixels(mid, seed=0)
    assert memory.channels == 1 and memory.counts.shape == (LEVELS,)
    dark = np.full((1, 16, 16, 1), 10, np.uint8)
    assert memory.rarity_map(_input(dark)).min() > memory.rarity_map(_input(mid[:1])).max()
    with pytest.raises(ValueError, match="1-channel"):
        memory.rarity_map(torch.rand(1, 3, 16, 16))


def test_sampling_draws_the_asked_number_of_pixels_of_each_image():
    x = _input(_two_tone(5))
    bins = sample_bins(x, 7, np.random.default_rng(0))
    assert bins.shape == (35,) and set(bins) <= set(colour_bins(x).unique().tolist())
    assert samples_per_input(10, 32 * 32) == 32 * 32, "never more than an image's pixels"
    assert samples_per_input(1e9, 32 * 32) == 64, "at least 64 of each image"


def test_a_memory_needs_counted_pixels_of_the_right_shape():
    with pytest.raises(ValueError, match="at least one"):
        ColourMemory(np.zeros((LEVELS,) * 3))
    with pytest.raises(ValueError, match="bins per channel"):
        ColourMemory(np.ones((LEVELS, 7)))


def test_the_memory_survives_export_and_load_and_its_scores_are_computed(tmp_path):
    """Saved with a checkpoint (digest checked), loaded back alike, and the model's scores then
    include colour_max / colour_top, higher for the stained image."""
    from pipeline.checkpoint import COLOUR_FILE, CheckpointError, load_checkpoint, save_checkpoint
    from pipeline.inference import ImageScorer, load_inference_model

    memory = ColourMemory.from_pixels(_two_tone(100), seed=0)
    model = build_model(AutoencoderConfig(image_size=32, base_width=8, latent_dim=16)).eval()
    save_checkpoint(str(tmp_path / "m"), model, colours=memory)
    loaded = load_checkpoint(str(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.colours.counts, memory.counts)
    np.testing.assert_array_equal(loaded.colours.rarity, memory.rarity)
    assert {"colour_max", "colour_top"} <= set(loaded.scores)
    assert "colour_top" not in load_checkpoint(str(_saved_without(tmp_path, model))).scores

    folded, checkpoint = load_inference_model(str(tmp_path / "m"))
    normal = _two_tone(1, seed=3)
    stained = normal.copy()
    stained[0, 10:18, 10:18] = RED
    scores = ImageScorer(folded, colours=checkpoint.colours)(_input(np.concatenate([normal, stained])))["scores"]
    assert scores["colour_top"][1] > scores["colour_top"][0] and scores["colour_max"][1] > scores["colour_max"][0]

    (tmp_path / "m" / COLOUR_FILE).write_bytes(ColourMemory.from_pixels(_two_tone(10, seed=9), seed=1).to_bytes())
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(str(tmp_path / "m"))


def _saved_without(tmp_path, model):
    from pipeline.checkpoint import save_checkpoint

    save_checkpoint(str(tmp_path / "plain"), model)
    return tmp_path / "plain"


def test_the_export_pass_counts_only_decoded_training_rows():
    """train's colour pass: pixels of the rows that decoded and are not held out, the same draw on a rerun."""
    from pipeline.train.export import colour_samples

    pixels = _two_tone(6)
    pixels[1] = RED  # held out: not counted
    pixels[2] = RED  # failed to decode: not counted
    batch = {"id": np.array([f"r{i}" for i in range(6)], dtype=object), "pixels": pixels,
             "ok": np.array([True, True, False, True, True, True]),
             "val": np.array([False, True, False, False, False, False])}
    first = colour_samples(batch, per_input=50, seed=3)["bins"]
    assert len(first) == 4 * 50
    red_bin = int(colour_bins(_input(pixels[1:2]))[0, 0, 0])
    assert red_bin not in set(first.tolist())
    np.testing.assert_array_equal(first, colour_samples(batch, per_input=50, seed=3)["bins"])
    assert len(colour_samples({**batch, "val": np.ones(6, bool)}, per_input=50, seed=3)["bins"]) == 0
