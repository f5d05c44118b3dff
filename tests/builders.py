"""Builders of small real artefacts the tests share: a tiny checkpoint with a real calibration."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.model import AutoencoderConfig, build_model
from pipeline.scoring import calibration_from_errors, mse_per_image
from pipeline.synth import synthetic_image


def make_tiny_model(url: str, channels: int = 3, seed: int = 0, image_size: int = 32, train_steps: int = 0) -> str:
    """A real checkpoint of a tiny Fire autoencoder (latent 16, base width 8) at `url`.

    Untrained by default (its weights come from `seed`); `train_steps` > 0 fits it briefly to
    40 synthetic images, enough for its decoder to draw distinct images from distinct latents.
    The calibration holds the model's real errors on 32 images.
    """
    torch.manual_seed(seed)
    model = build_model(AutoencoderConfig(image_size=image_size, channels=channels, latent_dim=16, base_width=8))
    if train_steps:
        x = torch.from_numpy(np.stack([synthetic_image(i, 3, image_size, channels) for i in range(40)]))
        x = x.permute(0, 3, 1, 2).float() / 255
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(train_steps):
            loss = mse_per_image(x, model(x)["x_hat"]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    x = torch.rand(32, channels, image_size, image_size)
    with torch.inference_mode():
        errors = mse_per_image(x, model(x)["x_hat"]).numpy()
    save_checkpoint(url, model, training={"calibration": calibration_from_errors(errors),
                                          "preprocessing": {"resize": "pad"}})
    return url
