"""The real-surface benchmark's anomalies, drawn by their own code (bench/surfaces.py uses them).

Two kinds of anomaly on a photograph of a surface, each at several contrasts:
- "texture": real texture from another photograph, pasted in an irregular shape;
- "crack", "dark", "speck": defects drawn here: thin random-walk cracks 1-3 px wide, dark
  regions, small bright specks.

This module shares nothing with pipeline/corruptions.py (what defect-aware training and the
learned defect head train on) or pipeline/synth.py (the synthetic corpus): it imports neither
and copies no shape or parameter from them, so that a score trained on corruptions is measured
on defects it never saw (tests/test_surfaces_bench.py checks the imports). Shapes here are
star-shaped polygons with a few random harmonics (not noise fields) and Pillow-drawn polylines.

Every function takes a uint8 (H, W) or (H, W, C) image, a numpy Generator and a contrast in
(0, 1], and returns (the changed copy, a bool (H, W) mask): no pixel outside the mask changes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("texture", "crack", "dark", "speck")
CONTRASTS = (0.25, 0.5, 0.75)  # each kind is drawn at each of these, in turn


def _canvas(image: np.ndarray) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    mask = Image.new("L", (image.shape[1], image.shape[0]), 0)
    return mask, ImageDraw.Draw(mask)


def _as_bool(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask) > 0


def blob_mask(image: np.ndarray, rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """An irregular region: a star-shaped polygon around a random centre whose radius wobbles
    with three random harmonics; `radius` is its mean radius's range as a share of the shorter side."""
    height, width = image.shape[:2]
    side = min(height, width)
    mean = rng.uniform(*radius) * side
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = sum(rng.uniform(0, 0.3 / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r = mean * np.clip(1 + wobble, 0.3, None)
    mask, draw = _canvas(image)
    draw.polygon(list(zip((cx + r * np.cos(angles)).tolist(), (cy + r * np.sin(angles)).tolist())), fill=255)
    return _as_bool(mask)


def _blend(image: np.ndarray, mask: np.ndarray, target: np.ndarray, contrast: float) -> np.ndarray:
    """`image` moved `contrast` of the way to `target` inside `mask`, rounded back to uint8."""
    m = mask if image.ndim == 2 else mask[..., None]
    mixed = (1 - contrast) * image.astype(np.float32) + contrast * target.astype(np.float32)
    return np.where(m, np.clip(np.rint(mixed), 0, 255), image).astype(np.uint8)


def texture(image: np.ndarray, rng: np.random.Generator, contrast: float, source: np.ndarray) -> tuple:
    """A window of another photograph (`source`, same channels, at least as large as `image`)
    pasted in an irregular region, blended at opacity `contrast`."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, source.shape[0] - height + 1))
    left = int(rng.integers(0, source.shape[1] - width + 1))
    mask = blob_mask(image, rng, (0.08, 0.2))
    return _blend(image, mask, source[top:top + height, left:left + width], contrast), mask


def crack(image: np.ndarray, rng: np.random.Generator, contrast: float) -> tuple:
    """A thin crack: a random-walk polyline 1-3 px wide whose heading drifts, darkened by `contrast`."""
    height, width = image.shape[:2]
    side = min(height, width)
    y, x = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
    heading = rng.uniform(0, 2 * np.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(8, 20))):
        heading += rng.normal(0, 0.5)
        step = rng.uniform(0.02, 0.06) * side
        x = float(np.clip(x + step * np.cos(heading), 0, width - 1))
        y = float(np.clip(y + step * np.sin(heading), 0, height - 1))
        points.append((x, y))
    mask, draw = _canvas(image)
    draw.line(points, fill=255, width=int(rng.integers(1, 4)), joint="curve")
    mask = _as_bool(mask)
    return _blend(image, mask, np.zeros_like(image), contrast), mask


def dark(image: np.ndarray, rng: np.random.Generator, contrast: float) -> tuple:
    """A dark region: an irregular blob whose pixels lose `contrast` of their brightness."""
    mask = blob_mask(image, rng, (0.04, 0.12))
    return _blend(image, mask, np.zeros_like(image), contrast), mask


def speck(image: np.ndarray, rng: np.random.Generator, contrast: float) -> tuple:
    """3-10 small bright specks (discs of radius 1-3 px), `contrast` of the way to white."""
    height, width = image.shape[:2]
    mask, draw = _canvas(image)
    for _ in range(int(rng.integers(3, 11))):
        r = float(rng.uniform(1, 3))
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    mask = _as_bool(mask)
    return _blend(image, mask, np.full_like(image, 255), contrast), mask


def draw_anomaly(kind: str, image: np.ndarray, rng: np.random.Generator, contrast: float,
                 source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of `kind` (one of KINDS; "texture" needs `source`): (changed copy, mask)."""
    if kind == "texture":
        if source is None:
            raise ValueError("a texture anomaly needs a source photograph")
        return texture(image, rng, contrast, source)
    drawers = {"crack": crack, "dark": dark, "speck": speck}
    if kind not in drawers:
        raise ValueError(f"anomaly kind must be one of {KINDS}, got {kind!r}")
    return drawers[kind](image, rng, contrast)
