"""Scores: (image, reconstruction, training bank) -> one number per image, larger = more anomalous.

Training, embedding, reports and benchmarks all take their scores from here, so a score
means the same thing everywhere. Which scores exist, and what each reads, is the registry
in `pipeline.scores`; this module computes them (`ScoreInputs`, `compute_scores`). The
threshold policy that turns a score into flags is `pipeline.thresholds` (NumPy only).

Per-image errors compare images in [0, 1] pixel space, shape (B, C, H, W), and return one
value per image, shape (B,):
- `mse_per_image`: mean squared error, in [0, 1].
- `ssim_error_per_image`: 1 - SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  mean over the valid region and the channels, as scikit-image's
  `structural_similarity(gaussian_weights=True, use_sample_covariance=False, data_range=1)`),
  in [0, 2]; 0 means identical structure. This exact SSIM is the `--loss ssim_l1` training
  loss and the benches' image-quality measure; the anomaly scores read a cheaper SSIM made on
  the map grid (`_grid_ssim`).
- `squared_error_map`: the per-pixel squared error (mean over channels) the galleries show.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.scores import DEFAULT_SCORE, FUSED_FROM, SCORES, names_needing
from pipeline.thresholds import Calibration, calibrate
from pipeline.tiles import TileGrid

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def mse_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) mean squared error; computed in float32.

    One reduction over (C, H, W) whatever the memory format: flattening the model's
    channels_last output copied it first, and a mean over its channels alone (the squared
    error map) is a slow innermost reduction; either made this several times slower."""
    return torch.sub(x.float(), x_hat.float()).square_().mean(dim=(1, 2, 3))


def _channel_mean(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) float32, the mean over channels as a sum of channel planes: on the
    model's channels_last tensors a mean over dim 1 is an innermost reduction, twice as slow."""
    total = maps[:, 0].float().clone()
    for channel in range(1, maps.shape[1]):
        total.add_(maps[:, channel])
    return total.mul_(1.0 / maps.shape[1])


def squared_error_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B, H, W) squared error per pixel, mean over channels."""
    return _channel_mean(torch.sub(x.float(), x_hat.float()).square_())


@functools.lru_cache(maxsize=64)
def _gaussian_band(size: int, sigma: float, radius: int, valid: bool, device: str) -> torch.Tensor:
    """A (size, out) matrix: right-multiplying an (..., size) tensor by it applies a 1-D Gaussian.

    valid=True: only where the whole window fits (out = size - 2 * radius), as SSIM's
    definition has it. valid=False ("same", out = size): near the border the window is cut and
    renormalised over the pixels that exist, so a border pixel is neither darkened nor mirrored.
    The separable Gaussian as two banded matrix products does more arithmetic than a depthwise
    convolution, but BLAS runs it about ten times faster than the CPU's depthwise kernels.
    """
    index = torch.arange(size, dtype=torch.float32, device=device)
    offset = index[:, None] - index[None, :]  # (size, size): input row - output column
    weights = torch.exp(-offset.pow(2) / (2 * sigma**2)) * (offset.abs() <= radius)
    if valid:
        weights = weights[:, radius:size - radius]
    return (weights / weights.sum(dim=0, keepdim=True)).contiguous()


def blur(maps: torch.Tensor, sigma: float, radius: int | None = None, valid: bool = False) -> torch.Tensor:
    """Gaussian blur over the last two dimensions of (..., H, W) (see `_gaussian_band`)."""
    radius = int(math.ceil(3 * sigma)) if radius is None else radius
    height, width = maps.shape[-2:]
    device = str(maps.device)
    rows = _gaussian_band(width, float(sigma), radius, valid, device)
    columns = _gaussian_band(height, float(sigma), radius, valid, device)
    return columns.T @ (maps @ rows)


def _ssim_per_pixel(x: torch.Tensor, y: torch.Tensor, valid: bool) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, C, H', W') SSIM at every pixel (valid region, or same size).

    The five local statistics are blurred in one call. Scoring (no gradient) then runs the
    formula in place on their buffer: on a CPU the elementwise passes, not the blur, are most
    of SSIM's cost. Training through SSIM (`--loss ssim_l1`) takes the same formula out of
    place, which autograd needs.
    """
    channels = x.shape[1]
    differentiable = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if differentiable:
        stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    else:
        stats = torch.empty((x.shape[0], 5 * channels, *x.shape[2:]), dtype=torch.float32, device=x.device)
        stats[:, :channels], stats[:, channels:2 * channels] = x, y
        torch.mul(x, x, out=stats[:, 2 * channels:3 * channels])
        torch.mul(y, y, out=stats[:, 3 * channels:4 * channels])
        torch.mul(x, y, out=stats[:, 4 * channels:])
    mu_x, mu_y, xx, yy, xy = blur(stats, SSIM_SIGMA, SSIM_WINDOW // 2, valid).split(channels, dim=1)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_xy = mu_x * mu_y
    if differentiable:
        squares = mu_x.square() + mu_y.square()
        return (2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2) / ((squares + c1) * (xx + yy - squares + c2))
    squares = mu_x.square_().add_(mu_y.square_())  # mu_x^2 + mu_y^2
    structure = xy.sub_(mu_xy).mul_(2).add_(c2)  # 2 cov + c2
    spread = xx.add_(yy).sub_(squares).add_(c2)  # var_x + var_y + c2
    return mu_xy.mul_(2).add_(c1).mul_(structure).div_(squares.add_(c1).mul_(spread))


def ssim_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) structural similarity in [-1, 1]; needs H, W >= 11."""
    return _ssim_per_pixel(x.float(), x_hat.float(), valid=True).flatten(1).mean(dim=1)


def ssim_error_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) 1 - SSIM, in [0, 2]."""
    return 1.0 - ssim_per_image(x, x_hat)


