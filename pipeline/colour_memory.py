"""Colour memory: how rare each pixel's colour (or grey level) is among the training images' pixels.

The reconstruction scores ask whether the autoencoder redraws a place; the neighbour and patch
scores whether a description of it looks like the training images'. Neither asks the plainest
question: has this colour been seen here at all? An autoencoder redraws a stain, a whole image
in the wrong colours or a region darker than the surface ever is well enough, because it
learned to reproduce colours, not to refuse new ones. A memory of the colours themselves can.

The memory is a histogram of the training images' pixel values, LEVELS bins per channel
(LEVELS^3 for colour, LEVELS for grey), counted over a fixed number of random pixels of each
training image, smoothed by a Gaussian of one bin (so that a colour next to common ones is not
called rare because of where bin edges fall), and one sample's worth of prior spread over every
bin (so no bin is impossible). A pixel's rarity is -log of its bin's probability: a few units
for common colours, around log(samples x bins) for colours never seen. The map is the rarity of
each pixel, averaged on the map grid like the squared error; `colour_max` and `colour_top` pool
it. It holds no model weights and is built without the model: `train` stores one with every
model it exports (pipeline.checkpoint's COLOUR_FILE).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors
from scipy.ndimage import gaussian_filter

LEVELS = 32  # bins per channel: 8 pixel levels each
SAMPLES = 1_000_000  # training pixels counted in all, spread over the images (at least SAMPLES_PER_INPUT each)
SAMPLES_PER_INPUT = 64
SMOOTHING = 1.0  # the histogram's Gaussian blur, in bins
PRIOR = 1.0  # samples' worth of counts spread evenly over every bin


def colour_bins(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, H, W) int32: each pixel's histogram bin, channel-major."""
    channels = x.shape[1]
    places = torch.tensor([float(LEVELS ** (channels - 1 - c)) for c in range(channels)], device=x.device)
    # The channels' levels weighted by their place, summed by a 1 x 1 convolution: one pass over a
    # channels_last batch, exact in float32 (bins stay below 2^24); never under autocast. int32,
    # not int64: the table lookup (`ColourMemory.rarity_map`) reads half the bytes.
    with torch.autocast(x.device.type, enabled=False):
        levels = x.float().mul(LEVELS).floor_().clamp_(0, LEVELS - 1)
        return torch.nn.functional.conv2d(levels, places.view(1, channels, 1, 1))[:, 0].int()


def samples_per_input(inputs: float, pixels: int) -> int:
    """Random pixels counted from each of about `inputs` training inputs of `pixels` pixels."""
    return int(min(pixels, max(SAMPLES_PER_INPUT, SAMPLES // max(1.0, inputs))))


def sample_bins(x: torch.Tensor, per_input: int, generator: np.random.Generator) -> np.ndarray:
    """(n,) int64 bins of `per_input` random pixels (drawn with replacement) of each image in `x`."""
    bins = colour_bins(x).flatten(1).cpu().numpy()
    if bins.size == 0:
        return np.zeros(0, np.int64)
    picks = generator.integers(0, bins.shape[1], size=(bins.shape[0], per_input))
    return np.take_along_axis(bins, picks, axis=1).ravel()


class ColourMemory:
    """A histogram of training pixel values (`counts`, LEVELS bins along each of C axes), and the
    rarity of every bin it gives."""

    def __init__(self, counts: np.ndarray):
        counts = np.asarray(counts, dtype=np.float32)
        if counts.ndim < 1 or any(side != LEVELS for side in counts.shape):
            raise ValueError(f"a colour memory's counts are {LEVELS} bins per channel, got shape {counts.shape}")
        if not counts.sum() > 0:
            raise ValueError("a colour memory needs at least one counted pixel")
        self.counts = counts
        smooth = gaussian_filter(counts.astype(np.float64), SMOOTHING, mode="nearest")
        smooth *= counts.sum() / smooth.sum()  # the blur keeps the total at the image's edges
        probability = (smooth + PRIOR / smooth.size) / (counts.sum() + PRIOR)
        self.rarity = (-np.log(probability)).astype(np.float32).ravel()  # by flat bin

    @property
    def channels(self) -> int:
        return self.counts.ndim

    @classmethod
    def from_bins(cls, bins: np.ndarray, channels: int) -> ColourMemory:
        """The memory of the sampled pixels' `bins` (`colour_bins` values of `channels`-channel images)."""
        counts = np.bincount(np.asarray(bins, np.int64).ravel(), minlength=LEVELS ** channels)
        return cls(counts[:LEVELS ** channels].reshape((LEVELS,) * channels))

    @functools.lru_cache(maxsize=4)  # noqa: B019 -- one table per device, for the memory's life
    def _table(self, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.rarity).to(device)

    @classmethod
    def from_pixels(cls, pixels: np.ndarray, seed: int, batch: int = 256) -> ColourMemory:
        """The memory of (N, S, S, C) uint8 training images in memory, sampled as the train job
        samples its bank (`samples_per_input` pixels of each)."""
        from pipeline.inference import to_input  # inference imports this module

        per_input = samples_per_input(len(pixels), pixels.shape[1] * pixels.shape[2])
        generator = np.random.default_rng(seed)
        bins = [sample_bins(to_input(torch.from_numpy(pixels[start:start + batch])), per_input, generator)
                for start in range(0, len(pixels), batch)]
        return cls.from_bins(np.concatenate(bins), pixels.shape[-1])

    def rarity_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, H, W): each pixel's rarity among the training pixels."""
        if x.shape[1] != self.channels:
            raise ValueError(f"this colour memory is of {self.channels}-channel images, got {x.shape[1]} channels")
        bins = colour_bins(x)
        # index_select with int32 indices: a quarter of the time of indexing by an int64 tensor on
        # a CPU in a one-off profile (*unrecorded note*).
        return torch.index_select(self._table(x.device), 0, bins.flatten()).view(bins.shape)

    def to_bytes(self) -> bytes:
        return save_safetensors({"counts": self.counts})

    @classmethod
    def from_bytes(cls, data: bytes) -> ColourMemory:
        return cls(load_safetensors(data)["counts"])
