"""The Fire and plain autoencoders: shapes over the config range, and the size claim."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import (
    AutoencoderConfig,
    FireAutoencoder,
    PlainAutoencoder,
    build_model,
    count_parameters,
)


@pytest.mark.parametrize("arch", ["fire", "plain"])
@pytest.mark.parametrize("image_size,channels,latent_dim", [(32, 1, 16), (64, 3, 128), (64, 1, 64), (256, 3, 32)])
def test_output_shapes(arch, image_size, channels, latent_dim):
    config = AutoencoderConfig(arch=arch, image_size=image_size, channels=channels, latent_dim=latent_dim)
    model = build_model(config).eval()
    x = torch.rand(2, channels, image_size, image_size)
    with torch.inference_mode():
        out = model(x)
    assert set(out) == {"z", "x_hat", "stem_stats"}
    assert out["z"].shape == (2, latent_dim)
    assert out["stem_stats"].shape == (2, 2 * config.base_width) and torch.isfinite(out["stem_stats"]).all()
    assert out["x_hat"].shape == x.shape
    assert 0.0 <= out["x_hat"].min() and out["x_hat"].max() <= 1.0
    # encode/decode are the two halves of forward
    with torch.inference_mode():
        torch.testing.assert_close(model.decode(model.encode(x)), out["x_hat"])


def test_build_model_picks_the_architecture():
    assert type(build_model(AutoencoderConfig(arch="fire"))) is FireAutoencoder
    assert type(build_model(AutoencoderConfig(arch="plain"))) is PlainAutoencoder


@pytest.mark.parametrize("image_size", [64, 128])
def test_fire_is_much_smaller_and_cheaper_than_plain(image_size):
    stats = {}
    for arch in ("fire", "plain"):
        model = build_model(AutoencoderConfig(arch=arch, image_size=image_size)).eval()
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(torch.rand(1, 3, image_size, image_size))
        stats[arch] = (count_parameters(model), counter.get_total_flops())
    assert stats["fire"][0] < stats["plain"][0]
    assert stats["fire"][1] * 5 <= stats["plain"][1]  # convolutions dominate FLOPs at every size
    if image_size == AutoencoderConfig().image_size:
        # At larger sizes the (shared) latent projection's parameters weigh more.
        assert stats["fire"][0] * 5 <= stats["plain"][0]


def test_same_latent_size_and_widths_in_both():
    fire = build_model(AutoencoderConfig(arch="fire"))
    plain = build_model(AutoencoderConfig(arch="plain"))
    assert fire.to_latent.weight.shape == plain.to_latent.weight.shape
    assert fire.from_latent.weight.shape == plain.from_latent.weight.shape


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_size": 48 + 8}, "multiple of 16"),
        ({"image_size": 512}, "multiple of 16 from 32 to 256"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"arch": "resnet"}, "arch must be one of"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"squeeze_ratio": 0.0}, "squeeze_ratio"),
        ({"pct_3x3": 1.0}, "pct_3x3"),
        ({"channels": 1, "mean": (0.5, 0.5, 0.5)}, "mean and std need 1 values"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = AutoencoderConfig(arch="plain", image_size=32, channels=1, latent_dim=8, mean=(0.4,), std=(0.2,))
    assert AutoencoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        AutoencoderConfig.from_dict({**config.to_dict(), "depth": 3})


def test_channels_last_gives_the_same_output():
    model = build_model(AutoencoderConfig()).eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        reference = model(x)["x_hat"]
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))["x_hat"]
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["fire", "plain"])
def test_fused_inference_model_gives_the_same_outputs(arch):
    from pipeline.model import fuse_for_inference

    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(arch=arch, image_size=32))
    model.train()
    with torch.no_grad():  # non-trivial running statistics to fold
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32))
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(4, 3, 32, 32)
    with torch.inference_mode():
        a, b = model(x), fused(x)
    torch.testing.assert_close(b["z"], a["z"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["x_hat"], a["x_hat"], atol=1e-5, rtol=1e-4)
