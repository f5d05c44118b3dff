"""Checkpoints: bit-identical round trip, no pickle, DDP prefixes, and clear refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.model import AutoencoderConfig, build_model


def _trained_looking_model(config=AutoencoderConfig(image_size=32, latent_dim=16)):
    torch.manual_seed(0)
    model = build_model(config)
    model.train()
    with torch.no_grad():  # move the BatchNorm running stats off their defaults
        model(torch.rand(8, config.channels, config.image_size, config.image_size))
    return model.eval()


@pytest.mark.parametrize("arch", ["fire", "plain"])
def test_round_trip_is_bit_identical(tmp_path, arch):
    model = _trained_looking_model(AutoencoderConfig(arch=arch, image_size=32, channels=1, latent_dim=8))
    save_checkpoint(str(tmp_path / "ckpt"), model, training={"epochs": 3, "calibration": {"p99": 0.01}})
    loaded = load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    assert loaded.training["epochs"] == 3 and loaded.calibration == {"p99": 0.01}
    assert not loaded.model.training
    x = torch.rand(4, 1, 32, 32)
    with torch.inference_mode():
        a, b = model(x), loaded.model(x)
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["x_hat"], b["x_hat"])


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    save_checkpoint(str(tmp_path), _trained_looking_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["model"]["arch"] == "fire" and len(meta["weights_sha256"]) == 64
    assert load_file(tmp_path / WEIGHTS_FILE)  # plain safetensors, readable by anyone


def test_ddp_prefix_is_stripped(tmp_path):
    model = _trained_looking_model()
    save_checkpoint(str(tmp_path), model)
    weights = load_file(tmp_path / WEIGHTS_FILE)
    save_file({f"module.{k}": v for k, v in weights.items()}, tmp_path / WEIGHTS_FILE)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta.pop("weights_sha256")  # a DDP-era checkpoint written by other tools has no digest
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = load_checkpoint(str(tmp_path))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x)["x_hat"], model(x)["x_hat"])


def test_tampered_weights_are_refused(tmp_path):
    save_checkpoint(str(tmp_path), _trained_looking_model())
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the digest"):
        load_checkpoint(str(tmp_path))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    save_checkpoint(str(tmp_path), _trained_looking_model())
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta["model"]["latent_dim"] = 32  # config edited after the fact
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"do not fit .* shape mismatches .*to_latent"):
        load_checkpoint(str(tmp_path))
    meta["model"]["arch"] = "plain"
    meta["model"]["latent_dim"] = 16
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing .* tensors"):
        load_checkpoint(str(tmp_path))


def test_pickle_file_is_refused_without_running_it(tmp_path):
    save_checkpoint(str(tmp_path), _trained_looking_model())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, tmp_path / WEIGHTS_FILE)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    meta.pop("weights_sha256")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "not a checkpoint: config.json not found"),
        (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / CONFIG_FILE).write_text('{"format": "other"}'), "is not a squeeze-autoencoder checkpoint"),
        (lambda d: (d / CONFIG_FILE).write_text('{"format": "squeeze-autoencoder", "format_version": 1, "model": {"channels": 5}}'),
         "bad model config: .*channels must be 1 or 3"),
        (lambda d: (d / CONFIG_FILE).write_text('{"format": "squeeze-autoencoder", "format_version": 1, "model": {}}'),
         "model.safetensors not found"),
    ],
)
def test_non_checkpoints_are_refused_with_what_is_wrong(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tmp_path))


def test_round_trip_through_memory_filesystem():
    model = _trained_looking_model()
    save_checkpoint("memory://ckpts/run1", model)
    loaded = load_checkpoint("memory://ckpts/run1")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x)["z"], model(x)["z"])
