"""Reconstruction-error scores, the one place training, embedding and reports get them from.

All scores compare images in [0, 1] pixel space, shape (B, C, H, W), and return one value
per image, shape (B,):
- `mse_per_image`: mean squared error, in [0, 1].
- `ssim_error_per_image`: 1 - SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
  mean over the valid region and the channels, as scikit-image's
  `structural_similarity(gaussian_weights=True, use_sample_covariance=False, data_range=1)`),
  in [0, 2]; 0 means identical structure.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def mse_per_image(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) -> (B,) mean squared error; computed in float32."""
    return (x.float() - x_hat.float()).pow(2).flatten(1).mean(dim=1)


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
