"""bench/surface_defects.py: the real-surface benchmark's anomalies land where their masks say,
change the image, and owe nothing to the training corruptions or the synthetic corpus."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.surface_defects import CONTRASTS, KINDS, draw_anomaly

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("pipeline.corruptions", "pipeline.synth")


def _surface(seed: int, side: int = 300, channels: int = 1) -> np.ndarray:
    """A textured image whose every pixel can get darker and brighter (values 30-220)."""
    return np.random.default_rng(seed).integers(30, 221, size=(side, side, channels), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_anomaly_changes_the_image_inside_its_mask_only(kind, channels):
    image, source = _surface(1, channels=channels), _surface(2, side=400, channels=channels)
    for seed, contrast in enumerate(CONTRASTS):
        changed, mask = draw_anomaly(kind, image, np.random.default_rng(seed), contrast, source)
        assert changed.shape == image.shape and changed.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        differs = (changed != image).any(axis=-1)
        assert mask.any()
        assert not differs[~mask].any(), "a pixel outside the mask changed"
        # Every masked pixel moves (a pasted pixel may equal the one it covers, rarely).
        assert differs[mask].mean() > (0.9 if kind == "texture" else 0.99)


def test_kinds_have_their_shape_and_direction():
    image = _surface(3)
    rng = np.random.default_rng(0)
    crack, crack_mask = draw_anomaly("crack", image, rng, 0.5)
    dark, dark_mask = draw_anomaly("dark", image, rng, 0.5)
    speck, speck_mask = draw_anomaly("speck", image, rng, 0.5)
    assert (crack[crack_mask] < image[crack_mask]).all() and (dark[dark_mask] < image[dark_mask]).all()
    assert (speck[speck_mask] > image[speck_mask]).all()
    assert crack_mask.mean() < 0.05 and speck_mask.sum() <= 10 * 49  # thin; at most ten radius-3 discs
    stronger, _ = draw_anomaly("dark", image, np.random.default_rng(1), 0.75)
    weaker, _ = draw_anomaly("dark", image, np.random.default_rng(1), 0.25)
    assert stronger.astype(int).sum() < weaker.astype(int).sum()  # contrast orders the change


def test_texture_needs_a_source_and_kinds_are_checked():
    with pytest.raises(ValueError, match="source"):
        draw_anomaly("texture", _surface(1), np.random.default_rng(0), 0.5)
    with pytest.raises(ValueError, match="kind"):
        draw_anomaly("scratch", _surface(1), np.random.default_rng(0), 0.5)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_drawing_code_imports_nothing_from_corruptions_or_synth():
    imported = _imported_modules(REPO / "bench" / "surface_defects.py")
    assert not {name for name in imported for bad in FORBIDDEN if name == bad or name.startswith(bad + ".")}
    assert not {name for name in imported if name.startswith("pipeline")}, "the drawing code is self-contained"
    # And importing it at run time pulls neither in (nothing reaches them indirectly).
    probe = ("import sys, numpy as np, bench.surface_defects as d;"
             "d.draw_anomaly('crack', np.zeros((64, 64), np.uint8), np.random.default_rng(0), 0.5);"
             f"print([m for m in {FORBIDDEN!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_the_leave_one_kind_out_variants_never_train_on_the_corruption_they_are_read_for():
    """Each anomaly kind is read from a head trained without the corruption nearest it; that
    variant's training config draws every other corruption kind and not that one."""
    from bench.surfaces import LEFT_OUT_FOR, VARIANTS
    from pipeline.corruptions import CORRUPTIONS
    from pipeline.train import TrainConfig

    assert set(LEFT_OUT_FOR) == set(KINDS) and set(LEFT_OUT_FOR.values()) <= set(CORRUPTIONS)
    assert "corruptions" not in VARIANTS["head"]  # the head trained on every kind: the default
    assert TrainConfig(data_url="-", out_url="-").corruptions == CORRUPTIONS
    for kind, left_out in LEFT_OUT_FOR.items():
        settings = dict(VARIANTS[f"head-without-{left_out}"])
        assert settings.pop("defect_head") is True
        cfg = TrainConfig(data_url="-", out_url="-", **settings)
        assert left_out not in cfg.corruptions and set(cfg.corruptions) == set(CORRUPTIONS) - {left_out}, kind


def test_results_take_a_name_as_the_other_benches_do_or_a_json_path():
    from bench.surfaces import RESULTS, results_path

    default = Path("elsewhere.json")
    assert results_path(None, default) == default
    assert results_path("surfaces-tiled", default) == RESULTS.parent / "surfaces-tiled.json"
    assert results_path("out/x.json", default) == Path("out/x.json")
    with pytest.raises(SystemExit, match="name under docs/bench-results"):
        results_path("bench-output/x", default)


def test_fused_with_a_patch_score_flags_what_only_that_score_sees():
    """The bench's fusion question: `fused` with a patch score as a fourth part, calibrated on the
    held-out rows as the train job calibrates `fused`. A row odd only by the patch score is flagged
    by it, and not by the pipeline's fused; normal rows stay under its threshold about as often."""
    from bench.detection import fused_with
    from pipeline.scores import FUSED_FROM
    from pipeline.thresholds import calibrate

    generator = np.random.default_rng(0)
    scores = {name: generator.lognormal(0.0, 0.2, 400) for name in (*FUSED_FROM, "patch_knn_top")}
    scores["patch_knn_top"][-1] = 50.0  # odd by the patch memory alone
    held_out = np.arange(100)
    values, threshold = fused_with(scores, held_out, "patch_knn_top")
    plain = calibrate({name: scores[name][held_out] for name in FUSED_FROM}, "fused", FUSED_FROM)
    assert values[-1] > threshold and plain.fuse(scores)[-1] <= plain.threshold("fused", 0.99)
    assert (values[100:-1] > threshold).mean() < 0.05
    np.testing.assert_array_less(plain.fuse(scores) - 1e-9, values)  # one more part: never lower


def test_the_compared_fusions_hold_the_parts_before_the_colour_memory_and_each_patch_part():
    """The benches measure the default `fused` beside the fused score of the parts before the
    colour memory joined them, calibrated alike, and with each patch score the run has."""
    from bench.detection import FUSED_BEFORE, compared_fusions
    from pipeline.scores import FUSED_FROM
    from pipeline.thresholds import calibrate

    generator = np.random.default_rng(1)
    scores = {name: generator.lognormal(0.0, 0.2, 300) for name in (*FUSED_FROM, "patch_knn_max")}
    held_out = np.arange(120)
    fusions = compared_fusions(scores, held_out)
    assert set(fusions) == {"fused+patch_knn_max", "fused@mse,ssim_top,stem_knn"}
    before = calibrate({name: scores[name][held_out] for name in FUSED_BEFORE}, "fused", FUSED_BEFORE)
    values, threshold = fusions["fused@mse,ssim_top,stem_knn"]
    np.testing.assert_allclose(values, before.fuse(scores))
    assert threshold == before.threshold("fused", 0.99)
    assert "colour_top" in FUSED_FROM and "colour_top" not in FUSED_BEFORE
    del scores["patch_knn_max"]
    assert set(compared_fusions(scores, held_out)) == {"fused@mse,ssim_top,stem_knn"}
