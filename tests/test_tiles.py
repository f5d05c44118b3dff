"""Tiles cut and reassemble exactly: a map made per tile comes back where its pixels were."""

from __future__ import annotations

import pytest
import torch

from pipeline.tiles import TileGrid, random_tiles, tile_starts


def test_starts_cover_the_side_and_end_flush():
    assert tile_starts(200, 64, 32) == (0, 32, 64, 96, 128, 136)
    assert tile_starts(64, 64, 32) == (0,)
    assert tile_starts(128, 64, 64) == (0, 64)
    with pytest.raises(ValueError, match="shorter than"):
        tile_starts(40, 64, 32)


def test_a_stride_wider_than_the_tile_is_refused():
    with pytest.raises(ValueError, match="gaps"):
        TileGrid(256, 256, 64, 80)


def test_identity_maps_reassemble_into_the_image_exactly():
    images = torch.rand(2, 3, 200, 176)
    grid = TileGrid(200, 176, 64, 24)
    tiles = grid.cut(images)
    assert tiles.shape == (2 * grid.count, 3, 64, 64)
    # The tile of image 1 at row-major position 7 is that image's crop at positions[7].
    top, left = grid.positions[7]
    assert torch.equal(tiles[grid.count + 7], images[1, :, top:top + 64, left:left + 64])
    assembled = grid.assemble(tiles[:, 0])
    assert assembled.shape == (2, 200, 176)
    torch.testing.assert_close(assembled, images[:, 0])
    torch.testing.assert_close(grid.assemble(tiles), images)  # whole tiles, every channel
    assert grid.coverage.min() >= 1


def test_a_small_defect_comes_back_where_it_was_from_coarse_tile_maps():
    clean = torch.zeros(1, 1, 512, 512)
    defect = clean.clone()
    defect[..., 301:304, 97:99] = 1.0  # a 3 x 2 px mark
    grid = TileGrid.square(512, 64, 32)
    error = (grid.cut(defect) - grid.cut(clean)).pow(2)[:, 0]  # (count, 64, 64)
    coarse = torch.nn.functional.avg_pool2d(error[:, None], 2)[:, 0]  # maps at half the tile's resolution
    assembled = grid.assemble(coarse)[0]
    peak = divmod(int(assembled.argmax()), 512)
    assert abs(peak[0] - 302) <= 2 and abs(peak[1] - 98) <= 2
    far = assembled.clone()
    far[290:315, 85:110] = 0
    assert float(far.max()) == 0.0  # nothing lights up away from the mark


def test_mean_per_image_averages_each_images_tiles():
    grid = TileGrid.square(128, 64, 64)
    values = torch.arange(2 * grid.count * 3, dtype=torch.float32).view(2 * grid.count, 3)
    means = grid.mean_per_image(values)
    torch.testing.assert_close(means[1], values[grid.count:].mean(dim=0))


def test_random_tiles_are_crops_of_their_own_image():
    images = torch.rand(3, 1, 90, 70)
    tiles = random_tiles(images, 32, 4, torch.Generator().manual_seed(0))
    assert tiles.shape == (12, 1, 32, 32)
    for i, tile in enumerate(tiles):
        source = images[i // 4, 0]
        windows = source.unfold(0, 32, 1).unfold(1, 32, 1)  # (59, 39, 32, 32)
        matches = (windows == tile[0]).flatten(2).all(dim=2)
        assert matches.any(), f"tile {i} is not a crop of image {i // 4}"
