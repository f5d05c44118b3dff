"""The squeeze autoencoder: SqueezeNet Fire modules on both sides of a convolutional autoencoder.

A Fire module squeezes its input to few channels with a 1x1 convolution, then expands them
again with parallel 1x1 and 3x3 convolutions whose outputs are concatenated. Most of a
plain network's parameters sit in wide 3x3 convolutions; Fire keeps only a share of the
expand filters 3x3 and feeds them a squeezed input, which is where the savings come from.

The decoder mirrors the encoder with "fire-deconv" modules (SqueezeSeg): the 2x upsampling
runs on the squeezed channels, where it is cheap, before the expand.

`PlainAutoencoder` has the same widths, resolutions, bottleneck and latent size but plain
3x3 convolutions in place of every Fire module: the baseline for the claim that squeezing
costs little quality for a large cut in parameters and FLOPs.

Both models take images as floats in [0, 1], shape (B, C, S, S), and return
`{"z": (B, latent_dim), "x_hat": (B, C, S, S) in [0, 1], "stem_stats": (B, 2 * base_width)}`:
the latent, the reconstruction, and the mean and standard deviation of each channel of the
first layer's output (which colours, edges and textures the image is made of: a cheap
description that the anomaly scores compare across images).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from pipeline.tiles import TileGrid

ARCHITECTURES = ("fire", "plain")
MAX_WORKING_SIZE = 4096  # px a side of a tiled model's images: 48 MB of float32 RGB each
BlockFactory = Callable[[int, int], nn.Module]  # (in_channels, out_channels) -> block
# The down stages whose maps local scores read: mid-level, as PatchCore takes ResNet's layers 2
# and 3 (local enough to place a defect, deep enough to describe texture rather than pixels).
FEATURE_STAGES = (2, 3)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Everything needed to rebuild a model; saved as JSON in every checkpoint.

    Widths follow SqueezeNet's macro-parameters: the stem has `base_width` channels and each
    of the three stages doubles it; a Fire module with E expand channels squeezes to
    round(E * squeeze_ratio) channels and makes round(E * pct_3x3) of its expand filters 3x3.
    """

    arch: str = "fire"
    image_size: int = 64
    channels: int = 3
    latent_dim: int = 128
    base_width: int = 32
    squeeze_ratio: float = 0.125
    pct_3x3: float = 0.5
    bottleneck_channels: int = 8
    # A learned defect map (DRAEM's discriminative half): a small Fire U-Net on (input,
    # reconstruction) that says where a defect is; trained on synthetic corruptions.
    defect_head: bool = False
    # Per-channel normalisation applied inside the model; inputs stay in [0, 1].
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    # How the model sees an image (pipeline.tiles). working_size 0: whole, shrunk to image_size.
    # Otherwise tiled: the image is decoded at working_size px and cut into image_size tiles, a
    # new one every tile_stride px (0: half a tile); maps and scores are the image's, assembled.
    working_size: int = 0
    tile_stride: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in ARCHITECTURES:
            problems.append(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if not (32 <= self.image_size <= 256 and self.image_size % 16 == 0):
            problems.append(f"image_size must be a multiple of 16 from 32 to 256, got {self.image_size}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        if self.latent_dim < 1:
            problems.append(f"latent_dim must be positive, got {self.latent_dim}")
        if self.base_width < 4:
            problems.append(f"base_width must be at least 4, got {self.base_width}")
        if not 0.0 < self.squeeze_ratio <= 1.0:
            problems.append(f"squeeze_ratio must be in (0, 1], got {self.squeeze_ratio}")
        if not 0.0 < self.pct_3x3 < 1.0:
            problems.append(f"pct_3x3 must be in (0, 1), got {self.pct_3x3}")
        if self.bottleneck_channels < 1:
            problems.append(f"bottleneck_channels must be positive, got {self.bottleneck_channels}")
        if self.working_size and not self.image_size <= self.working_size <= MAX_WORKING_SIZE:
            problems.append(f"working_size must be 0 (no tiles) or from the tile size {self.image_size} to "
                            f"{MAX_WORKING_SIZE}, got {self.working_size}")
        if self.tile_stride and not (self.working_size and 1 <= self.tile_stride <= self.image_size):
            problems.append(f"tile_stride needs tiles (a working_size) and must be from 1 to the tile size "
                            f"{self.image_size}, got {self.tile_stride}")
        # JSON gives lists back; keep tuples so configs compare and hash as values.
        mean = tuple(float(m) for m in self.mean) or (0.5,) * self.channels
        std = tuple(float(s) for s in self.std) or (0.25,) * self.channels
        if len(mean) != self.channels or len(std) != self.channels:
            problems.append(f"mean and std need {self.channels} values each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            problems.append(f"std must be positive, got {std}")
        if problems:
            raise ValueError("invalid AutoencoderConfig: " + "; ".join(problems))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def stage_widths(self) -> tuple[int, int, int]:
        return (self.base_width * 2, self.base_width * 4, self.base_width * 8)

    @property
    def input_size(self) -> int:
        """Side of the square an image is decoded to: the working size when tiled, the model's input otherwise."""
        return self.working_size or self.image_size

    def tile_grid(self) -> TileGrid | None:
        """Where a tiled model's tiles lie in an image (None when the model sees images whole)."""
        if not self.working_size:
            return None
        return TileGrid.square(self.working_size, self.image_size, self.tile_stride or None)

    @property
    def bottleneck_size(self) -> int:
        """Side of the feature map the encoder flattens: four halvings of the image."""
        return self.image_size // 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoencoderConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**values)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _fire_widths(out_channels: int, squeeze_ratio: float, pct_3x3: float) -> tuple[int, int, int]:
    squeeze = max(1, round(out_channels * squeeze_ratio))
    expand3 = min(out_channels - 1, max(1, round(out_channels * pct_3x3)))
    return squeeze, out_channels - expand3, expand3


class Fire(nn.Module):
    """1x1 squeeze, then parallel 1x1 and 3x3 expand, concatenated. (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, squeeze_ratio: float, pct_3x3: float):
        super().__init__()
        squeeze, expand1, expand3 = _fire_widths(out_channels, squeeze_ratio, pct_3x3)
        self.squeeze = _conv_bn_relu(in_channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1, bias=False)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)  # (B, squeeze, H, W)
        e = torch.cat([self.expand1x1(s), self.expand3x3(s)], dim=1)  # (B, out, H, W)
        return self.act(self.norm(e))


class FireDeconv(nn.Module):
    """Fire with a 2x transposed convolution on the squeezed channels. (B, in, H, W) -> (B, out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int, squeeze_ratio: float, pct_3x3: float):
        super().__init__()
        squeeze, expand1, expand3 = _fire_widths(out_channels, squeeze_ratio, pct_3x3)
        self.squeeze = _conv_bn_relu(in_channels, squeeze, 1)
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(squeeze, squeeze, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(squeeze),
            nn.ReLU(inplace=True),
        )
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1, bias=False)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.upsample(self.squeeze(x))  # (B, squeeze, 2H, 2W)
        e = torch.cat([self.expand1x1(s), self.expand3x3(s)], dim=1)  # (B, out, 2H, 2W)
        return self.act(self.norm(e))


class DefectHead(nn.Module):
    """Where is the defect: (B, 2C, S, S) input and reconstruction, side by side -> (B, S, S) logits.

    A two-level U-Net of Fire modules (skips concatenated, as DRAEM's discriminative network
    has them, at a fraction of its width): comparing the two images needs the full resolution
    (a crack is 1-3 px wide), and deciding that a difference is a defect rather than the
    autoencoder's usual blur needs some context.
    """

    def __init__(self, channels: int, width: int, squeeze_ratio: float, pct_3x3: float):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.inlet = _conv_bn_relu(2 * channels, w1, 3)  # (B, w1, S, S)
        self.down1 = Fire(w1, w2, squeeze_ratio, pct_3x3)  # (B, w2, S/2, S/2) after pooling
        self.down2 = Fire(w2, w3, squeeze_ratio, pct_3x3)  # (B, w3, S/4, S/4) after pooling
        self.up2 = FireDeconv(w3, w2, squeeze_ratio, pct_3x3)  # (B, w2, S/2, S/2)
        self.merge2 = Fire(2 * w2, w2, squeeze_ratio, pct_3x3)
        self.up1 = FireDeconv(w2, w1, squeeze_ratio, pct_3x3)  # (B, w1, S, S)
        self.merge1 = Fire(2 * w1, w1, squeeze_ratio, pct_3x3)
        self.outlet = nn.Conv2d(w1, 1, 1)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        a = self.inlet(pair)  # (B, w1, S, S)
        b = self.down1(nn.functional.max_pool2d(a, 2))  # (B, w2, S/2, S/2)
        c = self.down2(nn.functional.max_pool2d(b, 2))  # (B, w3, S/4, S/4)
        b = self.merge2(torch.cat([self.up2(c), b], dim=1))  # (B, w2, S/2, S/2)
        a = self.merge1(torch.cat([self.up1(b), a], dim=1))  # (B, w1, S, S)
        return self.outlet(a)[:, 0]  # (B, S, S)


class _Autoencoder(nn.Module):
    """Stem, three down stages, a flat latent, three up stages, and an output layer.

    Subclasses only choose the block used in each stage (`down_block` keeps the resolution,
    `up_block` doubles it); everything else (stem, bottleneck,
    latent projection, output layer) is shared so the comparison isolates the blocks.
    """

    def __init__(self, config: AutoencoderConfig, down_block: BlockFactory, up_block: BlockFactory):
        super().__init__()
        self.config = config
        c = config
        w1, w2, w3 = c.stage_widths
        side = c.bottleneck_size
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, -1, 1, 1), persistent=False)

        self.stem = nn.Sequential(  # (B, C, S, S) -> (B, base, S/2, S/2)
            nn.Conv2d(c.channels, c.base_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c.base_width),
            nn.ReLU(inplace=True),
        )
        self.down = nn.Sequential(  # -> (B, w3, S/16, S/16)
            down_block(c.base_width, w1), nn.MaxPool2d(2),
            down_block(w1, w2), nn.MaxPool2d(2),
            down_block(w2, w3), nn.MaxPool2d(2),
        )
        self.to_bottleneck = nn.Conv2d(w3, c.bottleneck_channels, 1)  # (B, bottleneck, S/16, S/16)
        self.to_latent = nn.Linear(c.bottleneck_channels * side * side, c.latent_dim)

        self.from_latent = nn.Linear(c.latent_dim, c.bottleneck_channels * side * side)
        self.from_bottleneck = _conv_bn_relu(c.bottleneck_channels, w3, 1)
        self.up = nn.Sequential(  # (B, w3, S/16, S/16) -> (B, base, S/2, S/2)
            up_block(w3, w2),
            up_block(w2, w1),
            up_block(w1, c.base_width),
        )
        self.head = nn.Sequential(  # (B, base, S/2, S/2) -> (B, 4C, S/2, S/2) -> (B, C, S, S)
            nn.Conv2d(c.base_width, 4 * c.channels, 3, padding=1),
            nn.PixelShuffle(2),  # sub-pixel upsampling: the last conv runs at half resolution
            nn.Sigmoid(),
        )
        self.defect = (DefectHead(c.channels, max(4, c.base_width // 2), c.squeeze_ratio, c.pct_3x3)
                       if c.defect_head else None)

    def _encode(self, x: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(B, C, S, S) in [0, 1] -> (z (B, latent_dim), stem output (B, base, S/2, S/2), the
        outputs of the down stages numbered in `keep` (1: (B, w1, S/2, S/2), 2: (B, w2, S/4, S/4),
        3: (B, w3, S/8, S/8)), before their pooling)."""
        stem = self.stem(torch.addcmul(-self.mean / self.std, x, 1.0 / self.std))  # (B, base, S/2, S/2)
        h, kept = stem, []
        for index, layer in enumerate(self.down):
            h = layer(h)
            if index % 2 == 0 and index // 2 + 1 in keep:  # a block, not a pooling
                kept.append(h)
        h = self.to_bottleneck(h)  # (B, bottleneck, S/16, S/16)
        return self.to_latent(h.flatten(1)), stem, kept  # (B, latent_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> (B, latent_dim)."""
        return self._encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, C, S, S) in [0, 1]."""
        side = self.config.bottleneck_size
        h = torch.relu(self.from_latent(z)).view(-1, self.config.bottleneck_channels, side, side)
        h = self.up(self.from_bottleneck(h))  # (B, base, S/2, S/2)
        return self.head(h)  # (B, C, S, S)

    def forward(self, x: torch.Tensor, features: bool = False) -> dict[str, torch.Tensor]:
        """{"z", "x_hat", "stem_stats"}; "defect_logits" (B, S, S) when the model has a defect head;
        with `features`, also "features": the maps that local (patch) memories describe, the stem's
        and then the second and third down stages' [(B, base, S/2, S/2), (B, w2, S/4, S/4),
        (B, w3, S/8, S/8)] (pipeline.patch_memory.DESCRIPTIONS says which reads which)."""
        z, stem, kept = self._encode(x, FEATURE_STAGES if features else ())
        flat = stem.flatten(2).float()  # (B, base, S*S/4); float32 under autocast too: E[h^2] - E[h]^2 cancels
        mean = flat.mean(dim=2)
        # E[h^2] - E[h]^2 rather than torch.std: one pass, and several times faster on CPU.
        std = (flat.pow(2).mean(dim=2) - mean * mean).clamp_min(0).sqrt()
        out = {"z": z, "x_hat": self.decode(z), "stem_stats": torch.cat([mean, std], dim=1)}
        if self.defect is not None:  # (B, S, S) logits: where the input differs from normal
            out["defect_logits"] = self.defect(torch.cat([x, out["x_hat"]], dim=1))
        if features:
            out["features"] = [stem, *kept]
        return out


class FireAutoencoder(_Autoencoder):
    """Fire modules down, fire-deconv modules up."""

    def __init__(self, config: AutoencoderConfig):
        sr, pct = config.squeeze_ratio, config.pct_3x3
        super().__init__(
            config,
            down_block=lambda i, o: Fire(i, o, sr, pct),
            up_block=lambda i, o: FireDeconv(i, o, sr, pct),
        )


class PlainAutoencoder(_Autoencoder):
    """The baseline: a 3x3 convolution for every Fire module, nearest upsampling on the way up."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__(
            config,
            down_block=lambda i, o: _conv_bn_relu(i, o, 3),
            up_block=lambda i, o: nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv_bn_relu(i, o, 3)),
        )


