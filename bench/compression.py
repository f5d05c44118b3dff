"""Stored latents as an image codec: bytes per image and reconstruction quality, against JPEG and PNG.

    python bench/compression.py [--steps 2000] [--batch-size 32] [--out compression.md]

For each corpus a Fire autoencoder (the default AutoencoderConfig: 64x64 RGB, latent 128)
is trained from scratch with a bare in-process loop, same model and loss as
pipeline/train.py (AdamW, lr 3e-3, weight decay 1e-4, per-image MSE, cosine schedule, here
per step), for a fixed budget of `--steps` batches of `--batch-size`. Then, on held-out
test images:

- latents: `pipeline.embed.Embedder` makes the job's own output rows (float32, float16,
  int8 + per-row scale), written with pyarrow's default Parquet settings (snappy, as Ray
  Data's write_parquet uses); bytes per image = compressed size of the latent columns'
  chunks (`latent`, and `latent_scale` for int8) / rows. Reconstructions are what
  jobs.decode writes: dequantize, decode, round to uint8.
- JPEG (Pillow, 4:2:0, default tables): the quality 1..95 whose mean file size is nearest
  each latent's bytes per image, and quality 10 / 50 / 90. A 64x64 JPEG file carries about
  570 bytes of headers (quantisation and Huffman tables), more than a whole int8 latent, so
  the image-data-only size (Pillow `streamtype=2`, an "abbreviated" stream whose tables a
  corpus would store once) is matched too; its pixels are the same as the full file's.
- PNG (lossless, zlib level 6) and raw uint8 for scale.

PSNR is the mean of per-image PSNR (dB, [0, 1] pixels); SSIM is the mean of per-image
SSIM (pipeline.scoring: Gaussian 11x11, sigma 1.5).

Corpora: the synthetic family (pipeline.synth, 64x64, no anomalies: 2,048 train images,
256 test images with indices disjoint from training) and real photographs: 64x64 patches
of the two photos scikit-learn ships (`load_sample_images()`: china.jpg, flower.jpg,
427x640). Training takes random crops (with horizontal flips) from the left 480 columns of
each photo; the test patches are cut on a 32-pixel grid from the right 160 columns, which
training never sees.

Output: a "## Compression" section for docs/BENCHMARKS.md on stdout (and in --out).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.embed import Embedder  # noqa: E402
from pipeline.inference import decode_latents, load_inference_model  # noqa: E402
from pipeline.latents import LATENT_DTYPES, latents_from_batch, quantize_latents  # noqa: E402
from pipeline.images import encode_image  # noqa: E402
from pipeline.model import AutoencoderConfig, build_model, count_parameters  # noqa: E402
from pipeline.scoring import mse_per_image, psnr, ssim_per_image  # noqa: E402
from pipeline.synth import synthetic_image  # noqa: E402

SIZE = 64
SYNTH_TRAIN, SYNTH_TEST = 2048, 256
PHOTO_TRAIN_COLUMNS = 480  # of 640: the rest is the test region
PHOTO_TEST_STRIDE = 32
PHOTO_SIZE_SET_STRIDE = 4
# Rows of the file the latent bytes are measured in. Parquet's dictionary encoding (on by
# default) gives up on a column chunk once its dictionary passes 1 MiB, so the per-row
# cost of float latents depends on how many rows share a file.
SIZE_ROWS = 4096
JPEG_QUALITIES = range(1, 96)
FIXED_QUALITIES = (10, 50, 90)
LR, WEIGHT_DECAY = 3e-3, 1e-4


# ------------------------------------------------------------------------------ corpora


@dataclass
class Corpus:
    name: str
    test: np.ndarray  # (N, S, S, 3) uint8: quality is measured on these
    size_set: np.ndarray  # (M, S, S, 3) uint8, M >> N, held out too: latent bytes are measured on these
    sample_batch: object  # (rng, batch_size) -> (B, S, S, 3) uint8
    description: str


def synthetic_corpus() -> Corpus:
    train = np.stack([synthetic_image(i, seed=0, image_size=SIZE, channels=3) for i in range(SYNTH_TRAIN)])
    test = np.stack([synthetic_image(1_000_000 + i, seed=0, image_size=SIZE, channels=3) for i in range(SYNTH_TEST)])
    size_set = np.stack([synthetic_image(2_000_000 + i, seed=0, image_size=SIZE, channels=3) for i in range(SIZE_ROWS)])
    return Corpus("synthetic (pipeline.synth)", test, size_set,
                  lambda rng, n: train[rng.integers(0, len(train), n)],
                  f"{SYNTH_TRAIN:,} train / {SYNTH_TEST} test images, 64x64")


def photo_corpus() -> Corpus:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]  # (427, 640, 3) each
    def cut(stride: int) -> list[np.ndarray]:
        patches = []
        for photo in photos:
            height, width = photo.shape[:2]
            for top in range(0, height - SIZE + 1, stride):
                for left in range(PHOTO_TRAIN_COLUMNS, width - SIZE + 1, stride):
                    patches.append(photo[top:top + SIZE, left:left + SIZE])
        return patches

    test = cut(PHOTO_TEST_STRIDE)
    dense = cut(PHOTO_SIZE_SET_STRIDE)
    size_set = np.stack([dense[i] for i in np.random.default_rng(0).permutation(len(dense))[:SIZE_ROWS]])

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.empty((n, SIZE, SIZE, 3), np.uint8)
        for k in range(n):
            photo = photos[rng.integers(len(photos))]
            top = rng.integers(0, photo.shape[0] - SIZE + 1)
            left = rng.integers(0, PHOTO_TRAIN_COLUMNS - SIZE + 1)
            patch = photo[top:top + SIZE, left:left + SIZE]
            out[k] = patch[:, ::-1] if rng.random() < 0.5 else patch
        return out

    return Corpus("photographs (sklearn china.jpg + flower.jpg)", np.stack(test), size_set, sample,
                  f"random 64x64 crops of the left 480 columns for training, {len(test)} test patches "
                  f"(stride {PHOTO_TEST_STRIDE}) from the right 160 columns")


# ------------------------------------------------------------------------------ training


def _to_input(pixels: np.ndarray) -> torch.Tensor:
    """(B, S, S, C) uint8 -> (B, C, S, S) float in [0, 1], channels_last (as pipeline/train.py)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)


