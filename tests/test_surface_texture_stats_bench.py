"""bench/surface_texture_stats.py describes windows and scores images as its docstring says (fast: no model)."""

from __future__ import annotations

import numpy as np
import torch

from bench.surface_texture_stats import farthest_window, feature_map, window_statistics
from bench.surfaces import auroc


def test_window_statistics_are_each_windows_mean_and_spread():
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, :4, :4] = 1.0  # channel 0: one window of ones, then a half-covered one, then zeros
    maps[0, 1] = torch.arange(8.0).repeat(8, 1)  # channel 1: a ramp along the rows
    described = window_statistics(maps, 4)
    assert described.shape == (1, 9, 4)  # 3 x 3 windows of 4 px, one every 2 px; mean and spread of 2 channels
    first, second, last = described[0, 0], described[0, 1], described[0, 8]
    assert first[0] == 1.0 and first[2] == 0.0  # uniform ones: mean 1, no spread
    assert second[0] == 0.5 and np.isclose(second[2], 0.5)  # half ones: mean 0.5, spread 0.5
    assert last[0] == 0.0 and last[2] == 0.0
    assert np.isclose(first[1], 1.5) and np.isclose(first[3], np.std([0, 1, 2, 3]), atol=1e-5)


def test_the_farthest_window_finds_a_small_bright_defect_on_noise():
    rng = np.random.default_rng(0)
    texture = rng.uniform(0.3, 0.7, (41, 64, 64, 1)).astype(np.float32)
    texture[-1, 20:26, 30:36] = 1.0  # the last image: a 6 px bright square
    described = window_statistics(torch.from_numpy(texture).permute(0, 3, 1, 2), 8)
    scores = farthest_window(described[:30], described[30:], memory=5_000)
    assert scores[-1] > 2 * scores[:-1].max()  # far beyond every clean image's farthest window


def test_the_surfaces_auroc_of_a_kind_reads_only_that_kind_and_the_normals():
    kinds = np.array(["", "", "", "crack", "crack", "speck"], dtype=object)
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.0])
    assert auroc(scores, kinds, "crack") == 1.0
    assert auroc(scores, kinds, "speck") == 0.0
    assert auroc(scores, kinds) == 2 / 3  # the speck ranks below every normal image


def test_the_pixels_source_needs_no_model():
    pixels = np.full((2, 16, 16, 1), 255, dtype=np.uint8)
    maps = feature_map(None, pixels, "pixels")
    assert maps.shape == (2, 1, 16, 16) and float(maps.max()) == 1.0
