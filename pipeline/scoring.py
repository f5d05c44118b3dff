"""Scores and thresholds: (image, reconstruction) -> numbers -> flags, in one place.

Training, embedding, reports and benchmarks all take their scores from here, so a score
means the same thing everywhere.

Per-image errors compare images in [0, 1] pixel space, shape (B, C, H, W), and return one
value per image, shape (B,):
- `mse_per_image`: mean squared error, in [0, 1].
- `ssim_error_per_image`: 1 - SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  mean over the valid region and the channels, as scikit-image's
  `structural_similarity(gaussian_weights=True, use_sample_covariance=False, data_range=1)`),
  in [0, 2]; 0 means identical structure.
- `squared_error_map`: the per-pixel squared error (mean over channels) the galleries show.

Calibration: a score's distribution on held-out normal data, stored with the exported
model (`calibration_from_errors`); thresholds are taken from it.

Thresholds are given as specs (`parse_threshold`):
- `quantile:Q`: the Q-quantile of the model's calibration;
- `contamination:X`: flag the top X share of the scored corpus (needs every score first);
- `value:X`: a fixed score.
`resolve_threshold` turns a spec into the number a score is compared with (flag: score > value).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
CALIBRATION_GRID = 100  # held-out percentiles kept with each score's calibration, for reports
THRESHOLD_POLICIES = ("quantile", "contamination", "value")


def mse_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) mean squared error; computed in float32."""
    return (x.float() - x_hat.float()).pow(2).flatten(1).mean(dim=1)


def squared_error_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B, H, W) squared error per pixel, mean over channels."""
    return (x.float() - x_hat.float()).pow(2).mean(dim=1)


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
# - "ssim": 1 - SSIM per pixel (the window of `ssim_per_image`, mean over channels);
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
TOP_SHARE = 0.05  # "top": the mean of the worst 5% of a map's cells (beat 1% and the max in the bench)


def map_stride(side: int) -> int:
    """Pixels per map cell along a side of `side` pixels (1 for images of MAP_CELLS or fewer)."""
    return max(1, round(side / MAP_CELLS))


def _resample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, *size): cell means when finer, bilinear when coarser."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    if maps.shape[-2] >= size[0]:
        return torch.nn.functional.adaptive_avg_pool2d(maps[:, None], size)[:, 0]
    return torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _on_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) per-pixel map -> (B, *size) on the map grid, blurred by one cell."""
    return blur(_resample(maps, size), 1.0)


def _grid_size(x: torch.Tensor) -> tuple[int, int]:
    stride = map_stride(min(x.shape[-2:]))
    return -(-x.shape[-2] // stride), -(-x.shape[-1] // stride)


def error_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, h, w) smoothed squared error on the map grid."""
    return _on_grid(squared_error_map(x, x_hat), _grid_size(x))


def ssim_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, h, w) smoothed 1 - SSIM on the map grid."""
    return _on_grid(1.0 - _ssim_per_pixel(x.float(), x_hat.float(), valid=False).mean(dim=1), _grid_size(x))


def _gradient_magnitude(grey: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) Prewitt gradient magnitude, zero outside the image; as slices, which
    a CPU runs several times faster than a 3x3 convolution with one input channel."""
    padded = torch.nn.functional.pad(grey, (1, 1, 1, 1))
    across = padded[:, :, 2:] - padded[:, :, :-2]  # (B, H + 2, W): x differences on every row
    down = padded[:, 2:] - padded[:, :-2]  # (B, H, W + 2): y differences on every column
    gx = across[:, :-2] + across[:, 1:-1] + across[:, 2:]
    gy = down[..., :-2] + down[..., 1:-1] + down[..., 2:]
    return gx.square_().add_(gy.square_()).div_(9.0).add_(1e-12).sqrt_()


def _gms_grid(x: torch.Tensor, x_hat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    a, b = x.float().mean(dim=1), x_hat.float().mean(dim=1)  # (B, H, W) grey
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


def gms_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs -> (B, h, w) smoothed 1 - MSGMS on the map grid."""
    return _gms_grid(x, x_hat, _grid_size(x))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) grid maps -> (B, *size), bilinear: a map drawn over its image."""
    return torch.nn.functional.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                                           align_corners=False)[:, 0]


ANOMALY_MAPS = {"err": error_map, "ssim": ssim_map, "gms": gms_map}
_SCORE_MAPS = {"mse": "err", "ssim_error": "ssim"}


def map_for_score(score: str, fused_from: Sequence[str] = ()) -> str:
    """The anomaly map that shows where a score comes from: its own map; for the fused score the
    first of its parts that has one; the squared error for scores with no map (neighbours)."""
    if score == "fused":
        return next((_SCORE_MAPS.get(part) or part.split("_")[0] for part in fused_from
                     if part in _SCORE_MAPS or part.split("_")[0] in ANOMALY_MAPS), "err")
    prefix = score.split("_")[0]
    return _SCORE_MAPS.get(score) or (prefix if prefix in ANOMALY_MAPS else "err")


def pool_max(maps: torch.Tensor) -> torch.Tensor:
    """(B, h, w) -> (B,) the peak of each map."""
    return maps.flatten(1).amax(dim=1)


def pool_top(maps: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """(B, h, w) -> (B,) the mean of each map's worst `share` of cells (at least one)."""
    flat = maps.flatten(1)
    k = max(1, round(flat.shape[1] * share))
    return flat.topk(k, dim=1, sorted=False).values.mean(dim=1)


