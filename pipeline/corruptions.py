"""Synthetic corruptions for defect-aware training: the model learns to return the clean image.

An autoencoder trained only to copy its input copies defects too, and a defect it copies
leaves no trace in the error map. Trained instead to map a corrupted copy back to the clean
image (DRAEM's reconstructive half; CutPaste's patches), it learns to repair what does not
belong, and at test time the map lights up where a defect was.

Every corruption here is made from the batch's own pixels, so it never invents a colour or a
texture: it only puts real content where it does not belong.
- "texture": a Perlin-noise-shaped blob filled with another image of the batch, blended in
  with a random opacity (DRAEM draws its fills from a texture data set; the other images of
  the corpus are the texture source that every corpus has);
- "patch": a rectangle of the image itself, moved elsewhere (CutPaste);
- "stroke": a short, curved, few-pixel-wide stroke coloured from another image of the batch;
- "shade": a Perlin-noise-shaped region of the image's own texture made darker or brighter
  (towards black or white by a random share), the stain or glare a surface camera sees; the
  texture stays, only its light changes.
The kinds of `pipeline.synth` (the benchmark's anomalies) are never drawn here: the benchmark
measures how training on these generalises to defects the model never saw.

All of it runs on a whole batch at once on the training device, from a `torch.Generator`,
so a seed gives the same corruptions on every run.
"""

from __future__ import annotations

import math

import torch

CORRUPTIONS = ("texture", "patch", "stroke", "shade")
MAX_AREA = 0.4  # no corruption covers more than this share of an image
PERLIN_SCALES = (2, 4, 8)  # Perlin grid cells per side: blobs from large to small


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
             low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def perlin_noise(batch: int, size: int, cells: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B, S, S) 2-D Perlin noise in about [-0.7, 0.7], `cells` gradient cells per side."""
    angles = _uniform((batch, cells + 1, cells + 1), generator, device, 0.0, 2 * math.pi)
    gradients = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (B, cells+1, cells+1, 2)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * cells / size
    cell, frac = coords.floor().long().clamp_max(cells - 1), coords - coords.floor().clamp_max(cells - 1)
    fade = frac * frac * frac * (frac * (frac * 6 - 15) + 10)  # Perlin's quintic smoothstep
    y0, x0 = cell[:, None], cell[None, :]  # (S, 1), (1, S)
    fy, fx = frac[:, None], frac[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[:, y0 + dy, x0 + dx]  # (B, S, S, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    top = corner(0, 0) + fade[None, :] * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + fade[None, :] * (corner(1, 1) - corner(1, 0))
    return top + fade[:, None] * (bottom - top)


def _area_capped(mask: torch.Tensor) -> torch.Tensor:
    """Zero the masks that cover more than MAX_AREA of their image (they would be a new image)."""
    too_big = mask.flatten(1).mean(dim=1) > MAX_AREA
    return mask * (~too_big).float()[:, None, None]


def texture_blobs(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> (corrupted, mask (B, S, S) in [0, 1]): Perlin blobs filled with another image."""
    batch, _, size, _ = x.shape
    cells = PERLIN_SCALES[int(torch.randint(len(PERLIN_SCALES), (1,), generator=generator, device=x.device))]
    noise = perlin_noise(batch, size, cells, generator, x.device)
    cut = _uniform((batch, 1, 1), generator, x.device, 0.25, 0.5)
    mask = _area_capped((noise > cut).float())
    opacity = _uniform((batch, 1, 1, 1), generator, x.device, 0.3, 1.0)
    fill = x.roll(shifts=1, dims=0).flip(dims=(3,))  # another image, mirrored: not aligned with this one
    blend = mask[:, None] * opacity
    return x * (1 - blend) + fill * blend, mask


