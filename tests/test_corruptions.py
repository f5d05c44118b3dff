"""Training corruptions: local, made of the batch's own pixels, never one of synth's anomaly kinds.

The detection benchmark measures how defect-aware training generalises to defects the model
never saw (pipeline.synth's kinds), so the corruptions must not be those kinds: no global
colour change (colour_shift), no pixel noise (noise), no invented colour (scratch, blot and
foreign_object paint colours of their own), and no code shared with synth.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import corruptions
from pipeline.corruptions import CORRUPTIONS, MAX_AREA, corrupt, moved_patches, shaded_regions, strokes, texture_blobs
from pipeline.synth import synthetic_image


def _batch(n: int = 16, size: int = 48, seed: int = 1) -> torch.Tensor:
    images = np.stack([synthetic_image(i, seed, size, 3) for i in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def _colours(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(p) for p in x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).tolist()}


@pytest.mark.parametrize("seed", range(6))
def test_corrupt_changes_only_masked_pixels_and_at_most_the_area_cap(seed):
    x = _batch()
    out, mask = corrupt(x, torch.Generator().manual_seed(seed), share=0.75)
    assert out.shape == x.shape and mask.shape == (x.shape[0], *x.shape[-2:])
    outside = (mask == 0)[:, None].expand_as(x)
    assert torch.equal(out[outside], x[outside]), "a corruption changed pixels outside its mask"
    assert bool((mask.flatten(1).mean(dim=1) <= MAX_AREA + 1e-6).all())
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    changed = (out != x).flatten(1).any(dim=1)
    assert 0 < int(changed.sum()) < x.shape[0], "about `share` of the batch is corrupted, not all or none"


def test_no_corruption_is_a_global_colour_change_or_noise():
    """synth's colour_shift moves every pixel and its noise touches most of them: a corruption
    never changes more than MAX_AREA of an image."""
    x = _batch(32)
    for seed in range(10):
        out, _ = corrupt(x, torch.Generator().manual_seed(seed), share=1.0)
        changed_share = (out != x).any(dim=1).flatten(1).float().mean(dim=1)
        assert float(changed_share.max()) <= MAX_AREA + 1e-6


@pytest.mark.parametrize("maker", [moved_patches, strokes])
def test_patches_and_strokes_only_use_colours_the_batch_already_has(maker):
    x = _batch(8)
    out, mask = maker(x, torch.Generator().manual_seed(3))
    inside = out.permute(0, 2, 3, 1)[mask > 0]  # (pixels, C)
    assert inside.shape[0] > 0
    assert {tuple(p) for p in inside.tolist()} <= _colours(x), "a colour that no image of the batch has"


def test_texture_blobs_blend_the_image_with_another_image_of_the_batch():
    x = _batch(8)
    out, mask = texture_blobs(x, torch.Generator().manual_seed(4))
    fill = x.roll(shifts=1, dims=0).flip(dims=(3,))
    # Each masked pixel lies on the segment from its own value to the other image's value.
    alpha = ((out - x) / (fill - x).where((fill - x).abs() > 1e-3, torch.ones(()))).where(
        (fill - x).abs() > 1e-3, torch.zeros(()))
    inside = (mask > 0)[:, None].expand_as(x) & ((fill - x).abs() > 1e-3)
    assert inside.any()
    assert float(alpha[inside].min()) >= -1e-4 and float(alpha[inside].max()) <= 1 + 1e-4
    # One opacity per image: the blend is a single mix, not per-pixel noise.
    for i in range(x.shape[0]):
        values = alpha[i][inside[i]]
        if values.numel():
            assert float(values.max() - values.min()) < 1e-3


def test_shaded_regions_keep_the_texture_and_only_move_its_light():
    x = _batch(8)
    out, mask = shaded_regions(x, torch.Generator().manual_seed(5))
    inside = (mask > 0)[:, None].expand_as(x)
    assert inside.any()
    for i in range(x.shape[0]):
        if not inside[i].any():
            continue
        before, after = x[i][inside[i]], out[i][inside[i]]
        darker, brighter = bool((after <= before + 1e-6).all()), bool((after >= before - 1e-6).all())
        assert darker != brighter, "a shade is darker or brighter, one of the two"
        # after = before * (1 - s) + target * s: one straight line, so the texture's order survives.
        target = 0.0 if darker else 1.0
        share = (before - after) / (before - target).where((before - target).abs() > 1e-3, torch.ones(()))
        kept = (before - target).abs() > 1e-3
        assert float(share[kept].max() - share[kept].min()) < 1e-3
        assert 0.2 - 1e-4 <= float(share[kept].mean()) <= 0.6 + 1e-4


def test_the_corruption_code_shares_nothing_with_synth():
    source = Path(corruptions.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any("synth" in name for name in imported), imported
    assert set(CORRUPTIONS) == {"texture", "patch", "stroke", "shade"}
    from pipeline.synth import ANOMALY_KINDS

    assert not set(CORRUPTIONS) & set(ANOMALY_KINDS)


def test_corruptions_can_be_limited_to_some_kinds():
    """Leave-one-kind-out training draws only the kinds named: moved patches alone give masks that
    are filled rectangles."""
    x = _batch(12)
    _, masks = corrupt(x, torch.Generator().manual_seed(3), share=1.0, kinds=("patch",))
    for mask in masks:
        rows, columns = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = mask[int(rows.min()):int(rows.max()) + 1, int(columns.min()):int(columns.max()) + 1]
        assert bool((box == 1).all()), "a non-rectangular mask: a kind that was not asked for"
    with pytest.raises(ValueError, match="corruption kinds"):
        corrupt(x, torch.Generator(), kinds=("crack",))


def test_the_same_seed_gives_the_same_corruptions():
    x = _batch(8)
    a = corrupt(x, torch.Generator().manual_seed(9))
    b = corrupt(x, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
