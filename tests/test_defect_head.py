"""The learned defect map: a Fire U-Net on (image, reconstruction) that learns where synthetic
corruptions are; the train job trains it, and it survives export with its scores calibrated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.checkpoint import load_checkpoint, read_checkpoint_meta, scores_of
from pipeline.corruptions import corrupt
from pipeline.inference import ImageScorer, load_inference_model
from pipeline.model import AutoencoderConfig, DefectHead, build_model, fuse_for_inference
from pipeline.synth import synthetic_image, write_synthetic_corpus
from pipeline.thresholds import Calibration
from pipeline.train import TrainConfig, defect_loss, train

HEADED = AutoencoderConfig(image_size=32, latent_dim=16, base_width=16, defect_head=True)


def _images(n: int, seed: int) -> torch.Tensor:
    pixels = np.stack([synthetic_image(i, seed, 32, 3) for i in range(n)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


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


def test_the_head_learns_where_corruptions_are_against_a_fixed_reconstruction():
    """The head and its loss can localise: trained on (corrupted image, a blurred clean copy
    standing in for a reconstruction), it ranks corrupted pixels of unseen images far above clean
    ones. (Trained jointly with the autoencoder the head needs much longer: its input is only
    informative once the autoencoder has learnt to restore.)"""
    torch.manual_seed(0)
    head = DefectHead(3, 16, 0.125, 0.5)
    optimizer = torch.optim.AdamW(head.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    images = _images(256, seed=3)

    def blurred(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    for _ in range(700):
        x = images[torch.randint(0, len(images), (16,), generator=generator)]
        seen, mask = corrupt(x, generator, share=0.5)
        loss = defect_loss(head(torch.cat([seen, blurred(x)], dim=1)), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = _images(48, seed=11)
    seen, mask = corrupt(x, torch.Generator().manual_seed(123), share=1.0)
    with torch.inference_mode():
        probability = torch.sigmoid(head.eval()(torch.cat([seen, blurred(x)], dim=1)))
    assert roc_auc_score((mask > 0.5).flatten().numpy(), probability.flatten().numpy()) > 0.8


@pytest.mark.ray
def test_the_train_job_trains_exports_and_calibrates_the_head(ray_local, tmp_path):
    data = tmp_path / "shards"
    write_synthetic_corpus(str(data), n=256, image_size=32, anomaly_fraction=0.0, seed=4, rows_per_shard=128)
    cfg = TrainConfig(data_url=str(data), out_url=str(tmp_path / "run"), model=HEADED, epochs=2, batch_size=16,
                      val_fraction=0.1, lr=5e-3, workers=1)
    torch.manual_seed(cfg.seed)
    initial = build_model(HEADED).state_dict()
    result = train(cfg)
    exported = load_checkpoint(result.model_url)
    assert exported.config.defect_head, "the exported config does not describe the head"
    trained = exported.model.state_dict()
    head_weights = [name for name in trained if name.startswith("defect.")]
    assert head_weights and any(not torch.equal(trained[n], initial[n]) for n in head_weights), "the head never trained"
    # Its scores are the model's like any other: computable, calibrated, and probabilities.
    assert {"defect_max", "defect_top"} <= set(scores_of(read_checkpoint_meta(result.model_url)))
    assert {"defect_max", "defect_top"} <= set(exported.calibration["scores"])
    model, checkpoint = load_inference_model(result.model_url)
    scorer = ImageScorer(model, checkpoint.bank, Calibration.from_dict(checkpoint.calibration),
                         scores=("defect_max", "defect_top"))
    values = scorer(_images(8, seed=11))["scores"]
    assert set(values) == {"defect_max", "defect_top"}
    assert bool(((values["defect_top"] >= 0) & (values["defect_top"] <= values["defect_max"])
                 & (values["defect_max"] <= 1)).all())
