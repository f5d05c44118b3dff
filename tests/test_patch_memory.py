"""The local feature memory: coreset picks, a bank that survives bytes, and distances that find
the place a model has never seen the like of."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model import AutoencoderConfig, build_model
from pipeline.patch_memory import PatchBank, build_patch_bank, greedy_coreset, patch_descriptions, subsample


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
