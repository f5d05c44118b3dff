"""Latent storage: bytes per row, reconstruction and neighbour recall for each latent dtype and
Parquet writer setting, against float32 + snappy (the embed job's default before zstd and int8).

    python bench/latent_storage.py                 # 20,000 rows; a few minutes on 2 cores
    python bench/latent_storage.py --rows 5000

A default-shape Fire model (64 px, latent 128) is trained here for --train-steps steps on
synthetic images, then the embed job's `Embedder` (no Ray) embeds --rows other synthetic
images with the default scores. Each latent dtype is that float32 latent through
`quantize_latents`, the function the embed job stores it with. Each dtype is written as one
Parquet file of --rows rows (the embed job's default file size) with each writer setting; the
whole file's bytes and the latent columns' bytes are divided by the rows. Quality:
- PSNR of the decoder's reconstruction from the stored latent (dequantized), on 1,000 rows,
  against the original image, and its difference from float32's;
- neighbour recall@10 of exact search over the stored latents against exact search over the
  float32 ones, for 1,000 query rows (the row itself left out), and how much farther (in
  float32 distance, summed over the ten) the neighbours found are than the true ten: a swap
  between near-equidistant rows costs nothing;
- the scores are computed before the latent is stored, so detection is the same for every
  dtype by construction; the script checks that the score columns are byte-identical.
Writes docs/bench-results/latent_storage.json and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import briefly_trained_model, table, write_results  # noqa: E402
from pipeline.latents import (  # noqa: E402
    LATENT_DTYPES,
    dequantize_latents,
    fixed_size_list,
    latent_write_options,
    quantize_latents,
)

WRITERS = {  # name: (pyarrow.parquet.write_table options, or None: the embed job's own for the dtype)
    "snappy, dictionary (pyarrow's defaults)": {},
    "zstd, dictionary": {"compression": "zstd"},
    "the embed job's (latent_write_options)": None,
}


def embed_rows(model_url: str, rows: int) -> tuple[pa.Table, np.ndarray]:
    """(the Embedder's float32 table for `rows` synthetic images, their pixels)."""
    from pipeline.embed import Embedder
    from pipeline.synth import synthetic_image

    embedder = Embedder(model_url, latent_dtype="float32", device="cpu")  # the unrounded latent
    pixels = np.stack([synthetic_image(i, 0, 64, 3) for i in range(rows)])
    parts = [embedder({"id": np.array([f"img-{i:07d}" for i in range(start, min(rows, start + 500))]),
                       "pixels": pixels[start:start + 500],
                       "error": np.array([None] * len(pixels[start:start + 500]), dtype=object)})
             for start in range(0, rows, 500)]
    return pa.concat_tables(parts), pixels


def stored(table: pa.Table, dtype: str) -> pa.Table:
    """`table` with its float32 latent stored as `dtype`, as the Embedder stores it."""
    z = np.stack(table.column("latent").to_numpy(zero_copy_only=False)).astype(np.float32)
    latent, scale = quantize_latents(z, dtype)
    columns = {"id": table.column("id"), "latent": fixed_size_list(latent, np.ones(len(z), bool))}
    if scale is not None:
        columns["latent_scale"] = pa.array(scale)
    rest = [name for name in table.column_names if name not in ("id", "latent", "latent_scale")]
    return pa.table({**columns, **{name: table.column(name) for name in rest}})


def file_bytes(table: pa.Table, options: dict) -> tuple[int, int]:
    """(whole file bytes, latent + latent_scale column chunk bytes) of `table` written as one file."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    meta = pq.ParquetFile(io.BytesIO(buffer.getvalue())).metadata
    latent = sum(meta.row_group(g).column(c).total_compressed_size for g in range(meta.num_row_groups)
                 for c in range(meta.num_columns)
                 if meta.row_group(g).column(c).path_in_schema.split(".")[0] in ("latent", "latent_scale"))
    return len(buffer.getvalue()), latent


def latents_of(table: pa.Table) -> np.ndarray:
    latent = np.stack(table.column("latent").to_numpy(zero_copy_only=False))
    scale = table.column("latent_scale").to_numpy() if "latent_scale" in table.column_names else None
    return dequantize_latents(latent, scale)


def psnr(model_url: str, z: np.ndarray, pixels: np.ndarray) -> float:
    from pipeline.inference import load_inference_model

    model, _ = load_inference_model(model_url, device=torch.device("cpu"))
    with torch.inference_mode():
        x_hat = torch.cat([model.decode(torch.from_numpy(z[s:s + 250])) for s in range(0, len(z), 250)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mse = ((x_hat.clamp(0, 1) - x) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def neighbours(z: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact k nearest rows of `z` for each query row (the row itself left out)."""
    d = ((z[queries, None, :] - z[None, :, :]) ** 2).sum(-1) if len(z) <= 2000 else None
    if d is None:
        sq = (z ** 2).sum(1)
        d = sq[queries, None] - 2 * z[queries] @ z.T + sq[None, :]
    d[np.arange(len(queries)), queries] = np.inf
    return np.argsort(d, axis=1)[:, :k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000, help="rows embedded and written (one file)")
    p.add_argument("--train-steps", type=int, default=300, help="training steps of the model")
    p.add_argument("--work", default="bench-output/latent_storage", help="scratch folder (the model)")
    args = p.parse_args()
    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_url = briefly_trained_model(str(work / "model"), args.train_steps)
    base, pixels = embed_rows(model_url, args.rows)
    rng = np.random.default_rng(0)
    sample = rng.choice(args.rows, min(1000, args.rows), replace=False)
    truth = neighbours(latents_of(stored(base, "float32")), sample)
    reference_psnr = None
    records = []
    for dtype in LATENT_DTYPES:
        t = stored(base, dtype)
        score_columns = [n for n in base.column_names if n not in ("id", "latent", "latent_scale")]
        assert all(t.column(n).equals(base.column(n)) for n in score_columns), "a score column changed"
        z = latents_of(t)
        quality = psnr(model_url, z[sample], pixels[sample])
        reference_psnr = quality if reference_psnr is None else reference_psnr
        found = neighbours(z, sample)
        recall = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(found, truth)]))
        # Whether a neighbour swapped in is as near as the one it displaced: the float32 distances
        # of the neighbours found, summed, against those of the true ten.
        exact = latents_of(stored(base, "float32"))
        dist = lambda rows: np.sqrt(((exact[rows] - exact[sample, None, :]) ** 2).sum(-1)).sum(1)  # noqa: E731
        distance_excess = float(np.mean(dist(found) / dist(truth)) - 1)
        for writer, options in WRITERS.items():
            options = latent_write_options(dtype) if options is None else options
            whole, latent = file_bytes(t, options)
            records.append({"dtype": dtype, "writer": writer, "options": options, "rows": args.rows,
                            "bytes_per_row": whole / args.rows, "latent_bytes_per_row": latent / args.rows,
                            "psnr": quality, "psnr_vs_float32": quality - reference_psnr, "recall_at_10": recall,
                            "neighbour_distance_excess": distance_excess})
    baseline = next(r for r in records if r["dtype"] == "float32" and r["options"] == {})
    for r in records:
        r["size_vs_baseline"] = r["bytes_per_row"] / baseline["bytes_per_row"]
    write_results("latent_storage", {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started),
                                     "rows": args.rows, "train_steps": args.train_steps,
                                     "score_columns": [n for n in base.column_names if n not in
                                                       ("id", "latent", "latent_scale")], "records": records})
    print(table(["dtype", "writer", "bytes/row", "latent bytes/row", "vs float32 + snappy", "PSNR dB",
                 "PSNR vs float32", "recall@10 vs float32", "distance of the 10 found vs true"],
                [[r["dtype"], r["writer"], f"{r['bytes_per_row']:.0f}", f"{r['latent_bytes_per_row']:.0f}",
                  f"{r['size_vs_baseline']:.2f}x", f"{r['psnr']:.3f}", f"{r['psnr_vs_float32']:+.4f}",
                  f"{r['recall_at_10']:.3f}", f"{r['neighbour_distance_excess']:+.4%}"] for r in records]))


if __name__ == "__main__":
    main()