def train(corpus: Corpus, steps: int, batch_size: int, seed: int) -> tuple[torch.nn.Module, float, float]:
    """The bare loop: (model in eval mode, seconds, mean loss of the last 50 steps)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(AutoencoderConfig()).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        x = _to_input(corpus.sample_batch(rng, batch_size))
        loss = mse_per_image(x, model(x)["x_hat"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{steps}  loss {np.mean(losses[-100:]):.5f}  "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return model.eval(), time.perf_counter() - started, float(np.mean(losses[-50:]))


# ------------------------------------------------------------------------------ measuring


def quality(original: np.ndarray, reconstructed: np.ndarray) -> tuple[float, float]:
    """Mean per-image PSNR (dB) and SSIM of two uint8 (N, S, S, C) batches."""
    x, y = _to_input(original), _to_input(reconstructed)
    mse = mse_per_image(x, y).numpy()
    return float(np.mean(np.minimum(psnr(mse), 100.0))), float(ssim_per_image(x, y).mean())


def latent_bytes_per_image(table: pa.Table, **writer_options) -> float:
    """Compressed bytes of the latent column chunks (and latent_scale) per row.

    No options: pyarrow's defaults (snappy, dictionary encoding on), which Ray Data's
    write_parquet in the embed job uses.
    """
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **writer_options)
    meta = pq.ParquetFile(io.BytesIO(buffer.getvalue())).metadata
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema.split(".")[0] in ("latent", "latent_scale"):
                total += column.total_compressed_size
    return total / meta.num_rows


@torch.inference_mode()
def encode_all(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([model.encode(_to_input(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)])


def latent_table(z: np.ndarray, dtype: str) -> pa.Table:
    """The latent columns exactly as pipeline.embed.Embedder lays them out."""
    stored, scale = quantize_latents(z, dtype)
    columns = {"latent": pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), stored.shape[1])}
    if scale is not None:
        columns["latent_scale"] = pa.array(scale)
    return pa.table(columns)


def jpeg_bytes(images: np.ndarray, q: int, streamtype: int = 0) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=q, streamtype=streamtype)
        out.append(buffer.getvalue())
    return out


def jpeg_decode(files: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files])


@dataclass
class Row:
    codec: str
    bytes_per_image: float
    psnr: float
    ssim: float
    note: str = ""


def measure(corpus: Corpus, model: torch.nn.Module, workdir: str) -> list[Row]:
    test = corpus.test
    model_url = os.path.join(workdir, "model")
    save_checkpoint(model_url, model)
    batch = {"id": np.array([f"t{i}" for i in range(len(test))]), "pixels": test,
             "error": np.array([None] * len(test), dtype=object)}
    z_size_set = encode_all(model, corpus.size_set)
    decoder, _ = load_inference_model(model_url)  # the model as jobs.decode runs it
    rows: list[Row] = []
    latent_rows: dict[str, Row] = {}
    for dtype in LATENT_DTYPES:
        # Quality: the embed job's own rows for the test images, decoded as jobs.decode does.
        table = Embedder(model_url, dtype, device="cpu")(batch)
        stored = {"latent": table.column("latent").to_numpy(zero_copy_only=False)}
        if "latent_scale" in table.column_names:
            stored["latent_scale"] = table.column("latent_scale").to_numpy()
        _, z = latents_from_batch(stored)
        reconstructed = decode_latents(decoder, z)
        # Size: the same layout for SIZE_ROWS held-out images in one file.
        sized = latent_table(z_size_set, dtype)
        assert sized.schema.field("latent").type == table.schema.field("latent").type
        payload = model.config.latent_dim * np.dtype(dtype).itemsize + (4 if dtype == "int8" else 0)
        plain = latent_bytes_per_image(sized, use_dictionary=False)
        note = f"payload {payload} B; {plain:.0f} B without dictionary encoding"
        row = Row(f"latent {dtype}", latent_bytes_per_image(sized), *quality(test, reconstructed), note)
        if dtype == "float32":
            exact = reconstructed
        else:
            differ = float(np.mean(reconstructed != exact))
            most = int(np.abs(reconstructed.astype(int) - exact).max())
            row.note += (f"; vs float32: {row.psnr - latent_rows['float32'].psnr:+.3f} dB, "
                         f"{differ:.1%} of pixel values differ, max by {most}")
        rows.append(row)
        latent_rows[dtype] = row

    # JPEG at every quality once: mean sizes (full file and image data only) and quality.
    full = {q: jpeg_bytes(test, q) for q in JPEG_QUALITIES}
    mean_full = {q: float(np.mean([len(f) for f in files])) for q, files in full.items()}
    mean_scan = {q: float(np.mean([len(f) for f in jpeg_bytes(test, q, streamtype=2)])) for q in JPEG_QUALITIES}
    scores: dict[int, tuple[float, float]] = {}

    def score(q: int) -> tuple[float, float]:
        if q not in scores:
            scores[q] = quality(test, jpeg_decode(full[q]))
        return scores[q]

    nearest: dict[tuple[int, bool], list[str]] = {}  # (quality, image data only) -> latent dtypes it matches
    for dtype, latent in latent_rows.items():
        for scan_only, sizes in ((False, mean_full), (True, mean_scan)):
            q = min(JPEG_QUALITIES, key=lambda k: abs(sizes[k] - latent.bytes_per_image))
            nearest.setdefault((q, scan_only), []).append(dtype)
    jpeg: dict[tuple[int, bool], list[str]] = {}  # (quality, image data only) -> notes
    for (q, scan_only), dtypes in nearest.items():
        smallest = " (no JPEG file is smaller)" if q == 1 and not scan_only else ""
        jpeg[(q, scan_only)] = [f"size nearest to latent {', '.join(dtypes)}{smallest}"]
    for q in FIXED_QUALITIES:
        if (q, False) not in jpeg:
            jpeg[(q, False)] = [f"image data only: {mean_scan[q]:.0f} B"]
    # The lowest JPEG quality that matches the float32 latent's reconstruction PSNR.
    target = latent_rows["float32"].psnr
    matching = next((q for q in JPEG_QUALITIES if score(q)[0] >= target), None)
    if matching is not None:
        jpeg.setdefault((matching, False), []).append(
            "lowest quality with PSNR >= latent float32's" +
            ("" if (matching, False) in nearest else f"; image data only: {mean_scan[matching]:.0f} B"))
    for (q, scan_only), notes in sorted(jpeg.items(), key=lambda item: (item[0][1], item[0][0])):
        size = mean_scan[q] if scan_only else mean_full[q]
        rows.append(Row(f"JPEG q{q}" + (", image data only" if scan_only else ""), size, *score(q), "; ".join(notes)))
    png = float(np.mean([len(encode_image(image, "png")) for image in test]))
    rows.append(Row("PNG (lossless)", png, math.inf, 1.0, "zlib level 6"))
    rows.append(Row("raw uint8", float(SIZE * SIZE * 3), math.inf, 1.0, ""))
    return rows


# ------------------------------------------------------------------------------ report


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    import PIL
    import pyarrow

    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"Pillow {PIL.__version__}, pyarrow {pyarrow.__version__}")


def table(corpus: Corpus, rows: list[Row]) -> str:
    lines = ["| codec | bytes/image | bits/pixel | PSNR (dB) | SSIM | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        shown = "lossless" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
        bits = 8 * r.bytes_per_image / (SIZE * SIZE)
        lines.append(f"| {r.codec} | {r.bytes_per_image:,.0f} | {bits:.3f} | {shown} | "
                     f"{r.ssim:.3f} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training batches per corpus (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of init and batch sampling (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--out", default=None, help="also write the section to this file (default: stdout only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_config = AutoencoderConfig()
    sections = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for build in (synthetic_corpus, photo_corpus):
            corpus = build()
            print(f"{corpus.name}: training {args.steps} steps x {args.batch_size}", file=sys.stderr, flush=True)
            model, seconds, loss = train(corpus, args.steps, args.batch_size, args.seed)
            rows = measure(corpus, model, os.path.join(workdir, str(len(sections))))
            sections.append(f"**{corpus.name}**: {corpus.description}; trained {seconds:.0f} s, final train loss "
                            f"(MSE) {loss:.5f}.\n\n{table(corpus, rows)}")
            print(sections[-1], file=sys.stderr, flush=True)
    params = count_parameters(build_model(model_config))
    text = "\n".join([
        "## Compression",
        "",
        f"`python bench/compression.py --steps {args.steps} --batch-size {args.batch_size}` — stored latents as an "
        "image codec against JPEG (Pillow) and PNG, on held-out 64x64 test images. Model: the default Fire "
        f"autoencoder ({model_config.arch}, latent {model_config.latent_dim}, base width {model_config.base_width}, "
        f"{params:,} parameters), trained from scratch per corpus with a bare loop (same model and loss as "
        f"pipeline/train.py) for {args.steps} steps of {args.batch_size} images "
        f"({args.steps * args.batch_size:,} images seen). Latent bytes = compressed size of the latent column chunks "
        "(+ `latent_scale` for int8) in a Parquet file written with pyarrow's defaults (snappy), / rows; the "
        "decoder's weights, shared by every image, are not counted. Whole run: "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        f"Machine: {machine()}.",
        "",
        *[s + "\n" for s in sections],
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
