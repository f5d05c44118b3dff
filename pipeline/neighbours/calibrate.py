"""The duplicate threshold, calibrated rather than guessed: how far a copy of an image lands from it.

From the image shards (`--data`, normally the model's training data; any format embed reads)
an id-hash sample of up to N images is drawn (the N smallest keyed hashes of the id for the seed: the same images on
every run, whatever the file layout). Each gets one edited copy, deterministic per seed and
id, made by one edit kind (edits.py: crop, rescale, JPEG, border, overlay, and flip when
asked for); the kinds take turns along the sample's hash order, so each has a near-equal share.
Originals and copies are decoded as the embed job decodes them, encoded by the model, and
stored as the latents are (int8 or float16 round trip), so the distances are those the index sees.

- positives: each original to its own copy;
- negatives: each original to its nearest other original.
The threshold is the largest distance whose false-positive rate on the negatives is at most
`max_false_positive_rate` (0.1%), or the `positive_quantile` (99th percentile) of the
positives if that is lower; the record keeps the value, which rule set it, and the recall on
positives and false-positive rate on negatives it gives, in all and for each edit kind
(`recall_by_edit`: what the threshold catches of crops, rescales, ...). A copy that cannot be
made of an image the embed job decodes is counted (`copies_failed`, the first cause in
`copy_failure`); past `MAX_COPY_FAILURE_SHARE` of the images the calibration stops with `JobFailed`.

Limits: negatives among N sampled images are farther apart than an image and its nearest
neighbour in the whole corpus, so the rate on the corpus is higher than on the sample; and if
the sample itself holds near-duplicates they read as negatives and pull the threshold down
(`negatives_under_positive_median` counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.errors import InputError, JobFailed
from pipeline.images import decode_batch
from pipeline.latents import dequantize_latents, quantize_latents
from pipeline.neighbours.edits import Edits, edited_copy
from pipeline.sampling import sample_keys
from pipeline.shards import Columns, ShardList

MIN_IMAGES = 20  # fewer usable pairs than this give no meaningful rate
MAX_COPY_FAILURE_SHARE = 0.05  # of the decodable images whose copy failed, beyond which calibration stops
ENCODE_BATCH = 64


def sample_images(shards: ShardList, columns: Columns, n: int, seed: int) -> list[tuple[str, bytes | None]]:
    """(id, image bytes) of the seed's id-hash sample of `n` rows, in id order, from any format (its reader)."""
    return shards.reader(columns).sample(n, seed)


def encode_images(model_url: str, images: Sequence[bytes | None], latent_dtype: str, precision: str = "float32",
                  ) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """(decoded ok (N,) bool, reasons, (N, D) latents) of encoded images, as the embed job would store
    them (the model's size and resize policy, the forward pass's precision; int8 / float16 round
    trip), dequantized."""
    import torch

    from pipeline.inference import ImageScorer, load_inference_model, to_input

    model, checkpoint = load_inference_model(model_url)
    encoder = ImageScorer(model, scores=(), precision=precision)  # the latents only, as embed made them
    config = checkpoint.config
    resize = (checkpoint.training.get("preprocessing") or {}).get("resize") or "pad"
    reasons: list[str | None] = []
    z = np.zeros((len(images), config.latent_dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), ENCODE_BATCH):
            chunk = images[start:start + ENCODE_BATCH]
            pixels, chunk_reasons = decode_batch(chunk, config.input_size, config.channels, resize)
            reasons += chunk_reasons
            z[start:start + len(chunk)] = encoder(to_input(torch.from_numpy(pixels)))["z"]
    return np.array([r is None for r in reasons], bool), reasons, dequantize_latents(*quantize_latents(z, latent_dtype))


def choose_threshold(positives: np.ndarray, negatives: np.ndarray, max_false_positive_rate: float,
                     positive_quantile: float) -> dict[str, Any]:
    """The threshold rule (module docstring) and what it gives on the calibration distances."""
    negatives = np.sort(negatives)
    allowed = int(np.floor(max_false_positive_rate * len(negatives)))  # negatives that may fall under it
    by_rate = float(np.nextafter(negatives[allowed], 0)) if allowed < len(negatives) else float(negatives[-1])
    by_positives = float(np.quantile(positives, positive_quantile))
    value = min(by_rate, by_positives)
    return {
        "value": value,
        "rule": "false-positive rate" if by_rate <= by_positives else f"positives' {positive_quantile:g} quantile",
        "recall_on_positives": float(np.mean(positives <= value)),
        "false_positive_rate_on_negatives": float(np.mean(negatives <= value)),
        "max_false_positive_rate": max_false_positive_rate,
        "positive_quantile": positive_quantile,
        "by_false_positive_rate": by_rate,
        "by_positive_quantile": by_positives,
        "positives": len(positives),
        "negatives": len(negatives),
        "positive_distances": _quantiles(positives),
        "negative_distances": _quantiles(negatives),
        "negatives_under_positive_median": int(np.sum(negatives <= np.median(positives))),
    }


