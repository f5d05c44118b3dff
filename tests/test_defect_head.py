"""The learned defect map: a Fire U-Net on (image, reconstruction) that learns, through the train
job, where synthetic corruptions are; it survives export and loads without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.checkpoint import load_checkpoint, read_checkpoint_meta, scores_of
from pipeline.corruptions import corrupt
from pipeline.inference import ImageScorer, load_inference_model
from pipeline.model import AutoencoderConfig, build_model, fuse_for_inference
from pipeline.synth import synthetic_image, write_synthetic_corpus
from pipeline.thresholds import Calibration
from pipeline.train import TrainConfig, defect_loss, train

HEADED = AutoencoderConfig(image_size=32, latent_dim=16, base_width=16, defect_head=True)


def _images(n: int, seed: int) -> torch.Tensor:
    pixels = np.stack([synthetic_image(i, seed, 32, 3) for i in range(n)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def _pixel_auroc(model: torch.nn.Module, x: torch.Tensor) -> float:
    """How well the head's map ranks corrupted pixels above clean ones, on fresh corruptions."""
    seen, mask = corrupt(x, torch.Generator().manual_seed(123), share=1.0)
    with torch.inference_mode():
        probability = torch.sigmoid(model.eval()(seen)["defect_logits"])
    return float(roc_auc_score((mask > 0.5).flatten().numpy(), probability.flatten().numpy()))


def test_the_head_maps_every_pixel_and_folds_for_inference():
    model = build_model(HEADED).eval()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out["defect_logits"].shape == (2, 32, 32)
    torch.testing.assert_close(fuse_for_inference(model)(x)["defect_logits"], out["defect_logits"],
                               atol=1e-4, rtol=1e-4)
    assert "defect_logits" not in build_model(AutoencoderConfig(image_size=32))(x)


def test_the_focal_loss_is_lower_for_the_right_map():
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:4, 2:4] = 1
    right, wrong = 8 * (2 * mask - 1), -8 * (2 * mask - 1)
    assert float(defect_loss(right, mask)) < 1e-3 < float(defect_loss(wrong, mask))


@pytest.mark.ray
def test_the_head_learns_where_corruptions_are_through_the_train_job(ray_local, tmp_path):
    data = tmp_path / "shards"
    write_synthetic_corpus(str(data), n=256, image_size=32, anomaly_fraction=0.0, seed=4, rows_per_shard=128)
    cfg = TrainConfig(data_url=str(data), out_url=str(tmp_path / "run"), model=HEADED, epochs=6, batch_size=16,
                      val_fraction=0.1, lr=5e-3, workers=1)
    x = _images(48, seed=11)  # images the model never trained on
    torch.manual_seed(cfg.seed)
    untrained = _pixel_auroc(build_model(HEADED), x)
    result = train(cfg)
    exported = load_checkpoint(result.model_url)
    assert exported.config.defect_head, "the exported config does not describe the head"
    learned = _pixel_auroc(exported.model, x)
    assert learned > max(0.75, untrained + 0.15), (untrained, learned)
    # Its scores are the model's like any other: computed, calibrated and ranking corrupted images high.
    assert {"defect_max", "defect_top"} <= set(scores_of(read_checkpoint_meta(result.model_url)))
    assert {"defect_max", "defect_top"} <= set(exported.calibration["scores"])
    model, checkpoint = load_inference_model(result.model_url)
    scorer = ImageScorer(model, checkpoint.bank, Calibration.from_dict(checkpoint.calibration),
                         scores=("defect_top",))
    seen, mask = corrupt(x, torch.Generator().manual_seed(7), share=0.5)
    corrupted = (mask.flatten(1).amax(dim=1) > 0).numpy()
    values = scorer(seen)["scores"]["defect_top"]
    assert float(roc_auc_score(corrupted, values)) > 0.8