def reconstruction_scores(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every reconstruction score of a batch, by name (RECONSTRUCTION_SCORES), each (B,).

    One SSIM computation serves both `ssim_error` (its valid region, as `ssim_per_image`) and
    the ssim map; the maps are made on the grid and pooled there.
    """
    x, x_hat = x.float(), x_hat.float()
    size = _grid_size(x)
    squared = squared_error_map(x, x_hat)  # (B, H, W)
    ssim = _ssim_per_pixel(x, x_hat, valid=False)  # (B, C, H, W); its inner part is the valid region
    inner = SSIM_WINDOW // 2
    scores = {"mse": squared.flatten(1).mean(dim=1),
              "ssim_error": 1.0 - ssim[..., inner:-inner, inner:-inner].flatten(1).mean(dim=1)}
    maps = {"err": _on_grid(squared, size), "ssim": _on_grid(1.0 - ssim.mean(dim=1), size),
            "gms": _gms_grid(x, x_hat, size)}
    for name, values in maps.items():
        scores[f"{name}_max"] = pool_max(values)
        scores[f"{name}_top"] = pool_top(values)
    return scores


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

KNN_K = 10  # ten: anomalies in the training split (and so in the bank) find one another at k = 1
BANK_CAP = 20_000  # bank entries at most (the training split, sampled by id hash above it)


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
        self._vectors = torch.from_numpy((vectors - self.mean) / self.std)  # (N, D)
        self._squares = self._vectors.pow(2).sum(dim=1)  # (N,)
        self._row = {row_id: i for i, row_id in enumerate(self.ids)}

    def distances(self, queries: torch.Tensor, ids: Sequence[str] | None = None) -> torch.Tensor:
        """(B, D) -> (B,) mean Euclidean distance to the k nearest bank vectors, never an entry
        with the query's own id."""
        bank = self._vectors.to(queries.device)
        q = (queries.float() - torch.from_numpy(self.mean).to(queries.device)) / torch.from_numpy(self.std).to(
            queries.device)
        squared = (q.pow(2).sum(dim=1, keepdim=True) + self._squares.to(queries.device)[None] - 2 * q @ bank.T)
        if ids is not None:
            own = [(i, self._row[row_id]) for i, row_id in enumerate(ids) if row_id in self._row]
            if own:
                rows, columns = zip(*own)
                squared[list(rows), list(columns)] = math.inf
        nearest = squared.clamp_min(0).topk(self.k, dim=1, largest=False).values
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
        """{"latent_knn", "stem_knn"}: (B,) each, leaving each image's own entry out."""
        return {"latent_knn": self.latent.distances(z, ids), "stem_knn": self.stem.distances(stem_stats, ids)}


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


# ---------------------------------------------------------------- calibration
#
# Thresholds are taken on a score's calibration: its distribution on the held-out split of
# the training corpus. A real corpus holds anomalies (a few percent, unlabelled), so the
# held-out split does too, and its plain 99th percentile sits among them. The calibration
# therefore estimates the normal bulk alone, on the log of the score (errors are positive
# and spread multiplicatively): one Gaussian, or two when the Bayesian information criterion
# prefers them (the lower, heavier one is the normal bulk; the upper one the anomalies).
# On a clean split BIC keeps one Gaussian, so the threshold stays where the plain fit puts it;
# a mixture alone would split a clean bulk in two. `quantile:Q` is the Q-quantile of the bulk,
# and the upper component's weight is the estimated contamination. bench/detection.py
# compared this with median/MAD, trimmed fits, skew-adjusted boxplots and an ungated mixture.
#
# Scores are fused on a common scale: each one's robust z, (log score - median) / (1.4826 MAD)
# of its held-out values, which anomalies in the split barely move.

MAX_CONTAMINATION = 0.5  # a mixture whose upper component weighs more is not "normal bulk + anomalies"
_BULK = statistics.NormalDist()
_MAD_TO_SD = 1.4826
# The least spread a calibration takes (log units for scores fitted on their log: a 0.1%
# change of the score). A held-out split whose scores are (nearly) all equal shows no spread
# to measure; without a floor its z-scores and thresholds would hinge on float rounding.
MIN_SPREAD = 1e-3


def fit_normal_bulk(values: np.ndarray) -> tuple[float, float, float]:
    """(location, scale, contamination) of the Gaussian bulk of `values`: one Gaussian, or the
    lower of two when BIC prefers two and the upper one weighs at most MAX_CONTAMINATION."""
    from sklearn.mixture import GaussianMixture

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 3:
        raise InputError(f"a calibration needs at least 3 held-out values, got {values.size}")
    location, scale = float(values.mean()), float(values.std())
    if values.size < 20 or scale <= MIN_SPREAD:  # too few for a mixture to be told from noise
        return location, max(scale, MIN_SPREAD), 0.0
    column = values[:, None]
    one = GaussianMixture(1, random_state=0).fit(column)
    two = GaussianMixture(2, n_init=3, random_state=0).fit(column)
    if two.bic(column) >= one.bic(column):
        return location, scale, 0.0
    means, sds, weights = two.means_[:, 0], np.sqrt(two.covariances_.reshape(-1)), two.weights_
    bulk, tail = (0, 1) if means[0] < means[1] else (1, 0)
    if weights[tail] > MAX_CONTAMINATION:
        return location, scale, 0.0
    return float(means[bulk]), max(float(sds[bulk]), MIN_SPREAD), float(weights[tail])


@dataclass(frozen=True)
class ScoreCalibration:
    """One score's held-out distribution: the normal bulk's fit, the contamination estimate,
    the robust centre and spread that put the score on the fused scale, and the raw quantiles
    (q = i / CALIBRATION_GRID) for reports."""

    count: int
    log: bool  # fitted on log(score); False for scores already on a z scale (fused)
    location: float
    scale: float
    contamination: float
    median: float
    spread: float  # 1.4826 MAD: the standard deviation, were the values Gaussian
    grid: tuple[float, ...]

    @classmethod
    def fit(cls, values: np.ndarray, log: bool = True) -> ScoreCalibration:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        fitted = np.log(np.maximum(values, 1e-12)) if log else values
        location, scale, contamination = fit_normal_bulk(fitted)
        median = float(np.median(fitted))
        spread = _MAD_TO_SD * float(np.median(np.abs(fitted - median)))
        grid = np.quantile(values, np.linspace(0.0, 1.0, CALIBRATION_GRID + 1))
        return cls(int(values.size), log, location, scale, contamination, median,
                   spread if spread > MIN_SPREAD else scale, tuple(float(v) for v in grid))

    def quantile(self, q: float) -> float:
        """The q-quantile of the normal bulk, in the score's own units."""
        if not 0.0 < q < 1.0:
            raise InputError(f"quantile must be in (0, 1), got {q}")
        value = self.location + _BULK.inv_cdf(q) * self.scale
        return math.exp(value) if self.log else value

    def standardise(self, values: np.ndarray) -> np.ndarray:
        """Each value's robust z: how many spreads above the held-out median it is."""
        values = np.asarray(values, dtype=np.float64)
        fitted = np.log(np.maximum(values, 1e-12)) if self.log else values
        return (fitted - self.median) / self.spread

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "log": self.log, "location": self.location, "scale": self.scale,
                "contamination": self.contamination, "median": self.median, "spread": self.spread,
                "grid": list(self.grid)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScoreCalibration:
        if "location" not in values:  # a model made before the robust fit: refit its stored quantiles
            return cls.fit(np.asarray(values["grid"], dtype=np.float64))
        return cls(int(values["count"]), bool(values["log"]), float(values["location"]), float(values["scale"]),
                   float(values["contamination"]), float(values["median"]), float(values["spread"]),
                   tuple(float(v) for v in values["grid"]))


@dataclass(frozen=True)
class Calibration:
    """Every score's calibration, the fused score's recipe, and the default score."""

    scores: dict[str, ScoreCalibration]
    default_score: str
    fused_from: tuple[str, ...] = ()

    def get(self, score: str) -> ScoreCalibration:
        if score not in self.scores:
            raise InputError(f"the model's calibration has no score {score!r}; it has: {', '.join(self.scores)} "
                             "(retrain with this version of the train job for the newer scores)")
        return self.scores[score]

    def threshold(self, score: str, q: float) -> float:
        return self.get(score).quantile(q)

    def fuse(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """The fused score: the largest robust z of its parts (an image is as odd as its oddest
        score says)."""
        return np.max(np.stack([self.get(name).standardise(values[name]) for name in self.fused_from]), axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {"format": 2, "default_score": self.default_score, "fused_from": list(self.fused_from),
                "scores": {name: c.to_dict() for name, c in self.scores.items()},
                "contamination": self.scores[self.default_score].contamination}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Calibration:
        if not values:
            raise InputError("the model has no calibration: train it with this project's train job, or pass value:X")
        if "scores" not in values:  # one mse calibration, as models made before the scores were
            return cls({"mse": ScoreCalibration.from_dict(values)}, "mse")
        return cls({name: ScoreCalibration.from_dict(c) for name, c in values["scores"].items()},
                   values["default_score"], tuple(values.get("fused_from", ())))


def calibrate(held_out: dict[str, np.ndarray], default_score: str, fused_from: Sequence[str] = ()) -> Calibration:
    """Fit every held-out score (positive scores on their log); with `fused_from`, the fused score too."""
    scores = {name: ScoreCalibration.fit(values) for name, values in held_out.items()}
    partial = Calibration(scores, default_score if default_score in scores else "mse", tuple(fused_from))
    if fused_from:
        scores["fused"] = ScoreCalibration.fit(partial.fuse(held_out), log=False)
    return Calibration(scores, default_score, tuple(fused_from))


# The default score and the fused score's parts: what bench/detection.py found best across
# defect kinds without labels (docs/BENCHMARKS.md has the table, the README the reasons).
DEFAULT_SCORE = "fused"
FUSED_FROM = ("mse", "ssim_top", "stem_knn")


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


def default_score(calibration: dict[str, Any] | None) -> str:
    """The score a model flags anomalies by unless told otherwise: its calibration's default
    ("mse" for a model made before there were others)."""
    return Calibration.from_dict(calibration).default_score if calibration else "mse"


def calibration_from_errors(errors: np.ndarray) -> dict[str, Any]:
    """A calibration of per-image mse alone (models and tests that have only that score)."""
    return calibrate({"mse": np.asarray(errors, dtype=np.float64)}, "mse").to_dict()


def threshold_from_calibration(calibration: dict[str, Any] | None, q: float, score: str | None = None) -> float:
    """The q-quantile of the normal bulk of a score's held-out values (the default score's when None)."""
    parsed = Calibration.from_dict(calibration)
    return parsed.threshold(score or parsed.default_score, q)


# ---------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class ThresholdSpec:
    """A parsed `--threshold`: policy ("quantile", "contamination" or "value") and its number."""

    text: str
    policy: str
    parameter: float


def _spec_forms(policies: Sequence[str]) -> str:
    forms = {"quantile": "quantile:Q", "contamination": "contamination:X", "value": "value:X"}
    named = [forms[p] for p in policies]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]


def parse_threshold(spec: str, policies: Sequence[str] = THRESHOLD_POLICIES) -> ThresholdSpec:
    """'quantile:0.99' | 'contamination:0.05' | 'value:0.02' -> ThresholdSpec; InputError otherwise.

    `policies` limits the forms a caller accepts (the embed job flags rows one batch at a
    time, so it cannot take a contamination share of the whole corpus).
    """
    policy, _, number = str(spec).partition(":")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if policy not in policies or not math.isfinite(value):
        raise InputError(f"--threshold must be {_spec_forms(policies)}, got {spec!r}")
    if policy == "quantile" and not 0.0 <= value <= 1.0:
        raise InputError(f"quantile threshold must be in [0, 1], got {value}")
    if policy == "contamination" and not 0.0 <= value <= 1.0:
        raise InputError(f"contamination must be a share in [0, 1], got {value}")
    return ThresholdSpec(str(spec), policy, value)


def contamination_threshold(scores: np.ndarray, share: float) -> float:
    """The value that flags the top `share` of `scores` (flag: score > value).

    Midway between the last kept and the first flagged score, so exactly round(share * n)
    rows are flagged unless scores tie at the cut; +inf when there are no scores.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    if n == 0:
        return math.inf
    k = int(round(share * n))
    if k <= 0:
        return float(ordered[-1])
    if k >= n:
        return float(np.nextafter(ordered[0], -np.inf))
    return float((ordered[n - k - 1] + ordered[n - k]) / 2)


def resolve_threshold(spec: str | ThresholdSpec, calibration: dict[str, Any] | None = None,
                      scores: np.ndarray | None = None, score: str | None = None) -> float:
    """The number a spec names for `score` (the calibration's default when None): a quantile of
    its calibration, a share of `scores`, or the value."""
    parsed = spec if isinstance(spec, ThresholdSpec) else parse_threshold(spec)
    if parsed.policy == "value":
        return parsed.parameter
    if parsed.policy == "quantile":
        return threshold_from_calibration(calibration, parsed.parameter, score)
    if scores is None:
        raise InputError(f"--threshold {parsed.text} needs the scores of the whole corpus")
    return contamination_threshold(scores, parsed.parameter)