def nearest_other_distances(z: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance from each row of (N, D) float32 `z` to its nearest other row: the negatives."""
    import faiss

    squared, rows = faiss.knn(z, z, 2)
    own = rows[:, 0] == np.arange(len(z))  # identical rows may come back in either order
    return np.sqrt(np.maximum(np.where(own, squared[:, 1], squared[:, 0]), 0))


def edit_kinds(keys: Sequence[int], kinds: Sequence[str]) -> list[str]:
    """The edit kind of each sampled image: the kinds in turn along the keys' order (near-equal
    shares, the same on every run of the same sample)."""
    order = np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")
    assigned = [""] * len(keys)
    for rank, position in enumerate(order.tolist()):
        assigned[position] = kinds[rank % len(kinds)]
    return assigned


def recall_by_edit(positives: np.ndarray, kinds: np.ndarray, names: Sequence[str], threshold: float,
                   ) -> dict[str, dict[str, Any]]:
    """{kind: copies, the share within `threshold` of their original, the median distance}, in `names`' order."""
    out = {}
    for name in names:
        mine = positives[kinds == name]
        out[name] = {"copies": int(len(mine)),
                     "recall": float(np.mean(mine <= threshold)) if len(mine) else None,
                     "median_distance": float(np.median(mine)) if len(mine) else None}
    return out


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"{q:g}": float(np.quantile(values, q)) for q in (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)}


def calibrate_threshold(model_url: str, shards: ShardList, columns: Columns, images: int, seed: int,
                        latent_dtype: str, max_false_positive_rate: float = 0.001,
                        positive_quantile: float = 0.99, edits: Edits = Edits(), precision: str = "float32",
                        ) -> dict[str, Any]:
    """Sample, copy, encode, measure, choose: the threshold record (`choose_threshold`) with its inputs."""
    sample = sample_images(shards, columns, images, seed)
    keys = sample_keys([i for i, _ in sample], seed)
    originals, copies, causes = [data for _, data in sample], [], {}
    kinds = edit_kinds(keys, edits.kinds)
    for (row_id, data), key, kind in zip(sample, keys, kinds):
        try:
            copies.append(edited_copy(data, kind, np.random.default_rng(int(key)), edits))
        except Exception as error:  # noqa: BLE001 - kept with its cause; counted below if the original decodes
            copies.append(None)
            causes[row_id] = f"{type(error).__name__}: {error}"
    ok, _, z = encode_images(model_url, [*originals, *copies], latent_dtype, precision)
    n = len(originals)
    # An image the embed job's decoder refuses has no latent either, so its failed copy is no
    # loss; a copy that failed for an image it accepts points at a bug (or an unusual corpus).
    copy_failures = [(row_id, causes[row_id]) for (row_id, _), decoded in zip(sample, ok[:n])
                     if decoded and row_id in causes]
    if copy_failures and len(copy_failures) > MAX_COPY_FAILURE_SHARE * int(ok[:n].sum()):
        row_id, cause = copy_failures[0]
        raise JobFailed(f"no calibration copy could be made of {len(copy_failures)} of the {int(ok[:n].sum())} "
                        f"decodable calibration images (first: id {row_id!r}, {cause}); give "
                        "--duplicate-threshold value:X instead, or report this as a bug")
    pair_ok = ok[:n] & ok[n:]
    z_orig, z_copy = z[:n][pair_ok], z[n:][pair_ok]
    if len(z_orig) < MIN_IMAGES:
        raise InputError(f"only {len(z_orig)} of the {len(sample)} calibration images from --data could be "
                         f"decoded and copied (at least {MIN_IMAGES} are needed); give --duplicate-threshold "
                         "value:X instead")
    positives = np.linalg.norm(z_orig - z_copy, axis=1)
    negatives = nearest_other_distances(z_orig)
    record = choose_threshold(positives, negatives, max_false_positive_rate, positive_quantile)
    record["recall_by_edit"] = recall_by_edit(positives, np.asarray(kinds)[pair_ok], edits.kinds, record["value"])
    record.update(images_sampled=len(sample), images_used=int(len(z_orig)), images_skipped=len(sample) - len(z_orig),
                  copies_failed=len(copy_failures), copy_failure=copy_failures[0][1] if copy_failures else None,
                  seed=seed, latent_dtype=latent_dtype, edits=asdict(edits))
    return record