def moved_patches(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> (corrupted, mask): a rectangle of each image pasted elsewhere in it (CutPaste)."""
    batch, _, size, _ = x.shape
    device = x.device
    area = _uniform((batch,), generator, device, 0.02, 0.12)
    aspect = torch.exp(_uniform((batch,), generator, device, math.log(0.3), math.log(3.3)))
    h = (size * (area * aspect).sqrt()).clamp(2, size // 2).long()
    w = (size * (area / aspect).sqrt()).clamp(2, size // 2).long()
    src_y = (_uniform((batch,), generator, device) * (size - h + 1)).long()
    src_x = (_uniform((batch,), generator, device) * (size - w + 1)).long()
    dst_y = (_uniform((batch,), generator, device) * (size - h + 1)).long()
    dst_x = (_uniform((batch,), generator, device) * (size - w + 1)).long()
    rows = torch.arange(size, device=device)[None, :]  # (1, S)
    in_dst_y = (rows >= dst_y[:, None]) & (rows < (dst_y + h)[:, None])  # (B, S)
    in_dst_x = (rows >= dst_x[:, None]) & (rows < (dst_x + w)[:, None])
    mask = (in_dst_y[:, :, None] & in_dst_x[:, None, :]).float()  # (B, S, S)
    # Each destination pixel reads the source pixel at the same offset inside the rectangle.
    read_y = (rows - dst_y[:, None] + src_y[:, None]).clamp(0, size - 1)  # (B, S)
    read_x = (rows - dst_x[:, None] + src_x[:, None]).clamp(0, size - 1)
    index = (read_y[:, :, None] * size + read_x[:, None, :]).flatten(1)  # (B, S*S)
    moved = x.flatten(2).gather(2, index[:, None, :].expand(-1, x.shape[1], -1)).view_as(x)
    return x * (1 - mask[:, None]) + moved * mask[:, None], mask


def strokes(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> (corrupted, mask): a short curved stroke, 1-3 px wide, coloured from another image."""
    batch, channels, size, _ = x.shape
    device = x.device
    # Part of a quadratic Bezier curve through three random points: a short, bent stroke.
    points = _uniform((batch, 3, 2), generator, device, 0.1, 0.9) * (size - 1)
    t = torch.linspace(0, 1, 2 * size, device=device)[None, :, None] * _uniform((batch, 1, 1), generator, device,
                                                                               0.2, 0.6)
    curve = ((1 - t) ** 2) * points[:, :1] + 2 * (1 - t) * t * points[:, 1:2] + (t**2) * points[:, 2:]
    cells = curve.round().long().clamp(0, size - 1)  # (B, T, 2) pixels the centre line passes
    mask = torch.zeros(batch, size * size, device=device)
    mask.scatter_(1, cells[..., 0] * size + cells[..., 1], 1.0)
    mask = mask.view(batch, 1, size, size)
    if bool(_uniform((1,), generator, device) < 0.5):  # 3 px wide rather than 1
        mask = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1)
    mask = _area_capped(mask[:, 0])
    source = x.roll(shifts=2, dims=0)  # a third image's pixels give the colour
    at = (_uniform((batch,), generator, device) * size * size).long()
    colour = source.flatten(2).gather(2, at[:, None, None].expand(-1, channels, 1))  # (B, C, 1)
    return x * (1 - mask[:, None]) + colour[..., None] * mask[:, None], mask


def shaded_regions(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) -> (corrupted, mask): a Perlin blob of the image pulled towards black or white."""
    batch, _, size, _ = x.shape
    cells = PERLIN_SCALES[int(torch.randint(len(PERLIN_SCALES), (1,), generator=generator, device=x.device))]
    noise = perlin_noise(batch, size, cells, generator, x.device)
    mask = _area_capped((noise > _uniform((batch, 1, 1), generator, x.device, 0.3, 0.55)).float())
    towards = (_uniform((batch, 1, 1, 1), generator, x.device) < 0.5).float()  # 0: darker, 1: brighter
    strength = _uniform((batch, 1, 1, 1), generator, x.device, 0.2, 0.6)
    blend = mask[:, None] * strength
    return x * (1 - blend) + towards * blend, mask


_MAKERS = {"texture": texture_blobs, "patch": moved_patches, "stroke": strokes, "shade": shaded_regions}


def corrupt(x: torch.Tensor, generator: torch.Generator, share: float = 0.5,
            kinds: tuple[str, ...] = CORRUPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt about `share` of a batch (B, C, S, S) in [0, 1], each chosen image by one of `kinds`
    (CORRUPTIONS) drawn at random; (corrupted batch, mask (B, S, S): where something was put)."""
    unknown = sorted(set(kinds) - set(CORRUPTIONS))
    if unknown or not kinds:
        raise ValueError(f"corruption kinds must be some of {CORRUPTIONS}, got {kinds}")
    batch = x.shape[0]
    chosen = _uniform((batch,), generator, x.device) < share
    kind = torch.randint(len(kinds), (batch,), generator=generator, device=x.device)
    out, mask = x.clone(), torch.zeros(batch, *x.shape[-2:], device=x.device)
    for index, name in enumerate(kinds):
        mine = chosen & (kind == index)
        if mine.any():
            corrupted, where = _MAKERS[name](x, generator)
            out[mine], mask[mine] = corrupted[mine], where[mine]
    return out, mask
