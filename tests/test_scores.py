"""The score registry: every score named once, computed only when asked for, and `--scores` parsed by it."""

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.inference import ImageScorer, load_inference_model, resolve_precision
from pipeline.scores import (
    DEFAULT_SCORE,
    FUSED_FROM,
    SCORE_COLUMNS,
    SCORES,
    computable,
    map_for_score,
    parse_scores,
)
from pipeline.scoring import COMPUTE, ScoreInputs, compute_scores, reconstruction_scores
from pipeline.thresholds import Calibration


def test_every_registered_score_has_a_way_to_be_computed():
    for name, spec in SCORES.items():
        assert spec.pools_grid or spec.needs == "scores" or name in COMPUTE, name
    assert set(COMPUTE) <= set(SCORES), "a compute function for a score the registry does not name"
    assert SCORE_COLUMNS[0] == "mse" and SCORE_COLUMNS[-1] == "fused"
    assert FUSED_FROM == ("mse", "ssim_top", "stem_knn", "colour_top") and DEFAULT_SCORE == "fused"
    assert computable(has_bank=False) == ("mse", "ssim_error", "err_max", "err_top", "ssim_max", "ssim_top",
                                          "gms_max", "gms_top")
    assert computable(has_bank=True, fused_from=FUSED_FROM, has_head=True, has_patch_bank=True,
                      has_colours=True) == SCORE_COLUMNS
    assert "defect_top" not in computable(has_bank=True, fused_from=FUSED_FROM), "defect scores need the head"
    assert computable(has_bank=False, has_head=True)[-2:] == ("defect_max", "defect_top")
    assert "patch_knn_max" not in computable(has_bank=True, fused_from=FUSED_FROM, has_head=True), \
        "patch scores need a patch bank"
    assert computable(has_bank=False, has_patch_bank=True)[-2:] == ("patch_knn_max", "patch_knn_top")
    assert computable(has_bank=False, has_colours=True)[-2:] == ("colour_max", "colour_top")
    assert "colour_top" not in computable(has_bank=True, fused_from=FUSED_FROM, has_patch_bank=True), \
        "colour scores need a colour memory"
    assert computable(has_bank=False, fused_from=FUSED_FROM)[-1] == "gms_top", "fused needs stem_knn"


def test_the_map_shown_for_a_score_comes_from_the_registry():
    assert [map_for_score(s) for s in ("mse", "ssim_error", "gms_top", "latent_knn")] == ["err", "ssim", "gms", "err"]
    assert map_for_score("fused", FUSED_FROM) == "err"
    assert map_for_score("fused", ("stem_knn", "gms_max")) == "gms"
    assert map_for_score("defect_top") == "defect"
    assert map_for_score("patch_knn_max") == "patch"


def test_scores_parses_default_all_and_lists():
    every = computable(True, FUSED_FROM, has_colours=True)
    assert parse_scores(None, every, "fused", FUSED_FROM) == ("mse", "ssim_top", "stem_knn", "colour_top", "fused")
    assert parse_scores(None, every, "gms_top", FUSED_FROM) == ("mse", "gms_top")
    assert parse_scores("all", every, "fused", FUSED_FROM) == every
    assert parse_scores(" gms_top, err_max ", every, "err_max", FUSED_FROM) == ("err_max", "gms_top")
    assert parse_scores("fused", every, "fused", FUSED_FROM) == ("mse", "ssim_top", "stem_knn", "colour_top", "fused")
    with pytest.raises(InputError, match=r"unknown score\(s\) 'nope'; give all or .*: mse, ssim_error, .*fused"):
        parse_scores("mse,nope", every, "mse", FUSED_FROM)
    with pytest.raises(InputError, match="give all or a comma-separated list"):
        parse_scores(",", every, "mse", FUSED_FROM)
    with pytest.raises(InputError, match="the score that sets is_anomaly, fused, is not among them"):
        parse_scores("mse", every, "fused", FUSED_FROM)
    with pytest.raises(InputError, match="cannot compute stem_knn"):
        parse_scores("stem_knn", computable(False), "stem_knn")


def test_only_the_maps_a_requested_score_reads_are_made():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((2, 3, 32, 32), dtype=np.float32))
    x_hat = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    every = reconstruction_scores(x, x_hat)
    inputs = ScoreInputs(x, x_hat)
    some = compute_scores(["mse", "err_top"], inputs)
    assert list(some) == ["mse", "err_top"]
    assert set(inputs._maps) == {"err"} and "ssim" not in vars(inputs), "no SSIM or GMS map was made"
    for name, values in some.items():
        np.testing.assert_array_equal(values.numpy(), every[name].numpy())


def test_image_scorer_computes_only_what_is_asked_with_the_same_values(tiny_model):
    from pipeline.checkpoint import load_checkpoint

    model, checkpoint = load_inference_model(tiny_model)
    calibration = Calibration.from_dict(checkpoint.calibration)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.random((4, 3, 32, 32), dtype=np.float32))
    ids = ["a", "b", "c", "d"]
    colours = checkpoint.colours
    full = ImageScorer(model, checkpoint.bank, calibration, colours=colours)(x, ids)["scores"]
    # every score of a banked model with a colour memory and without a defect head or patch bank
    assert tuple(full) == computable(True, FUSED_FROM, has_colours=True)
    only = ImageScorer(model, checkpoint.bank, calibration, ["gms_max"], colours=colours)(x, ids)["scores"]
    assert tuple(only) == ("gms_max",)
    fused = ImageScorer(model, checkpoint.bank, calibration, ["fused"], colours=colours)(x, ids)["scores"]
    assert tuple(fused) == ("mse", "ssim_top", "stem_knn", "colour_top", "fused")
    for name, values in {**only, **fused}.items():
        np.testing.assert_allclose(values, full[name], rtol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="cannot compute"):
        ImageScorer(model, None, calibration, ["stem_knn"])
    assert load_checkpoint(tiny_model).bank is not None


def test_a_bfloat16_forward_pass_scores_as_float32_does(tmp_path):
    """The convolutions in bfloat16, everything after them in float32: each score moves by a
    small share of its spread over the batch, the images rank alike, and the latents and
    statistics come back as float32."""
    from tests.builders import make_tiny_model

    url = make_tiny_model(str(tmp_path / "model"), train_steps=60)
    model, checkpoint = load_inference_model(url)
    calibration = Calibration.from_dict(checkpoint.calibration)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((24, 3, 32, 32), dtype=np.float32))
    x[:12] = x[:12] * 0.2 + 0.4  # half the batch low-contrast, so the scores spread
    exact = ImageScorer(model, checkpoint.bank, calibration, precision="float32")(x)
    half = ImageScorer(model, checkpoint.bank, calibration, precision="bfloat16")(x)
    assert half["z"].dtype == np.float32 and half["stem_stats"].dtype == np.float32
    np.testing.assert_allclose(half["z"], exact["z"], atol=0.05 * float(np.abs(exact["z"]).max()))
    for name, values in exact["scores"].items():
        spread = float(values.max() - values.min())
        assert np.abs(half["scores"][name] - values).max() < 0.05 * spread, name
        assert np.corrcoef(half["scores"][name], values)[0, 1] > 0.99, name


def test_precisions_resolve_and_unknown_ones_are_refused():
    assert resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int4", "cpu")
