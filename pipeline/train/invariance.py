"""Latents that survive the edits near-duplicates go through (`train --invariance W`).

A pixel autoencoder's latent moves when an image is cropped by a few pixels, framed or
watermarked: nothing in reconstruction asks it not to. With `--invariance W` each training
batch also gets one edited view of every image (`training_views`: a crop, a down-and-up
rescale, a frame, a filled box, or noise, drawn per image), and the loss gains W times a
contrastive term (InfoNCE, `invariance_loss`): an image's latent direction must be nearer its own
view's than any other image's in the batch. The batch's other images are what keep distinct
images apart; pulling a view onto its image alone collapses the space (bench/duplicates.py
measures both). The decoder still reconstructs the image itself.

These views are tensor code of their own: they share nothing with the copies that measure
duplicates (`pipeline.neighbours.edits`, the calibration's and the benchmark's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.1  # of the InfoNCE logits (cosine similarities / TEMPERATURE)
VIEW_KINDS = 5  # crop, rescale, frame, box, noise


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _integer(generator: torch.Generator, high: int) -> int:
    """Uniform in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def _resized(image: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(image, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def training_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] -> one edited view of each image, the same shape, drawn from `generator`.

    `generator` is a CPU generator whatever x's device: every draw is read back as a Python
    number, and on a GPU generator each read would wait for the device."""
    if generator.device.type != "cpu":
        raise ValueError(f"training_views draws from a CPU generator, got one on {generator.device}")
    side = x.shape[-1]
    views = x.clone()
    for b in range(len(x)):
        image, kind = x[b:b + 1], _integer(generator, VIEW_KINDS)
        if kind == 0:  # a crop of up to 18% of each side, resized back
            keep = round(side * (1 - _uniform(generator, 0.0, 0.18)))
            top, left = _integer(generator, side - keep + 1), _integer(generator, side - keep + 1)
            views[b] = _resized(image[..., top:top + keep, left:left + keep], side)[0]
        elif kind == 1:  # stored at 0.4-1x and resized back
            small = max(4, round(side * _uniform(generator, 0.4, 1.0)))
            views[b] = F.interpolate(_resized(image, small), size=(side, side), mode="bilinear",
                                     align_corners=False)[0]
        elif kind == 2:  # a frame of 2-12% of the side in one grey level, the whole resized back
            pad = max(1, round(side * _uniform(generator, 0.02, 0.12)))
            views[b] = _resized(F.pad(image, (pad, pad, pad, pad), value=_uniform(generator, 0.0, 1.0)), side)[0]
        elif kind == 3:  # a box of 2-12% of the area in one colour, 50-100% opaque
            area = _uniform(generator, 0.02, 0.12) * side * side
            width = min(side, max(1, round((area * _uniform(generator, 1.0, 4.0)) ** 0.5)))
            height = min(side, max(1, round(area / width)))
            top, left = _integer(generator, side - height + 1), _integer(generator, side - width + 1)
            colour = torch.rand(x.shape[1], 1, 1, generator=generator).to(x.device, x.dtype)
            alpha = _uniform(generator, 0.5, 1.0)
            box = views[b, :, top:top + height, left:left + width]
            views[b, :, top:top + height, left:left + width] = (1 - alpha) * box + alpha * colour
        else:  # Gaussian noise of up to 0.04, as coarse quantisation leaves
            noise = torch.randn(image.shape[1:], generator=generator).to(x.device, x.dtype)
            views[b] = (image[0] + _uniform(generator, 0.0, 0.04) * noise).clamp(0, 1)
    return views


def invariance_loss(z: torch.Tensor, z_view: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE of (B, D) latents and their views' latents: each row's match is its own view."""
    a, b = F.normalize(z.float(), dim=1), F.normalize(z_view.float(), dim=1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
