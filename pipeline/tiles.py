"""Tiles: a large image seen by the model at working resolution, one model-sized square at a time.

The model's input is small (64-128 px) and a whole 512 px photograph shrunk to that size loses
a 2-pixel crack. Tiled, the image stays at its working resolution S and is cut into T x T
tiles, the model's input, every `stride` pixels along each side; the last tile of a row or
column sits flush with the image's edge, so every pixel is covered and no tile hangs over.
Per-tile maps (an error map, a patch distance map) are put back where their tiles came from
and averaged where tiles overlap: the image's map at working resolution, which its image
scores are pooled from.

Order: tiles of an image are row-major (top to bottom, left to right), and a batch's tiles
are image-major, so the tiles of image b are rows b * count ... (b + 1) * count - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start offsets along one side of `length` pixels: every `stride`, the last flush with the end."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got tile {tile} and stride {stride}")
    if length < tile:
        raise ValueError(f"a side of {length} px is shorter than a {tile} px tile")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of an H x W image lie: `tile` pixels a side, a new one every `stride`."""

    height: int
    width: int
    tile: int
    stride: int

    def __post_init__(self) -> None:
        if self.stride > self.tile:
            raise ValueError(f"a stride of {self.stride} px over {self.tile} px tiles would leave gaps")
        tile_starts(self.height, self.tile, self.stride)  # raises for an image smaller than a tile
        tile_starts(self.width, self.tile, self.stride)

    @classmethod
    def square(cls, size: int, tile: int, stride: int | None = None) -> TileGrid:
        """Tiles of a size x size image; by default each overlaps its neighbour by half."""
        return cls(size, size, tile, stride or max(1, tile // 2))

    @cached_property
    def rows(self) -> tuple[int, ...]:
        return tile_starts(self.height, self.tile, self.stride)

    @cached_property
    def columns(self) -> tuple[int, ...]:
        return tile_starts(self.width, self.tile, self.stride)

    @property
    def count(self) -> int:
        """Tiles per image."""
        return len(self.rows) * len(self.columns)

    @cached_property
    def positions(self) -> tuple[tuple[int, int], ...]:
        """(top, left) of every tile, row-major."""
        return tuple((top, left) for top in self.rows for left in self.columns)

    @cached_property
    def coverage(self) -> torch.Tensor:
        """(H, W) how many tiles cover each pixel (at least 1)."""
        counts = torch.zeros(self.height, self.width)
        for top, left in self.positions:
            counts[top:top + self.tile, left:left + self.tile] += 1
        return counts

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * count, C, tile, tile), image-major, row-major within an image."""
        if tuple(images.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"images of {tuple(images.shape[-2:])} px do not fit a grid of "
                             f"{(self.height, self.width)} px")
        t = self.tile
        tiles = torch.stack([images[:, :, top:top + t, left:left + t] for top, left in self.positions], dim=1)
        return tiles.flatten(0, 1)  # (B * count, C, t, t)

    def assemble(self, maps: torch.Tensor) -> torch.Tensor:
        """(B * count, ..., h, w) per-tile maps (or images) -> (B, ..., H, W): each resized to its
        tile (bilinear when it is coarser), put where its tile came from, and averaged where tiles
        overlap."""
        n = maps.shape[0]
        if n % self.count:
            raise ValueError(f"{n} tile maps are not a whole number of images of {self.count} tiles")
        t, lead = self.tile, tuple(maps.shape[1:-2])
        maps = maps.float()
        if tuple(maps.shape[-2:]) != (t, t):
            maps = torch.nn.functional.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=(t, t),
                                                   mode="bilinear", align_corners=False).view(n, *lead, t, t)
        per_image = maps.reshape(n // self.count, self.count, *lead, t, t)
        total = per_image.new_zeros(n // self.count, *lead, self.height, self.width)
        for i, (top, left) in enumerate(self.positions):
            total[..., top:top + t, left:left + t] += per_image[:, i]
        return total / self.coverage.to(total.device)

    def images_per_call(self, max_tiles: int) -> int:
        """How many images' tiles fit in one model call of at most `max_tiles` tiles (at least one image)."""
        return max(1, max_tiles // self.count)

    def mean_per_image(self, values: torch.Tensor) -> torch.Tensor:
        """(B * count, ...) per-tile values -> (B, ...) their mean over each image's tiles (the
        image latent of a tiled model)."""
        return values.view(-1, self.count, *values.shape[1:]).mean(dim=1)


def random_tiles(images: torch.Tensor, tile: int, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B * per_image, C, tile, tile): tiles at uniformly random positions, for training."""
    batch, _, height, width = images.shape
    if height < tile or width < tile:
        raise ValueError(f"images of {height}x{width} px are smaller than a {tile} px tile")
    tops = torch.randint(0, height - tile + 1, (batch, per_image), generator=generator)
    lefts = torch.randint(0, width - tile + 1, (batch, per_image), generator=generator)
    rows = torch.arange(tile)
    # Gather by index: (B, per_image, tile) row and column indices of every tile.
    row_index = (tops[..., None] + rows).to(images.device)
    column_index = (lefts[..., None] + rows).to(images.device)
    b = torch.arange(batch, device=images.device)[:, None, None, None]
    picked = images.permute(0, 2, 3, 1)[b, row_index[..., :, None], column_index[..., None, :]]  # (B, n, t, t, C)
    return picked.permute(0, 1, 4, 2, 3).flatten(0, 1)
