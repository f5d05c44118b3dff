"""Near-duplicates: what a calibrated distance finds of each edit, by kind and strength.

    python bench/duplicates.py                          # both corpora, every descriptor
    python bench/duplicates.py --corpora photos --originals 120

Two corpora, neither used by the tests:
- synthetic: 128 px images of `pipeline.synth` (seed 4242), kept only when clearly distinct
  from every kept one (the family holds a few pairs a few grey levels apart);
- photos: non-overlapping 128 px tiles of scikit-image's photographs (people, animals,
  objects, micrographs, textures), the grey ones as RGB, kept when distinct in the same way
  (flat tiles of a page's margin or the night sky are one image).
Each corpus is split in two. On the first part three models of the default shape (64 px) are
trained briefly (--train-steps), each with the same seed and steps:
- plain: reconstruction alone, as `train` does by default;
- invariance 0.05: with `train --invariance 0.05`'s contrastive term (pipeline.train.invariance);
- pulled to the image 0.3: the other objective tried, each training view's latent pulled to its
  image's (stop-gradient) latent with nothing keeping distinct images apart.
The neighbours job's own calibration (`pipeline.neighbours.calibrate`: the default edits, one
per copy, the 0.1%-false-positive rule) sets each descriptor's threshold on that first part, as
the job calibrates on the model's training data. On the unseen part each original gets one copy
per edit kind and strength (`pipeline.neighbours.edits` with the range pinned to one value;
rotations and colour changes by this script), and the bench reports with that threshold:
- for each edit setting, pair recall: the share of copies within the threshold of their
  original; and precision: of the pairs within it among the originals and those copies, the
  share that are an original and its own copy;
- false pairs: the share of pairs of distinct originals within it;
- over the originals with every copy within the targets (crop to 10%, rescale to 0.5, JPEG
  from 50, borders, overlays to 10%): precision, and group recall: each original with two
  copies of different kinds (drawn per original) is a group of 3, found when its three
  members share one connected component with no other original in it;
- each model's reconstruction PSNR on the unseen originals.

Descriptors:
- latent (today): the plain model's latent, as the neighbours job searches it (int8, as embed
  stores it);
- computed from the plain model, with near-uniform borders cut off the decoded input first:
  - latent, borders trimmed;
  - pooled features: the mean and standard deviation of each encoder stage's channels, and a
    2x2 grid of the last two stages' means, each part L2-normalised;
- the latents of the two models trained for invariance.
Writes docs/bench-results/duplicates.json and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, briefly_trained_model, machine, table, write_results  # noqa: E402
from pipeline.images import decode_batch, encode_image  # noqa: E402
from pipeline.inference import load_inference_model, to_input  # noqa: E402
from pipeline.latents import dequantize_latents, quantize_latents  # noqa: E402
from pipeline.neighbours.calibrate import (  # noqa: E402
    choose_threshold,
    edit_kinds,
    nearest_other_distances,
    recall_by_edit,
)
from pipeline.neighbours.edits import DEFAULT_EDITS, Edits, edited_copy  # noqa: E402
from pipeline.sampling import sample_keys  # noqa: E402
from pipeline.synth import synthetic_image  # noqa: E402
from pipeline.train.invariance import invariance_loss, training_views  # noqa: E402

OUT = Path("bench-output/duplicates")
SIDE = 128
SIZE = 64
BATCH = 128
DISTINCT = 0.04  # mean absolute difference (of 1) at 32 px under which two synthetic images count as one
# Each edit kind at the strengths the issue names; the copy's range is pinned to the one value.
# The targets are the edits up to: crop 10%, rescale 0.5, JPEG 50, borders, overlays of 10%;
# groups of 3 are drawn from those (GROUP_STRENGTHS). The rest shows where a latent distance stops
# calling an image a duplicate: heavier crops, rotations (bench-only edits) and colour changes.
STRENGTHS = {"crop": [0.05, 0.10, 0.15, 0.30, 0.50], "rescale": [0.5, 0.75], "jpeg": [30, 50, 80],
             "border": [0.05, 0.10], "overlay": [0.05, 0.10], "flip": [None], "rotate": [5, 15, 90],
             "colour": ["greyscale", "hue"]}
GROUP_STRENGTHS = {"crop": [0.05, 0.10], "rescale": [0.5, 0.75], "jpeg": [50, 80], "border": [0.05, 0.10],
                   "overlay": [0.05, 0.10]}
FIELD = {"crop": "crop", "rescale": "rescale", "jpeg": "quality", "border": "border", "overlay": "overlay"}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat",
          "brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "horse", "clock", "cell",
          "colorwheel")


# ---------------------------------------------------------------- corpora


def distinct(images, n: int | None = None) -> list[np.ndarray]:
    """The first `n` (all) of `images` that differ from every one kept before by more than DISTINCT."""
    kept, small = [], []
    for image in images:
        thumb = image[::4, ::4].astype(np.float32) / 255
        if all(np.abs(thumb - other).mean() > DISTINCT for other in small):
            kept.append(image)
            small.append(thumb)
            if len(kept) == n:
                break
    return kept


def synthetic_corpus(n: int) -> list[np.ndarray]:
    return distinct((synthetic_image(index, 4242, SIDE, 3) for index in range(100 * n)), n)


def photo_corpus() -> list[np.ndarray]:
    """Non-overlapping SIDE-px tiles of the photographs, shuffled (seeded) so both halves mix them."""
    import skimage.data
    from PIL import Image

    tiles = []
    for name in PHOTOS:
        photo = np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB"))
        for top in range(0, photo.shape[0] - SIDE + 1, SIDE):
            for left in range(0, photo.shape[1] - SIDE + 1, SIDE):
                tiles.append(np.ascontiguousarray(photo[top:top + SIDE, left:left + SIDE]))
    order = np.random.default_rng(0).permutation(len(tiles))
    return distinct(tiles[i] for i in order)  # flat tiles (a page's margin, the night sky) are one image


# ---------------------------------------------------------------- descriptors


def trim_borders(x: torch.Tensor, tolerance: float = 0.08, least: int = 4) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] -> each image's content, near-uniform borders cut off, resized back to S."""
    out = x.clone()
    side = x.shape[-1]
    for b, image in enumerate(x):
        edge = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        content = (image - edge.median(dim=1).values[:, None, None]).abs().amax(0) > tolerance
        rows = torch.nonzero(content.float().mean(1) > 0.02).flatten()
        cols = torch.nonzero(content.float().mean(0) > 0.02).flatten()
        if len(rows) < side // least or len(cols) < side // least:
            continue
        window = image[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        out[b] = torch.nn.functional.interpolate(window[None], size=(side, side), mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
    return out


def pooled(stages: list[torch.Tensor]) -> torch.Tensor:
    normalise = torch.nn.functional.normalize
    parts = [normalise(torch.cat([m.mean((2, 3)), m.std((2, 3))], 1), dim=1) for m in stages]
    parts += [normalise(torch.nn.functional.adaptive_avg_pool2d(m, 2).flatten(1), dim=1) for m in stages[2:]]
    return torch.cat(parts, 1)


# ---------------------------------------------------------------- training objectives


def invariance(weight: float):
    """`train --invariance W`'s term (pipeline.train.invariance), as an extra loss for briefly_trained_model."""
    generator = torch.Generator().manual_seed(0)

    def loss(model, batch: torch.Tensor, out: dict) -> torch.Tensor:
        return weight * invariance_loss(out["z"], model.encode(training_views(batch, generator)))

    return loss


def pull_to_image(weight: float):
    """The other objective tried: each view's latent pulled to its image's (stop-gradient) latent,
    relative to its norm, with nothing keeping distinct images apart."""
    generator = torch.Generator().manual_seed(0)

    def loss(model, batch: torch.Tensor, out: dict) -> torch.Tensor:
        target = out["z"].detach()
        z_view = model.encode(training_views(batch, generator))
        return weight * (z_view - target).pow(2).sum(1).mean() / target.pow(2).sum(1).mean().clamp_min(1e-8)

    return loss


# Each model: (how it is trained: an extra loss, or None for reconstruction alone).
MODELS = {"plain": None, "invariance 0.05": invariance(0.05), "pulled to the image 0.3": pull_to_image(0.3)}
# Each descriptor: (its name in the tables, the model, how it is computed from the decoded input).
DESCRIPTORS = (("latent (today)", "plain", "latent"),
               ("latent, borders trimmed", "plain", "trimmed latent"),
               ("pooled features, borders trimmed", "plain", "pooled"),
               ("latent, --invariance 0.05", "invariance 0.05", "latent"),
               ("latent, pulled to the image's (0.3)", "pulled to the image 0.3", "latent"))




@torch.inference_mode()
def describe(model, images: list[bytes], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(decoded ok (N,), (N, D) float32) of encoded images for one descriptor."""
    ok, vectors = [], []
    for start in range(0, len(images), BATCH):
        pixels, reasons = decode_batch(images[start:start + BATCH], SIZE, 3, "pad")
        ok += [r is None for r in reasons]
        x = to_input(torch.from_numpy(pixels))
        if name != "latent":
            x = trim_borders(x)
        z, stem, kept = model._encode(x, (1, 2, 3))
        if name.endswith("latent"):
            vectors.append(dequantize_latents(*quantize_latents(z.float().numpy(), "int8")))
        else:
            vectors.append(pooled([stem, *kept]).numpy())
    return np.array(ok), np.concatenate(vectors).astype(np.float32)


# ---------------------------------------------------------------- measuring


def calibrate(model, images: list[bytes], name: str, seed: int = 0) -> dict:
    """The neighbours job's calibration (its copies, kinds and rule) with this descriptor."""
    ids = [f"c{i}" for i in range(len(images))]
    keys = sample_keys(ids, seed)
    kinds = edit_kinds(keys, DEFAULT_EDITS)
    copies = [edited_copy(data, kind, np.random.default_rng(int(key))) for data, key, kind in zip(images, keys, kinds)]
    _, d_orig = describe(model, images, name)
    _, d_copy = describe(model, copies, name)
    positives = np.linalg.norm(d_orig - d_copy, axis=1)
    negatives = nearest_other_distances(d_orig)
    record = choose_threshold(positives, negatives, 0.001, 0.99)
    record["recall_by_edit"] = recall_by_edit(positives, np.array(kinds), DEFAULT_EDITS, record["value"])
    return record


def edit_settings() -> list[tuple[str, object]]:
    return [(kind, strength) for kind, values in STRENGTHS.items() for strength in values]


def copy_of(data: bytes, kind: str, strength, rng: np.random.Generator) -> bytes:
    if kind in ("rotate", "colour"):
        return _beyond(data, kind, strength)
    edits = Edits(**{FIELD[kind]: (strength, strength)}) if kind in FIELD else Edits()
    return edited_copy(data, kind, rng, edits)


def _beyond(data: bytes, kind: str, strength) -> bytes:
    """Edits no duplicate finder here is asked to survive: a rotation (the corners filled black),
    a greyscale copy, or the hue turned by a quarter."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "rotate":
        image = image.rotate(strength, resample=Image.Resampling.BILINEAR)
    elif strength == "greyscale":
        image = image.convert("L").convert("RGB")
    else:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + 64) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return encode_image(np.asarray(image))


def pairs_within(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a < b: every pair of rows within `threshold` (Euclidean) of each other."""
    import faiss

    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    lims, _, found = index.range_search(vectors, np.float32(threshold) ** 2)
    left = np.repeat(np.arange(len(vectors)), np.diff(lims).astype(np.int64))
    keep = left < found
    return left[keep], found[keep].astype(np.int64)


def label(kind: str, strength) -> str:
    return f"{kind} {'' if strength is None else strength}".strip()


def measure(model, originals: list[bytes], copies: dict, name: str, threshold: float, seed: int = 1) -> dict:
    """At `threshold`, for each edit setting: pair recall, and precision over the originals with those
    copies; false pairs among the originals; over the originals with every copy within the targets
    (GROUP_STRENGTHS): precision and group recall."""
    import scipy.sparse
    from scipy.sparse.csgraph import connected_components

    n = len(originals)
    _, d_orig = describe(model, originals, name)
    d_copies = {s: describe(model, copies[s], name)[1] for s in edit_settings()}
    recall, precision = {}, {}
    for setting, d_copy in d_copies.items():
        recall[label(*setting)] = float(np.mean(np.linalg.norm(d_orig - d_copy, axis=1) <= threshold))
        a, b = pairs_within(np.concatenate([d_orig, d_copy]), threshold)
        precision[label(*setting)] = float(np.mean(a % n == b % n)) if len(a) else None
    within = np.linalg.norm(d_orig[:, None] - d_orig[None], axis=2) <= threshold
    false_pairs = float(within[np.triu_indices(n, 1)].mean())
    # The originals with every copy within the targets: the pairs, their components, the groups.
    targets = [(kind, strength) for kind, values in GROUP_STRENGTHS.items() for strength in values]
    a, b = pairs_within(np.concatenate([d_orig, *(d_copies[s] for s in targets)]), threshold)
    graph = scipy.sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(n * (1 + len(targets)),) * 2)
    _, component = connected_components(graph, directed=False)
    originals_in = np.bincount(component[:n], minlength=component.max() + 1)
    rng = np.random.default_rng(seed)
    groups_found = 0
    for i in range(n):
        members = [i]
        for k in rng.choice(len(GROUP_STRENGTHS), 2, replace=False):  # two different kinds
            kind = list(GROUP_STRENGTHS)[k]
            strength = GROUP_STRENGTHS[kind][int(rng.integers(len(GROUP_STRENGTHS[kind])))]
            members.append(n * (1 + targets.index((kind, strength))) + i)
        own = component[members]
        groups_found += bool((own == own[0]).all() and originals_in[own[0]] == 1)
    return {"pair_recall": recall, "precision_by_edit": precision, "false_pairs": false_pairs,
            "precision": float(np.mean(a % n == b % n)) if len(a) else None, "pairs_found": int(len(a)),
            "group_recall": groups_found / n}


@torch.inference_mode()
def reconstruction_psnr(model, images: list[bytes]) -> float:
    """Mean PSNR (dB) of the model's reconstructions of decoded images."""
    x = to_input(torch.from_numpy(decode_batch(images, SIZE, 3, "pad")[0]))
    values = [10 * torch.log10(1 / (model(x[s:s + BATCH])["x_hat"] - x[s:s + BATCH]).pow(2).mean((1, 2, 3)))
              for s in range(0, len(x), BATCH)]
    return float(torch.cat(values).mean())


def run_corpus(corpus: str, originals: int, train_steps: int) -> dict:
    started = time.perf_counter()
    images = synthetic_corpus(2 * originals) if corpus == "synthetic" else photo_corpus()
    half = len(images) // 2 if corpus == "photos" else originals
    train, test = images[:half], images[half:half + originals]
    train_pixels = decode_batch([encode_image(i) for i in train], SIZE, 3, "pad")[0]
    calibration_images = [encode_image(i) for i in train]
    originals_bytes = [encode_image(i) for i in test]
    copies = {}
    for kind, strength in edit_settings():
        copies[(kind, strength)] = [copy_of(data, kind, strength, np.random.default_rng([i, len(copies)]))
                                    for i, data in enumerate(originals_bytes)]
    out = {"corpus": corpus, "trained_on": len(train), "originals": len(test), "models": {}, "descriptors": {}}
    models = {}
    for name, extra_loss in MODELS.items():
        began = time.perf_counter()
        url = briefly_trained_model(str(OUT / f"model-{corpus}-{name.replace(' ', '-')}"), train_steps, train_pixels,
                                    extra_loss)
        models[name] = load_inference_model(url)[0]
        out["models"][name] = {"train_s": time.perf_counter() - began,
                               "psnr_db": reconstruction_psnr(models[name], originals_bytes)}
        print(f"{corpus} / model {name}: {out['models'][name]}", flush=True)
    for label, model_name, name in DESCRIPTORS:
        model = models[model_name]
        record = calibrate(model, calibration_images, name)
        result = measure(model, originals_bytes, copies, name, record["value"])
        result["calibration"] = {k: record[k] for k in ("value", "rule", "recall_on_positives",
                                                        "false_positive_rate_on_negatives", "recall_by_edit")}
        result["model"] = model_name
        out["descriptors"][label] = result
        print(f"{corpus} / {label}: threshold {record['value']:.4g}, group recall {result['group_recall']:.3f}, "
              f"false pairs {result['false_pairs']:.4f}, precision {result['precision']:.3f}", flush=True)
    out["seconds"] = time.perf_counter() - started
    return out


def _pair(result: dict, setting: str) -> str:
    precision = result["precision_by_edit"][setting]
    return f"{result['pair_recall'][setting]:.3f} ({'-' if precision is None else f'{precision:.3f}'})"


def markdown(results: list[dict]) -> str:
    lines = []
    for corpus in results:
        names = list(corpus["descriptors"])
        settings = list(corpus["descriptors"][names[0]]["pair_recall"])
        rows = [[s] + [_pair(corpus["descriptors"][d], s) for d in names] for s in settings]
        rows += [[title] + [corpus["descriptors"][d][key] for d in names]
                 for title, key in (("false pairs among distinct originals", "false_pairs"),
                                    ("precision, originals + every copy within the targets", "precision"),
                                    ("whole groups of 3 found", "group_recall"))]
        rows += [["calibrated threshold"] + [corpus["descriptors"][d]["calibration"]["value"] for d in names]]
        for title, key in (("model's reconstruction PSNR, dB", "psnr_db"), ("model's training s", "train_s")):
            rows += [[title] + [corpus["models"][corpus["descriptors"][d]["model"]][key] for d in names]]
        lines += [f"**{corpus['corpus']}** ({corpus['originals']} unseen originals; model trained and "
                  f"calibrated on {corpus['trained_on']} others):", "",
                  table(["edit: pair recall (precision)"] + names, rows), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", default="synthetic,photos")
    parser.add_argument("--originals", type=int, default=400, help="unseen originals per corpus (photos: at most half)")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--table", action="store_true", help="print the tables from the committed raw results")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads((RESULTS_DIR / "duplicates.json").read_text())["results"]))
        return
    torch.set_num_threads(2)
    results = [run_corpus(c, args.originals, args.train_steps) for c in args.corpora.split(",")]
    write_results("duplicates", {"settings": vars(args), "results": results})
    print(f"\nMachine: {machine()}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