def _fold_bn_into(conv: nn.Module, bn: nn.BatchNorm2d, start: int = 0) -> None:
    """Fold channels [start, start + out) of an eval-mode BatchNorm into `conv` (in place)."""
    end = start + (conv.out_channels)
    transpose = isinstance(conv, nn.ConvTranspose2d)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean[start:end], bn.running_var[start:end], bn.eps,
        bn.weight[start:end], bn.bias[start:end], transpose=transpose)
    conv.weight, conv.bias = weight, bias


def fuse_for_inference(model: _Autoencoder) -> _Autoencoder:
    """An eval-only copy with every BatchNorm folded into the convolution before it.

    Same outputs (to float rounding), one pass over each feature map less per layer: about
    a tenth of CPU inference time. Do not train the result.
    """
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, (Fire, FireDeconv)):
            _fold_bn_into(module.expand1x1, module.norm, 0)
            _fold_bn_into(module.expand3x3, module.norm, module.expand1x1.out_channels)
            module.norm = nn.Identity()
        if isinstance(module, nn.Sequential):
            children = list(module)
            for i in range(len(children) - 1):
                if isinstance(children[i], (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(children[i + 1], nn.BatchNorm2d):
                    _fold_bn_into(children[i], children[i + 1])
                    module[i + 1] = nn.Identity()
    return fused


def build_model(config: AutoencoderConfig) -> _Autoencoder:
    """The model a config describes, freshly initialised."""
    return {"fire": FireAutoencoder, "plain": PlainAutoencoder}[config.arch](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