# ---------------------------------------------------------------- anomaly maps and local scores
#
# A small defect (a scratch, a blot) moves a whole-image mean very little: it hides among the
# errors of normal images. A map of where the reconstruction differs, pooled by its peak or by
# the mean of its worst TOP_SHARE of cells, keeps the defect's signal. Three maps, larger = worse:
# - "err": the squared error (mean over channels);
# - "ssim": 1 - SSIM (mean over channels), its local statistics gathered on the grid (`_grid_ssim`);
# - "gms": 1 - multi-scale gradient-magnitude similarity (MSGMS, as RIAD scores anomalies):
#   edges missing or added, at scales 1, 1/2, 1/4 and 1/8 of the grey image, averaged.
# Each is smoothed to a grid of about MAP_CELLS cells a side: averaged over cells of `map_stride`
# pixels, then blurred with a Gaussian of one cell (so one noisy pixel is never a peak, and a
# defect counts by its area at the scale of a 32nd of the image). The grid is what the scores
# pool, and it is cheap: the pooling and the blur run on a quarter of the pixels or fewer.
# `upsample` brings a map back to the image's size for display.

MAP_CELLS = 32
GMS_C = 0.0026  # GMS's stabiliser for [0, 1] images (RIAD)
GMS_SCALES = 4
TOP_SHARE = 0.05  # "top": the mean of the worst 5% of a map's cells (the share: an unrecorded note, no script)


def map_stride(side: int) -> int:
    """Pixels per map cell along a side of `side` pixels (1 for images of MAP_CELLS or fewer)."""
    return max(1, round(side / MAP_CELLS))


def _cell_means(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size): the mean over each cell. Where square cells tile the image
    exactly, as sums of strided slices (rows first, whose runs are contiguous): several times
    faster on a CPU than adaptive pooling, which does the rest."""
    (height, width), (rows, columns) = maps.shape[-2:], size
    k = height // rows
    if (height, width) == (k * rows, k * columns):
        by_rows = sum(maps[..., i::k, :] for i in range(k))
        return sum(by_rows[..., i::k] for i in range(k)).mul_(1.0 / (k * k))
    return torch.nn.functional.adaptive_avg_pool2d(maps, size)


def _resample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, *size): cell means when finer, bilinear when coarser."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    if maps.shape[-2] >= size[0]:
        return _cell_means(maps[:, None], size)[:, 0]
    return torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _on_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) per-pixel map -> (B, *size) on the map grid, blurred by one cell."""
    return blur(_resample(maps, size), 1.0)


