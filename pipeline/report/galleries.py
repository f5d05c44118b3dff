"""The worst and typical images shown as original | reconstruction | error heat map, and the
latent interpolation strip: the report's only use of the model, so its only file that needs torch.

Gallery rows are fetched from the image shards by id (`fetch_images`: the format's reader,
pipeline.formats), never a scan into memory. The images are decoded as
the model was trained and reconstructed on the driver (a few dozen images). torch is imported inside the functions so
that the Ray tasks of the scan passes, which import this package, never load it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.images import decode_batch, encode_image
from pipeline.report.output import gallery_file
from pipeline.scores import map_for_score
from pipeline.shards import Columns, ShardList

RECONSTRUCT_BATCH = 64
IMAGE_KINDS = ("original", "reconstruction", "error")
HEAT_PERCENTILE = 99.5


def fetch_images(shards: ShardList, columns: Columns, ids: Sequence[str]) -> dict[str, bytes | None]:
    """Encoded images of `ids` from the listed image shards (any format and id kind: their reader)."""
    return shards.reader(columns).fetch(ids)


def _heat_map(error: np.ndarray, scale: float) -> np.ndarray:
    """(S, S) anomaly map -> (S, S, 3) uint8 through the 'inferno' colour map, 0..scale."""
    import matplotlib

    colours = matplotlib.colormaps["inferno"](np.clip(error / scale, 0.0, 1.0))
    return (colours[..., :3] * 255).round().astype(np.uint8)


def _reconstruct(model, pixels: dict[str, np.ndarray], map_name: str, precision: str, patch_bank=None,
                 colours=None) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{id: (S, S, C) uint8} -> {id: (reconstruction (S, S, C) uint8, anomaly map (S, S), mse)};
    the map is drawn at the image's size (a tiled model's: assembled at its working size). The
    embed job's scorer makes them, at its `precision`, so each mse is the one the latents hold."""
    import torch

    from pipeline.inference import ImageScorer, to_input, to_pixels

    scorer = ImageScorer(model, scores=("mse",), precision=precision, patch_bank=patch_bank, colours=colours)
    ids, out = list(pixels), {}
    for start in range(0, len(ids), RECONSTRUCT_BATCH):
        chunk = ids[start:start + RECONSTRUCT_BATCH]
        result = scorer(to_input(torch.from_numpy(np.stack([pixels[i] for i in chunk]))), maps=(map_name,))
        errors, mse, images = result["maps"][map_name].numpy(), result["scores"]["mse"], to_pixels(result["x_hat"])
        for n, i in enumerate(chunk):
            out[i] = (images[n], errors[n], float(mse[n]))
    return out


def _error_scale(reconstructed: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> float:
    """One colour scale for every heat map, so maps compare; a high percentile rather than the
    maximum, so that one glaring defect does not turn every other map black."""
    errors = np.concatenate([e.ravel() for _, e, _ in reconstructed.values()]) if reconstructed else np.zeros(1)
    return max(float(np.percentile(errors, HEAT_PERCENTILE)), 1e-6)


def _entries(galleries: dict[str, list[dict]], decoded: dict[str, tuple[np.ndarray, str | None]],
             reconstructed: dict[str, tuple[np.ndarray, np.ndarray, float]], scale: float,
             ) -> tuple[dict[str, list[dict]], dict[str, bytes]]:
    """Each gallery row with its image files or a note saying why it has none; the PNGs by name."""
    files: dict[str, bytes] = {}
    entries: dict[str, list[dict]] = {}
    for name, rows in galleries.items():
        entries[name] = []
        for rank, row in enumerate(rows, start=1):
            entry = {**row, "rank": rank, "recomputed_mse": None, "images": None, "note": None}
            if row["id"] not in decoded:
                entry["note"] = "not found in --data"
            elif decoded[row["id"]][1] is not None:
                entry["note"] = f"cannot decode: {decoded[row['id']][1]}"
            else:
                reconstruction, error, mse = reconstructed[row["id"]]
                entry["recomputed_mse"] = mse
                entry["images"] = {kind: gallery_file(name, rank, kind) for kind in IMAGE_KINDS}
                for kind, pixels in zip(IMAGE_KINDS, (decoded[row["id"]][0], reconstruction, _heat_map(error, scale))):
                    files[entry["images"][kind]] = encode_image(pixels)
            entries[name].append(entry)
    return entries, files


def build_galleries(model_url: str, images: dict[str, bytes | None], galleries: dict[str, list[dict]],
                    notes: list[str], score: str, precision: str = "float32",
                    ) -> tuple[dict[str, list[dict]], dict[str, bytes], float, str]:
    """Reconstruct each gallery row from its fetched image (`fetch_images`), with the heat map of
    the map behind `score`, by the model as the embed job ran it (folded, at the latents'
    recorded `precision`); returns entries, {relative file name: PNG bytes}, the heat maps'
    scale and the map's name."""
    from pipeline.inference import load_inference_model

    model, checkpoint = load_inference_model(model_url)
    map_name = map_for_score(score, (checkpoint.calibration or {}).get("fused_from", ()))
    config = checkpoint.config
    resize = (checkpoint.training.get("preprocessing") or {}).get("resize") or "pad"
    ids = list(dict.fromkeys(r["id"] for rows in galleries.values() for r in rows))
    missing = [i for i in ids if i not in images]
    if missing:
        notes.append(f"{len(missing)} gallery ids were not found in --data (e.g. {missing[0]!r})")
    present = [i for i in ids if i in images]
    pixels, reasons = decode_batch([images[i] for i in present], config.input_size, config.channels, resize)
    decoded = {i: (pixels[n], reasons[n]) for n, i in enumerate(present)}
    reconstructed = _reconstruct(model, {i: p for i, (p, reason) in decoded.items() if reason is None},
                                 map_name, precision, checkpoint.patch_bank, checkpoint.colours)
    scale = _error_scale(reconstructed)
    entries, files = _entries(galleries, decoded, reconstructed, scale)
    return entries, files, scale, map_name


def interpolation_strip(model_url: str, latents_url: str, ids: tuple[str, str], steps: int) -> bytes:
    """PNG of `steps` images decoded along the line between two ids' latents (pipeline.inference)."""
    from pipeline import inference

    try:
        strip = np.asarray(inference.interpolation_grid(model_url, latents_url, ids[0], ids[1], steps=steps))
    except (KeyError, ValueError) as e:  # ValueError: InputError among others
        raise InputError(f"--interpolate: {e}") from e
    if strip.dtype != np.uint8 or strip.ndim != 3:
        raise InputError(f"interpolation_grid returned {strip.dtype} {strip.shape}, expected (H, W, C) uint8")
    return encode_image(strip)
