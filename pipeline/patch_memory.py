"""Local feature memory: what normal looks like, patch by patch (PatchCore's idea, our own encoder).

A reconstruction error says how badly the autoencoder redraws a place; it cannot say that a
place it redraws well is unlike anything in the training images. A memory of the training
images' local features can: every location of an image is described by the trained encoder's
mid-level maps (the second and third down stages of `model(x, features=True)["features"]`), each
averaged over its 3 x 3 neighbourhood so a description covers a small patch rather than a
pixel, the coarser map upsampled onto the finer one, and the concatenation projected to
`dim` numbers by a fixed random matrix (distances survive a random projection, and the
memory and its search shrink with it).

Or (`train --patch-features texture`) a location is described by how the stem's responses are
spread around it: each channel's mean and standard deviation over a window of a quarter and of
a half of the model's input side, at 7 x 7 places of each input. That is the local form of the
stem statistics by which `stem_knn` compares whole images: a textured surface is told apart
less by its local mean than by how much its responses vary there. These numbers are scaled by
their spread over the training candidates before the random projection, so that no channel's
scale decides the distance.

The memory bank holds such descriptions from training images, subsampled: a greedy coreset
(each pick the candidate farthest from everything picked so far, so rare-but-normal patches
are kept and the common ones are not kept many times over) or a uniform random sample.
At scoring time each location's distance to its nearest bank entry is its anomaly value:
a (B, h, w) map at a quarter of the model's input resolution (7 x 7 places for texture), which
the scores pool (and tiles assemble) like every other map.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

PATCH_DIM = 64  # numbers per patch description after the random projection
SELECTION_DIM = 32  # the coreset's distances are taken after a further projection to this many
SAMPLERS = ("coreset", "random")
# What describes a place, by name (`train --patch-features`): "stages": the mid-level down
# stages' maps averaged over 3 x 3 cells; "texture": the stem's window statistics at two window sizes.
DESCRIPTIONS = ("stages", "texture")
TEXTURE_PLACES = 7  # a side's places of the texture description, one every eighth of the stem map
DEVICE_SEARCH_CHUNK = 1 << 26  # numbers in one (queries, bank) distance block on a GPU: 256 MiB of float32


def patch_descriptions(features: list[torch.Tensor]) -> torch.Tensor:
    """The encoder's stage maps [(B, C1, h, w), (B, C2, h/2, w/2), ...] -> (B, C1 + C2 + ..., h, w):
    each averaged over 3 x 3 neighbours and brought to the finest map's resolution."""
    size = features[0].shape[-2:]
    parts = []
    for stage in features:
        smooth = torch.nn.functional.avg_pool2d(stage.float(), 3, stride=1, padding=1, count_include_pad=False)
        if smooth.shape[-2:] != size:
            smooth = torch.nn.functional.interpolate(smooth, size=size, mode="bilinear", align_corners=False)
        parts.append(smooth)
    return torch.cat(parts, dim=1)


def window_statistics(maps: torch.Tensor, window: int, stride: int, padding: int = 0) -> torch.Tensor:
    """(B, C, h, w) -> (B, 2C, h', w'): each channel's mean and standard deviation over every
    `window` x `window` square, one every `stride` cells (a square the border cuts: over its inside)."""
    pool = functools.partial(torch.nn.functional.avg_pool2d, kernel_size=window, stride=stride, padding=padding,
                             count_include_pad=False)
    maps = maps.float()
    mean = pool(maps)
    # E[h^2] - E[h]^2: one pooling pass more rather than a second map of deviations.
    spread = (pool(maps * maps) - mean * mean).clamp_min(0).sqrt()
    return torch.cat([mean, spread], dim=1)