def _grid_size(x: torch.Tensor) -> tuple[int, int]:
    stride = map_stride(min(x.shape[-2:]))
    return -(-x.shape[-2] // stride), -(-x.shape[-1] // stride)


def _gradient_magnitude(grey: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) Prewitt gradient magnitude, zero outside the image; as slices, which
    a CPU runs several times faster than a 3x3 convolution with one input channel."""
    padded = torch.nn.functional.pad(grey, (1, 1, 1, 1))
    across = padded[:, :, 2:] - padded[:, :, :-2]  # (B, H + 2, W): x differences on every row
    down = padded[:, 2:] - padded[:, :-2]  # (B, H, W + 2): y differences on every column
    gx = across[:, :-2] + across[:, 1:-1] + across[:, 2:]
    gy = down[..., :-2] + down[..., 1:-1] + down[..., 2:]
    return gx.square_().add_(gy.square_()).div_(9.0).add_(1e-12).sqrt_()


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): the channels' mean, the grey image the GMS map compares."""
    return _channel_mean(x)


@functools.lru_cache(maxsize=64)
def _cell_blur_band(size: int, cells: int, sigma: float, radius: int, device: str) -> torch.Tensor:
    """A (size, cells) matrix: right-multiplying an (..., size) tensor by it takes the mean over
    each of `cells` cells (adaptive pooling's cells; none when size == cells), then the Gaussian
    blur of `blur` along the grid: both linear, so one banded matrix product does the two."""
    gauss = _gaussian_band(cells, sigma, radius, False, device)
    if size == cells:
        return gauss
    pool = torch.zeros(size, cells, dtype=torch.float32, device=device)
    for cell in range(cells):
        first, last = cell * size // cells, -(-(cell + 1) * size // cells)  # adaptive_avg_pool2d's bounds
        pool[first:last, cell] = 1.0 / (last - first)
    return (pool @ gauss).contiguous()


def _grid_ssim(x: torch.Tensor, x_hat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, *size) SSIM at each cell of the map grid, the mean over the channels.

    SSIM's local statistics (each channel's means, second moments and cross moment) are
    cell means of the per-pixel products, so texture finer than a cell still counts in the
    variances; then Gaussian-weighted over SSIM's window (sigma 1.5 pixels, at least half a
    cell) and put through SSIM's formula once per cell. With one pixel a cell (images of
    MAP_CELLS or fewer) this is scikit-image's SSIM map, pixel for pixel away from the border
    (at the border the window is cut and renormalised, see `blur`). On a 64 px image the
    formula runs on a quarter of the pixels of the exact per-pixel SSIM.

    The cell means and the blur are both linear: each statistic goes to the grid in two matrix
    products (`_cell_blur_band`), one along each side, straight from its per-pixel plane; the two
    second moments, which the formula only adds, go as their sum.
    """
    # Plain NCHW: the products along a side need each row contiguous (the model's output is
    # channels_last). Each statistic goes to the grid on its own: no full-size buffer of them all.
    x, x_hat = x.float().contiguous(), x_hat.float().contiguous()
    cell = x.shape[-1] / size[1]  # pixels per cell
    sigma = max(SSIM_SIGMA / cell, 0.5)
    radius = SSIM_WINDOW // 2 if cell == 1 else int(math.ceil(3 * sigma))
    device = str(x.device)
    across = _cell_blur_band(x.shape[-1], size[1], float(sigma), radius, device)  # (W, w)
    down = _cell_blur_band(x.shape[-2], size[0], float(sigma), radius, device).T.contiguous()  # (h, H)
    planes = x.shape[0] * x.shape[1]

    def on_grid(plane: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, h, w)
        rows = plane @ across  # (B, C, H, w): one matrix product over every row of the batch
        return torch.bmm(down.expand(planes, -1, -1), rows.reshape(planes, *rows.shape[-2:])).view(
            *x.shape[:2], *size)

    mu_a, mu_b = on_grid(x), on_grid(x_hat)
    # The formula reads the two second moments only as their sum: one plane, one pair of products.
    moments, ab = on_grid(torch.addcmul(x * x, x_hat, x_hat)), on_grid(x * x_hat)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_ab = mu_a * mu_b
    squares = mu_a.square_().add_(mu_b.square_())  # mu_a^2 + mu_b^2
    structure = ab.sub_(mu_ab).mul_(2).add_(c2)  # 2 cov + c2
    spread = moments.sub_(squares).add_(c2)  # var_a + var_b + c2
    return mu_ab.mul_(2).add_(c1).mul_(structure).div_(squares.add_(c1).mul_(spread)).mean(dim=1)


def _gms_grid(x: torch.Tensor, x_hat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    a, b = _grey(x), _grey(x_hat)  # (B, H, W)
    total = None
    for scale in range(GMS_SCALES):
        if scale:
            a = torch.nn.functional.avg_pool2d(a[:, None], 2)[:, 0]
            b = torch.nn.functional.avg_pool2d(b[:, None], 2)[:, 0]
        ga, gb = _gradient_magnitude(a), _gradient_magnitude(b)
        similarity = (ga * gb).mul_(2).add_(GMS_C).div_(ga.square_().add_(gb.square_()).add_(GMS_C))
        similarity = _resample(similarity, size)
        total = similarity if total is None else total.add_(similarity)
    return blur(1.0 - total / GMS_SCALES, 1.0)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) grid maps -> (B, *size), bilinear: a map drawn over its image."""
    return torch.nn.functional.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                                           align_corners=False)[:, 0]


