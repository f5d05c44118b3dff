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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import InputError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
CALIBRATION_GRID = 1000  # quantiles stored at q = i / 1000, so any quantile threshold works later
THRESHOLD_POLICIES = ("quantile", "contamination", "value")


def mse_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) mean squared error; computed in float32."""
    return (x.float() - x_hat.float()).pow(2).flatten(1).mean(dim=1)


def squared_error_map(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B, H, W) squared error per pixel, mean over channels."""
    return (x.float() - x_hat.float()).pow(2).mean(dim=1)


def _blur_matrix(size: int, device: torch.device) -> torch.Tensor:
    """(size, size - 10): right-multiplying by it applies the 11-tap Gaussian, valid region only."""
    radius = SSIM_WINDOW // 2
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    out = size - SSIM_WINDOW + 1
    matrix = torch.zeros(size, out, device=device)
    for k in range(SSIM_WINDOW):
        matrix[torch.arange(out) + k, torch.arange(out)] = g[k]
    return matrix


def ssim_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) structural similarity in [-1, 1]; needs H, W >= 11."""
    x, y = x.float(), x_hat.float()
    channels, height, width = x.shape[1:]
    # The five local statistics, blurred together. The separable Gaussian is applied as two
    # banded matrix products: more arithmetic than an 11-tap depthwise convolution, but
    # BLAS runs it ten times faster than the CPU's depthwise kernels.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1).contiguous()  # (B, 5C, H, W)
    blurred = maps @ _blur_matrix(width, x.device)  # (B, 5C, H, W-10)
    blurred = _blur_matrix(height, x.device).T @ blurred  # (B, 5C, H-10, W-10)
    mu_x, mu_y, xx, yy, xy = blurred.split(channels, dim=1)  # each (B, C, H-10, W-10)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def ssim_error_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) 1 - SSIM, in [0, 2]."""
    return 1.0 - ssim_per_image(x, x_hat)


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


def calibration_from_errors(errors: np.ndarray) -> dict[str, Any]:
    """Per-image held-out errors -> the distribution thresholds are later taken from."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return {}
    grid = np.quantile(errors, np.linspace(0.0, 1.0, CALIBRATION_GRID + 1))
    named = {str(q): float(np.quantile(errors, q)) for q in (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)}
    return {"metric": "mse", "count": int(errors.size), "mean": float(errors.mean()), "std": float(errors.std()),
            "max": float(errors.max()), "quantiles": named, "grid": [float(v) for v in grid]}


def threshold_from_calibration(calibration: dict[str, Any] | None, q: float) -> float:
    """The q-quantile of the calibration errors, interpolated on the stored grid."""
    if not calibration or "grid" not in calibration:
        raise InputError("the model has no calibration: train it with this project's train job, or pass value:X")
    if not 0.0 <= q <= 1.0:
        raise InputError(f"quantile must be in [0, 1], got {q}")
    grid = np.asarray(calibration["grid"])
    return float(np.interp(q, np.linspace(0.0, 1.0, len(grid)), grid))


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
                      scores: np.ndarray | None = None) -> float:
    """The number a spec names: a quantile of `calibration`, a share of `scores`, or the value."""
    parsed = spec if isinstance(spec, ThresholdSpec) else parse_threshold(spec)
    if parsed.policy == "value":
        return parsed.parameter
    if parsed.policy == "quantile":
        return threshold_from_calibration(calibration, parsed.parameter)
    if scores is None:
        raise InputError(f"--threshold {parsed.text} needs the scores of the whole corpus")
    return contamination_threshold(scores, parsed.parameter)