def texture_descriptions(stem: torch.Tensor, peak: bool = True) -> torch.Tensor:
    """The stem's map (B, C, n, n) -> (B, 5C, 7, 7): at places one every n/8 cells, the window
    statistics of the n/4-cell square around each place and of the n/2-cell one (a quarter and a
    half of the model's input side; both squares share their centres), and the peak: how far each
    channel's largest response in the smaller square stands above its mean there (a few bright or
    dark pixels move a square's mean and spread little, its peak much). `peak=False`: (B, 4C, 7, 7),
    the description before the peak was added."""
    step = max(1, min(stem.shape[-2:]) // (TEXTURE_PLACES + 1))
    small = window_statistics(stem, 2 * step, step)
    parts = [small, window_statistics(stem, 4 * step, step, padding=step)]
    if peak:
        parts.append(torch.nn.functional.max_pool2d(stem.float(), 2 * step, step) - small[:, :stem.shape[1]])
    return torch.cat(parts, dim=1)


def describe(features: list[torch.Tensor], description: str = "stages", channels: int | None = None) -> torch.Tensor:
    """The model's local maps (`model(x, features=True)["features"]`: the stem's, then the down
    stages') -> (B, channels, h, w): every place described as `description` (DESCRIPTIONS) says.
    `channels`: the numbers a place has in the bank being searched; a texture bank saved before the
    peak was added (4 per stem channel) is described as it was built."""
    if description == "stages":
        return patch_descriptions(features[1:])
    if description == "texture":
        return texture_descriptions(features[0], peak=channels != 4 * features[0].shape[1])
    raise ValueError(f"description must be one of {DESCRIPTIONS}, got {description!r}")


def random_projection(channels: int, dim: int = PATCH_DIM, seed: int = 0) -> np.ndarray:
    """(channels, dim) Gaussian matrix scaled by 1 / sqrt(dim): distances kept in expectation."""
    generator = np.random.default_rng(seed)
    return (generator.standard_normal((channels, dim)) / np.sqrt(dim)).astype(np.float32)


def project(descriptions: torch.Tensor, projection: np.ndarray) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w, dim): every location's description in the bank's space."""
    matrix = torch.from_numpy(projection).to(descriptions.device)
    return descriptions.permute(0, 2, 3, 1) @ matrix


def standardising_projection(candidates: np.ndarray, dim: int = PATCH_DIM, seed: int = 0) -> np.ndarray:
    """(channels, dim): each of the (N, channels) candidates' numbers divided by its spread over
    them, then a random projection to `dim`. A number that never varies is divided by a floor
    (a millionth of the largest spread), not by zero."""
    spread = candidates.astype(np.float64).std(axis=0)
    spread = np.maximum(spread, max(float(spread.max()) * 1e-6, 1e-12))
    return (random_projection(candidates.shape[1], dim, seed) / spread[:, None]).astype(np.float32)


def greedy_coreset(candidates: np.ndarray, size: int, seed: int = 0, selection_dim: int = SELECTION_DIM) -> np.ndarray:
    """Indices of `size` rows of `candidates` (N, D) chosen by greedy k-centre: each pick is the
    row farthest from all rows picked so far. Distances are taken after a random projection to
    `selection_dim` (PatchCore's speed-up); the rows kept are the full ones."""
    n = len(candidates)
    if size >= n:
        return np.arange(n)
    points = torch.from_numpy(candidates.astype(np.float32))
    if points.shape[1] > selection_dim:
        points = points @ torch.from_numpy(random_projection(points.shape[1], selection_dim, seed + 1))
    squares = points.pow(2).sum(dim=1)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = np.random.default_rng(seed).integers(n)
    nearest = torch.full((n,), float("inf"))
    for i in range(size):
        if i:
            chosen[i] = int(nearest.argmax())
        latest = points[chosen[i]]
        distance = squares - 2 * (points @ latest) + latest.pow(2).sum()  # (N,) squared distances
        torch.minimum(nearest, distance, out=nearest)
    return chosen


def subsample(candidates: np.ndarray, size: int, sampler: str = "coreset", seed: int = 0) -> np.ndarray:
    """`size` rows of `candidates` by the named sampler (SAMPLERS)."""
    if sampler == "coreset":
        index = greedy_coreset(candidates, size, seed)
    elif sampler == "random":
        index = np.random.default_rng(seed).permutation(len(candidates))[:size]
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return candidates[np.sort(index)]


@dataclass
class PatchBank:
    """Training patches in the projected space, the projection that put them there, and what
    describes a place (one of DESCRIPTIONS)."""

    patches: np.ndarray  # (N, dim) float32
    projection: np.ndarray  # (channels, dim) float32
    description: str = "stages"

    def __post_init__(self) -> None:
        self.patches = np.ascontiguousarray(self.patches, dtype=np.float32)
        self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        if self.description not in DESCRIPTIONS:
            raise ValueError(f"a patch bank's description must be one of {DESCRIPTIONS}, got {self.description!r}")
        if self.patches.ndim != 2 or self.patches.shape[1] != self.projection.shape[1] or not len(self.patches):
            raise ValueError(f"a patch bank needs (N >= 1, {self.projection.shape[1]}) patches, "
                             f"got {self.patches.shape}")
        self._index = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def channels(self) -> int:
        return self.projection.shape[0]

    def _search(self):
        if self._index is None:
            import faiss

            self._index = faiss.IndexFlatL2(self.patches.shape[1])
            self._index.add(self.patches)
        return self._index

    def distance_map(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The model's local maps -> (B, h, w): every location's Euclidean distance to its
        nearest bank patch. On the CPU faiss searches; on a GPU the search is an exact matrix
        product on the device, so the maps never go to the host."""
        located = project(describe(features, self.description, self.channels), self.projection)  # (B, h, w, dim)
        flat = located.reshape(-1, located.shape[-1])
        if located.device.type == "cpu":
            squared = self._faiss_nearest(flat)
        else:
            squared = self._nearest_on_device(flat)
        return squared.clamp_min(0).sqrt().view(located.shape[:3])

    def _faiss_nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(Q, dim) on the CPU -> (Q,) squared distance to the nearest bank patch."""
        import faiss

        index = self._search()
        faiss.omp_set_num_threads(torch.get_num_threads())  # the caller's thread budget (an actor's share)
        squared, _ = index.search(np.ascontiguousarray(flat.detach().float().numpy()), 1)
        return torch.from_numpy(squared[:, 0])

    def _nearest_on_device(self, flat: torch.Tensor, chunk_elements: int = DEVICE_SEARCH_CHUNK) -> torch.Tensor:
        """(Q, dim) on any device -> (Q,) squared distance to the nearest bank patch, exactly:
        |q|^2 + min over the bank of (|p|^2 - 2 q.p), queries in chunks so that the (chunk, N)
        product stays under `chunk_elements` numbers. The bank is copied to the device once."""
        if flat.device not in self._on_device:
            patches = torch.from_numpy(self.patches).to(flat.device)
            self._on_device[flat.device] = (patches.T.contiguous(), patches.pow(2).sum(dim=1)[None])
        columns, squares = self._on_device[flat.device]
        flat = flat.float()
        rows = max(1, chunk_elements // columns.shape[1])
        return torch.cat([torch.addmm(squares, part, columns, beta=1.0, alpha=-2.0).amin(dim=1) + part.pow(2).sum(dim=1)
                          for part in flat.split(rows)])  # no queries: one empty part

    def to_bytes(self) -> bytes:
        return save_safetensors({"patches": self.patches, "projection": self.projection,
                                 "description": np.frombuffer(self.description.encode(), dtype=np.uint8)})

    @classmethod
    def from_bytes(cls, data: bytes) -> PatchBank:
        tensors = load_safetensors(data)
        # Banks saved before there was a choice hold no description: theirs is "stages".
        description = bytes(tensors["description"]).decode() if "description" in tensors else "stages"
        return cls(tensors["patches"], tensors["projection"], description)


def feature_channels(model: torch.nn.Module, channels: int, image_size: int, description: str = "stages") -> int:
    """How many numbers `describe` gives per location for `model` (from its widths)."""
    with torch.inference_mode():
        probe = torch.zeros(1, channels, image_size, image_size, device=next(model.parameters()).device)
        return describe(model(probe, features=True)["features"], description).shape[1]


def candidate_patches(features: list[torch.Tensor], projection: np.ndarray, count: int,
                      generator: np.random.Generator, description: str = "stages") -> np.ndarray:
    """(B, min(count, h * w), dim) float32: that many distinct random locations of each image,
    described and projected as the bank holds them."""
    located = project(describe(features, description), projection)  # (B, h, w, dim)
    flat = located.reshape(located.shape[0], -1, located.shape[-1])
    count = min(count, flat.shape[1])
    picks = torch.from_numpy(np.stack([generator.permutation(flat.shape[1])[:count]
                                       for _ in range(flat.shape[0])]))  # (B, count)
    chosen = torch.gather(flat, 1, picks.to(flat.device)[..., None].expand(-1, -1, flat.shape[-1]))
    return chosen.float().cpu().numpy()


def bank_from_candidates(candidates: np.ndarray, projection: np.ndarray, size: int, sampler: str = "coreset",
                         seed: int = 0, max_candidates: int | None = None, description: str = "stages",
                         dim: int = PATCH_DIM) -> PatchBank:
    """A bank of `size` of the (N, dim) candidate patches, chosen by `sampler` (from a random
    `max_candidates` of them when there are more). Texture candidates come in `projection`'s
    space unprojected (`candidate_projection`): they are standardised and projected to `dim` here."""
    if not len(candidates):
        raise ValueError("no training images to build a patch bank from")
    if max_candidates is not None and len(candidates) > max_candidates:
        candidates = candidates[np.random.default_rng(seed).permutation(len(candidates))[:max_candidates]]
    if description == "texture":
        standardising = standardising_projection(candidates, dim, seed)
        projection, candidates = projection @ standardising, candidates @ standardising
    return PatchBank(subsample(candidates, size, sampler, seed), projection, description)


def candidate_projection(channels: int, description: str = "stages", dim: int = PATCH_DIM, seed: int = 0) -> np.ndarray:
    """The projection candidates are gathered in: the bank's random one for "stages"; for
    "texture" none yet (the identity), since its scaling is read off the candidates themselves."""
    if description == "texture":
        return np.eye(channels, dtype=np.float32)
    return random_projection(channels, dim, seed)


def build_patch_bank(feature_batches, size: int, sampler: str = "coreset", dim: int = PATCH_DIM,
                     candidates_per_batch: int = 4096, max_candidates: int = 200_000, seed: int = 0,
                     description: str = "stages") -> PatchBank:
    """A bank of `size` patches from an iterable of the model's local maps (one list per batch
    of training images): up to `candidates_per_batch` random locations of each batch are
    candidates (at most `max_candidates` in all), then `sampler` keeps `size` of them."""
    generator = np.random.default_rng(seed)
    projection, pool, total = None, [], 0
    for features in feature_batches:
        if projection is None:
            projection = candidate_projection(describe(features, description).shape[1], description, dim, seed)
        per_image = -(-min(candidates_per_batch, max_candidates - total) // features[0].shape[0])
        pool.append(candidate_patches(features, projection, per_image, generator, description)
                    .reshape(-1, projection.shape[1]))
        total += len(pool[-1])
        if total >= max_candidates:
            break
    if projection is None:
        raise ValueError("no training images to build a patch bank from")
    return bank_from_candidates(np.concatenate(pool)[:max_candidates], projection, size, sampler, seed,
                                description=description, dim=dim)