def pool_max(maps: torch.Tensor) -> torch.Tensor:
    """(B, h, w) -> (B,) the peak of each map."""
    return maps.flatten(1).amax(dim=1)


def pool_top(maps: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """(B, h, w) -> (B,) the mean of each map's worst `share` of cells (at least one)."""
    flat = maps.flatten(1)
    k = max(1, round(flat.shape[1] * share))
    return flat.topk(k, dim=1, sorted=False).values.mean(dim=1)


POOLS = {"max": pool_max, "top": pool_top}  # a registered score's `pool`, over its map's grid


# ---------------------------------------------------------------- scores by the registry


class ScoreInputs:
    """One batch's inputs to the scores, and what several scores share: each map is computed at
    most once, and only when a requested score reads it (the SSIM and GMS maps are most of the
    cost of scoring).

    x, x_hat: (B, C, H, W) in [0, 1]; z, stem_stats: (B, D) model outputs, for the bank; ids: the
    images' ids (the bank leaves each one's own entry out); bank: a `TrainingBank` or None;
    defect_logits: (B, H, W) from a model with a defect head; features: the model's local maps
    (`model(x, features=True)["features"]`) and patch_bank: a `PatchBank`, for the patch map;
    colours: a `ColourMemory`, for the colour map.

    A tiled model's batch (`grid`, a `TileGrid`): x, x_hat, defect_logits and features are its
    images' tiles (image-major), z and stem_stats the images' own (their tiles' means). The maps
    are made per tile and assembled at working resolution before they are pooled (`image_map`).
    """

    def __init__(self, x: torch.Tensor | None = None, x_hat: torch.Tensor | None = None,
                 z: torch.Tensor | None = None, stem_stats: torch.Tensor | None = None,
                 ids: Sequence[str] | None = None, bank: TrainingBank | None = None,
                 defect_logits: torch.Tensor | None = None, features: list[torch.Tensor] | None = None,
                 patch_bank=None, grid: TileGrid | None = None, colours=None):
        self.x = None if x is None else x.float()
        self.x_hat = None if x_hat is None else x_hat.float()
        self.z, self.stem_stats, self.ids, self.bank = z, stem_stats, ids, bank
        self.defect_logits = defect_logits
        self.features, self.patch_bank, self.colours = features, patch_bank, colours
        self.grid = grid
        self._maps: dict[str, torch.Tensor] = {}

    @functools.cached_property
    def squared(self) -> torch.Tensor:
        """(B, H, W) squared error per pixel."""
        return squared_error_map(self.x, self.x_hat)

    @functools.cached_property
    def ssim(self) -> torch.Tensor:
        """(B, h, w) SSIM on the map grid: one computation serves `ssim_error` (its mean) and the
        ssim map (1 - it, smoothed)."""
        return _grid_ssim(self.x, self.x_hat, _grid_size(self.x))

    def map(self, name: str) -> torch.Tensor:
        """(B, h, w) the anomaly map `name` (ANOMALY_MAPS) on the map grid (of each tile, when tiled)."""
        if name not in self._maps:
            self._maps[name] = _MAKE_MAP[name](self)
        return self._maps[name]

    def image_map(self, name: str) -> torch.Tensor:
        """The map `name` over each whole image, what its scores pool: the map grid's; with tiles,
        the tiles' maps assembled at working resolution, (B, H, W)."""
        if self.grid is None:
            return self.map(name)
        key = f"{name}@image"
        if key not in self._maps:
            self._maps[key] = self.grid.assemble(self.map(name))
        return self._maps[key]

    def per_image(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) per-input values -> per image: as they are, or with tiles their tiles' mean."""
        return values if self.grid is None else self.grid.mean_per_image(values)


_MAKE_MAP: dict[str, Callable[[ScoreInputs], torch.Tensor]] = {
    "err": lambda s: _on_grid(s.squared, _grid_size(s.x)),
    "ssim": lambda s: blur(1.0 - s.ssim, 1.0),
    "gms": lambda s: _gms_grid(s.x, s.x_hat, _grid_size(s.x)),
    # The defect head's probability; a defect's cells pool like an error map's.
    "defect": lambda s: _on_grid(torch.sigmoid(s.defect_logits.float()), _grid_size(s.x)),
    # Each location's distance to its nearest training patch (a quarter of the input's resolution,
    # or 7 x 7 places of it for a texture memory).
    "patch": lambda s: _on_grid(s.patch_bank.distance_map(s.features), _grid_size(s.x)),
    # Each pixel's rarity among the training pixels' colours, averaged like the squared error.
    "colour": lambda s: _on_grid(s.colours.rarity_map(s.x), _grid_size(s.x)),
}


def error_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, h, w) smoothed squared error on the map grid."""
    return ScoreInputs(x, x_hat).map("err")


def ssim_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, h, w) smoothed 1 - SSIM on the map grid."""
    return ScoreInputs(x, x_hat).map("ssim")


