"""A checkpoint as the inference jobs run it, and what they do with it besides scoring.

`load_inference_model` is the one loader behind the embed job's `Embedder`, the decode job's
`LatentDecoder` and the report's interpolation strip: the checkpoint's model with BatchNorm
folded into the convolutions and channels_last memory (the same outputs as the trained
model to float rounding, so a decoded pixel may differ by one level).

`ImageScorer` runs the forward pass at a `--precision`: float32, or bfloat16 (the convolutions
and matrix products in bfloat16 under autocast; scores, statistics and latents stay float32).
"auto" takes bfloat16 where the device computes it natively and float32 elsewhere
(bench/forward_pass.py measures both, with reconstruction PSNR and detection beside them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_meta
from pipeline.colour_memory import ColourMemory
from pipeline.latents import check_model_fits, read_latent_rows
from pipeline.model import fuse_for_inference
from pipeline.patch_memory import PatchBank
from pipeline.resources import keep_freed_memory
from pipeline.scores import SCORES, computable, with_inputs
from pipeline.scoring import ScoreInputs, TrainingBank, compute_scores, upsample
from pipeline.thresholds import Calibration


def load_inference_model(model_url: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Checkpoint]:
    """(folded channels_last model in eval mode, the checkpoint it came from). The process keeps
    freed memory from now on (`pipeline.resources.keep_freed_memory`): it is going to run the model."""
    keep_freed_memory()
    checkpoint = load_checkpoint(model_url, device=device)
    return fuse_for_inference(checkpoint.model).to(memory_format=torch.channels_last), checkpoint


PRECISIONS = ("auto", "float32", "bfloat16")
# Tiles a tiled model's scorer runs in one call: 512 tiles of 128 px are 100 MB of float32 input.
MAX_TILES = 512


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware: a CPU with AVX512-BF16 or AMX, a CUDA GPU
    that supports it. Elsewhere bfloat16 is emulated, and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"float32" or "bfloat16": what `precision` (one of PRECISIONS) means on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


def forward_precision(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass at `precision` (one of PRECISIONS) runs in on `device`: autocast
    to bfloat16, or nothing for float32. Every inference forward pass goes through it, so a score
    recomputed later (the report's galleries) matches the one the embed job wrote."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageScorer:
    """Images -> their latents, stem statistics and anomaly scores: what the embed job writes and
    what training calibrates, computed in one place.

    `scores` names the scores to compute (None: every one the model can, `computable`: the
    reconstruction scores; the neighbour scores with a training bank; the fused score when the
    calibration says how to fuse; the patch scores with a `patch_bank`; the colour scores with a
    `colours` memory, pipeline.colour_memory). The scores a requested
    one reads (the fused score's parts) are computed too; no map is made that no requested score
    reads, and the encoder's feature maps are kept only for the patch scores. `precision` is the
    forward pass's (PRECISIONS; `resolve_precision` on the model's device).
    """

    def __init__(self, model: torch.nn.Module, bank: TrainingBank | None = None,
                 calibration: Calibration | None = None, scores: Sequence[str] | None = None,
                 precision: str = "float32", patch_bank: PatchBank | None = None,
                 colours: ColourMemory | None = None):
        self.model, self.bank, self.calibration, self.patch_bank = model, bank, calibration, patch_bank
        self.colours = colours
        device = next(model.parameters()).device
        self.precision = resolve_precision(precision, device)
        self._device = device
        fused_from = calibration.fused_from if calibration is not None else ()
        available = computable(bank is not None, fused_from, has_head=getattr(model, "defect", None) is not None,
                               has_patch_bank=patch_bank is not None, has_colours=colours is not None)
        self.score_names = available if scores is None else with_inputs(scores, fused_from)
        unavailable = [name for name in self.score_names if name not in available]
        if unavailable:
            raise ValueError(f"this model cannot compute {unavailable}; it computes {available}")
        self._of_scores = [name for name in self.score_names if SCORES[name].needs == "scores"]
        self._computed = [name for name in self.score_names if name not in self._of_scores]
        self._needs_features = any(SCORES[name].needs == "patches" for name in self._computed)
        self.grid = model.config.tile_grid()  # None: the model sees images whole

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, ids: Sequence[str] | None = None, features: bool = False,
                 maps: Sequence[str] = ()) -> dict[str, Any]:
        """(B, C, S, S) in [0, 1] (and the images' ids) -> {"z", "stem_stats", "scores": {name: (B,)}};
        with `features`, also "features": the model's local maps, the stem's and the down stages',
        float32 (what a patch bank is built from; a tiled model's are its tiles'); with `maps`
        (names in pipeline.scores.MAPS), also "x_hat" (B, C, S, S) and "maps": {name: (B, S, S)},
        each drawn over its image, as the report's galleries show them.

        A tiled model (`AutoencoderConfig.tile_grid`) takes images at its working size and runs
        at most MAX_TILES tiles a call, so memory stays bounded whatever the working size."""
        step = self.images_per_call(len(x))
        parts = [self._one_call(x[start:start + step], None if ids is None else ids[start:start + step],
                                features, maps) for start in range(0, max(1, len(x)), step)]  # an empty batch: one call
        if len(parts) == 1:
            return parts[0]
        merged: dict[str, Any] = {"z": np.concatenate([p["z"] for p in parts]),
                                  "stem_stats": np.concatenate([p["stem_stats"] for p in parts]),
                                  "scores": {name: np.concatenate([p["scores"][name] for p in parts])
                                             for name in parts[0]["scores"]}}
        if features:
            merged["features"] = [torch.cat(stage) for stage in zip(*(p["features"] for p in parts))]
        if maps:
            merged["x_hat"] = torch.cat([p["x_hat"] for p in parts])
            merged["maps"] = {name: torch.cat([p["maps"][name] for p in parts]) for name in maps}
        return merged

    def images_per_call(self, batch: int) -> int:
        """How many of a batch's images one model call takes: all of them, or as many as MAX_TILES
        tiles hold (at least one)."""
        return max(1, batch) if self.grid is None else self.grid.images_per_call(MAX_TILES)

    def _one_call(self, x: torch.Tensor, ids: Sequence[str] | None, features: bool,
                  maps: Sequence[str]) -> dict[str, Any]:
        grid = self.grid
        seen = x if grid is None else grid.cut(x)
        with forward_precision(self.precision, self._device):
            out = self.model(seen, features=features or self._needs_features or "patch" in maps)
        stages = [stage.float() for stage in out["features"]] if "features" in out else None
        z, stem_stats = out["z"].float(), out["stem_stats"].float()
        if grid is not None:  # an image's latent and stem statistics: the means of its tiles'
            z, stem_stats = grid.mean_per_image(z), grid.mean_per_image(stem_stats)
        inputs = ScoreInputs(seen, out["x_hat"], z, stem_stats, ids, self.bank, out.get("defect_logits"),
                             stages, self.patch_bank, grid, self.colours)
        values = {name: score.float().cpu().numpy() for name, score in compute_scores(self._computed, inputs).items()}
        for name in self._of_scores:  # the fused score: its parts on the calibration's common scale
            values[name] = self.calibration.fuse(values).astype(np.float32)
        result = {"z": z.cpu().numpy(), "stem_stats": stem_stats.cpu().numpy(), "scores": values}
        if features:
            result["features"] = stages
        if maps:
            x_hat = out["x_hat"].float()
            result["x_hat"] = x_hat if grid is None else grid.assemble(x_hat)
            size = tuple(x.shape[-2:])
            result["maps"] = {name: upsample(inputs.image_map(name), size) for name in maps}
        return result

    def rows(self, x: torch.Tensor, ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The same as one flat mapping, one entry per image: "z", "stem_stats" and every score
        by name (the form `calibrate_with_bank` reads)."""
        out = self(x, ids)
        return {"z": out["z"], "stem_stats": out["stem_stats"], **out["scores"]}


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """(B, S, S, C) uint8 -> (B, C, S, S) float in [0, 1]; the permute leaves it channels_last."""
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def to_pixels(x_hat: torch.Tensor) -> np.ndarray:
    """(B, C, S, S) floats in [0, 1] -> (B, S, S, C) uint8, rounded to nearest."""
    return x_hat.float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def decode_latents(model: torch.nn.Module, z: np.ndarray, device: str | torch.device = "cpu") -> np.ndarray:
    """(B, latent_dim) float32 -> (B, S, S, C) uint8: the model's decoder, rounded to pixels."""
    return to_pixels(model.decode(torch.from_numpy(np.ascontiguousarray(z, np.float32)).to(device)))


def interpolation_grid(model_url: str, latents_url: str, id_a: str, id_b: str, steps: int = 8) -> np.ndarray:
    """An (S, steps * S, C) uint8 strip: `steps` images decoded along the straight line from
    id_a's latent to id_b's (dequantized), both endpoints included."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (both endpoints), got {steps}")
    check_model_fits(latents_url, read_checkpoint_meta(model_url), model_url)
    z = read_latent_rows(latents_url, [id_a, id_b])
    model, _ = load_inference_model(model_url)
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]  # (steps, 1)
    line = (1.0 - t) * z[id_a][None] + t * z[id_b][None]  # (steps, latent_dim)
    line[-1] = z[id_b]  # exact endpoint, whatever (1 - 1) * a + 1 * b rounds to
    pixels = decode_latents(model, line)  # (steps, S, S, C)
    return np.concatenate(list(pixels), axis=1)  # (S, steps * S, C)