def gms_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, h, w) smoothed 1 - MSGMS on the map grid."""
    return ScoreInputs(x, x_hat).map("gms")


ANOMALY_MAPS = {"err": error_map, "ssim": ssim_map, "gms": gms_map}  # the maps the galleries draw


def _ssim_error(inputs: ScoreInputs) -> torch.Tensor:
    """1 - the mean grid SSIM over the cells whose window lies inside the image (SSIM's valid region)."""
    grid = inputs.ssim
    inner = math.ceil((SSIM_WINDOW // 2) * grid.shape[-1] / inputs.x.shape[-1])  # the window's radius in cells
    if min(grid.shape[-2:]) > 2 * inner:
        grid = grid[..., inner:-inner, inner:-inner]
    return 1.0 - grid.flatten(1).mean(dim=1)


# The compute function of each registered score (pipeline.scores.SCORES) that does not pool a
# map's grid and is not a score of scores: ScoreInputs -> (B,).
COMPUTE: dict[str, Callable[[ScoreInputs], torch.Tensor]] = {
    # With tiles: the mean of the assembled error map (overlaps averaged), and of the tiles' SSIM errors.
    "mse": lambda s: (mse_per_image(s.x, s.x_hat) if s.grid is None
                      else s.grid.assemble(s.squared).flatten(1).mean(dim=1)),
    "ssim_error": lambda s: s.per_image(_ssim_error(s)),
    "latent_knn": lambda s: s.bank.latent.distances(s.z, s.ids),
    "stem_knn": lambda s: s.bank.stem.distances(s.stem_stats, s.ids),
}


def compute_scores(names: Sequence[str], inputs: ScoreInputs) -> dict[str, torch.Tensor]:
    """The registered scores `names` of one batch, each (B,), in the order given. A score of
    scores (fused) is not among them: `Calibration.fuse` makes it from its parts."""
    scores = {}
    for name in names:
        spec = SCORES[name]
        scores[name] = POOLS[spec.pool](inputs.image_map(spec.map)) if spec.pools_grid else COMPUTE[name](inputs)
    return scores


def reconstruction_scores(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score of a batch computed from the reconstruction alone, by name, each (B,)."""
    return compute_scores(names_needing("reconstruction"), ScoreInputs(x, x_hat))


# ---------------------------------------------------------------- scores from neighbours
#
# An image the autoencoder reconstructs well can still be unlike anything it was trained on
# (every colour of an image shifted, say): no reconstruction error sees it. These scores
# compare an image's description with those of the training split instead: the mean
# distance to its KNN_K nearest training images, in a space where every dimension is
# standardised. Two descriptions: the latent `z`, and the stem statistics (mean and
# standard deviation of each first-layer channel: which colours and textures an image holds).
# An image of the training split is in the bank itself: its own entry never counts (leave
# one out, by id), so a training image and an unseen one are scored alike.

KNN_K = 10  # more than one, so that anomalies in the bank do not find one another (why ten: an unrecorded note, no script)
BANK_CAP = 20_000  # bank entries at most (the training split, sampled by id hash above it)


# The k nearest of a large bank are found in two stages (`k_smallest`): cheaper than one top-k
# over every entry on a CPU, and exactly the same values (bench/score_cost.py's stem_knn and latent_knn).
NEAREST_BLOCK = 128  # bank entries per block
BLOCKED_SEARCH_MIN = 4 * NEAREST_BLOCK  # times k: smaller banks are searched by one top-k


def k_smallest(ranking: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """(B, N) with N a multiple of `block` -> (B, k) the k smallest values of each row, ascending:
    those of `ranking.topk(k, largest=False)`. Each row's k smallest values lie in the k blocks
    (of `block` consecutive entries) whose minima are smallest, since a value in any other block
    has k block minima at or below it; so the blocks' minima choose k blocks, and the top-k runs
    over their k x block entries alone."""
    rows = ranking.shape[0]
    blocks = ranking.view(rows, -1, block)
    chosen = blocks.amin(dim=2).topk(k, dim=1, largest=False).indices  # (B, k)
    candidates = blocks.gather(1, chosen[..., None].expand(-1, -1, block)).view(rows, -1)
    return candidates.topk(k, dim=1, largest=False).values


class NeighbourBank:
    """Vectors of the training split by id; `distances` scores queries against them."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, k: int = KNN_K,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"a bank needs one vector per id, got {len(ids)} ids and shape {vectors.shape}")
        self.ids = list(ids)
        self.k = max(1, min(k, len(self.ids) - 1))
        self.mean = vectors.mean(axis=0) if mean is None else np.asarray(mean, np.float32)
        spread = vectors.std(axis=0) if std is None else np.asarray(std, np.float32)
        self.std = np.where(spread > 1e-8, spread, 1.0).astype(np.float32)
        vectors = torch.from_numpy((vectors - self.mean) / self.std)  # (N, D)
        # A bank of many blocks is searched in two stages (`k_smallest`), its ranking padded to whole blocks.
        self._blocks = -(-len(vectors) // NEAREST_BLOCK) if len(vectors) >= BLOCKED_SEARCH_MIN * self.k else None
        self._on_device = {torch.device("cpu"): self._tensors(vectors)}
        self._row = {row_id: i for i, row_id in enumerate(self.ids)}

    def _tensors(self, vectors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(standardised vectors transposed (D, N'), contiguous for the ranking's matrix product,
        their squared norms (1, N'), mean (D,), std (D,)). N' is N padded to whole blocks for a
        blocked search: zero vectors of infinite squared norm, which rank last, as a vector that is
        not finite does (a NaN would spoil its block's minimum)."""
        finite = torch.isfinite(vectors).all(dim=1)
        vectors = torch.where(finite[:, None], vectors, 0.0)
        squares = vectors.pow(2).sum(dim=1).masked_fill_(~finite, math.inf)[None]
        columns = vectors.T.contiguous()
        if self._blocks is not None:
            pad = self._blocks * NEAREST_BLOCK - len(vectors)
            columns = torch.nn.functional.pad(columns, (0, pad))
            squares = torch.nn.functional.pad(squares, (0, pad), value=math.inf)
        return columns, squares, torch.from_numpy(self.mean), torch.from_numpy(self.std)

    def distances(self, queries: torch.Tensor, ids: Sequence[str] | None = None) -> torch.Tensor:
        """(B, D) -> (B,) mean Euclidean distance to the k nearest bank vectors, never an entry
        with the query's own id. On a GPU the bank is copied there once, not per batch."""
        if queries.device not in self._on_device:
            self._on_device[queries.device] = tuple(t.to(queries.device) for t in self._on_device[torch.device("cpu")])
        columns, squares, mean, std = self._on_device[queries.device]
        q = (queries.float() - mean) / std
        # |q - v|^2 = |q|^2 + (|v|^2 - 2 q.v): the bracket ranks the bank for each query (one fused
        # matrix product), and |q|^2 is added to the k chosen only.
        ranking = torch.addmm(squares, q, columns, beta=1.0, alpha=-2.0)
        if ids is not None:
            own = [(i, self._row[row_id]) for i, row_id in enumerate(ids) if row_id in self._row]
            if own:
                rows, columns = zip(*own)
                ranking[list(rows), list(columns)] = math.inf
        nearest = (ranking.topk(self.k, dim=1, largest=False).values if self._blocks is None
                   else k_smallest(ranking, self.k, NEAREST_BLOCK))
        nearest = nearest.add_(q.pow(2).sum(dim=1, keepdim=True))
        nearest = nearest.clamp_min_(0)
        return nearest.sqrt().mean(dim=1)


@dataclass
class TrainingBank:
    """The training split's descriptions by id, as the neighbour scores compare against them."""

    ids: list[str]
    latents: np.ndarray  # (N, latent_dim)
    stem_stats: np.ndarray  # (N, 2 * base_width)

    def __post_init__(self) -> None:
        self.latent = NeighbourBank(self.ids, self.latents)
        self.stem = NeighbourBank(self.ids, self.stem_stats)

    def scores(self, z: torch.Tensor, stem_stats: torch.Tensor, ids: Sequence[str] | None) -> dict[str, torch.Tensor]:
        """Every score computed against the bank (latent_knn, stem_knn), (B,) each, leaving each
        image's own entry out."""
        return compute_scores(names_needing("bank"), ScoreInputs(z=z, stem_stats=stem_stats, ids=ids, bank=self))


# ---------------------------------------------------------------- training losses

TRAINING_LOSSES = ("mse", "ssim_l1")
SSIM_L1_WEIGHT = 0.85  # of (1 - SSIM) against L1, as AE-SSIM and most SSIM-trained autoencoders weigh them


def training_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """(B, C, H, W) pairs -> (B,) per-image loss: "mse", or "ssim_l1" (structure-aware: blurry
    reconstructions of fine texture cost more than under MSE, so the model keeps the texture)."""
    if kind == "mse":
        return mse_per_image(x, x_hat)
    if kind == "ssim_l1":
        l1 = (x.float() - x_hat.float()).abs().flatten(1).mean(dim=1)
        return SSIM_L1_WEIGHT * ssim_error_per_image(x, x_hat) + (1 - SSIM_L1_WEIGHT) * l1
    raise ValueError(f"loss must be one of {TRAINING_LOSSES}, got {kind!r}")


def psnr(mse: float | np.ndarray | torch.Tensor) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; infinite for a perfect match."""
    if isinstance(mse, torch.Tensor):
        mse = mse.detach().cpu().numpy()
    if np.ndim(mse) == 0:
        return math.inf if mse <= 0 else -10.0 * math.log10(float(mse))
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -10.0 * np.log10(mse)


# ---------------------------------------------------------------- a model's calibration and bank


def calibrate_with_bank(ids: Sequence[str], held_out: np.ndarray, rows: dict[str, np.ndarray],
                        default: str = DEFAULT_SCORE, fused_from: Sequence[str] = FUSED_FROM,
                        ) -> tuple[Calibration, TrainingBank]:
    """A model's calibration and training bank from its scored rows: `rows` holds "z",
    "stem_stats" and every reconstruction score, one entry per id; `held_out` marks the rows
    that calibrate (the rest form the bank, so the held-out rows' neighbour scores are those
    of unseen images)."""
    held_out = np.asarray(held_out, dtype=bool)
    if held_out.sum() < 3 or (~held_out).sum() < 2:
        raise InputError(f"the held-out split ({int(held_out.sum())} images) or the training split "
                         f"({int((~held_out).sum())}) is too small to calibrate the model's scores: "
                         "use more data or another --val-fraction")
    ids = np.asarray(ids, dtype=object)
    bank = TrainingBank(list(ids[~held_out]), rows["z"][~held_out], rows["stem_stats"][~held_out])
    values = {name: np.asarray(rows[name])[held_out] for name in rows if name not in ("z", "stem_stats", "id", "val")}
    neighbours = bank.scores(torch.from_numpy(rows["z"][held_out]), torch.from_numpy(rows["stem_stats"][held_out]),
                             None)
    values.update({name: v.numpy() for name, v in neighbours.items()})
    return calibrate(values, default, fused_from), bank
