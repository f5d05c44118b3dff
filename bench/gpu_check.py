"""GPU check, for a lent GPU machine: AMP training and embedding speed of the real model code.

    python bench/gpu_check.py --out gpu-check.md       # needs CUDA; no Ray needed

What it runs, with this project's own modules (pipeline.model, pipeline.scoring,
pipeline.embed.Embedder, pipeline.synth):
1. Training steps/s and images/s for Fire and plain at 64x64 and 128x128: fp32 against bf16
   autocast, channels_last, AdamW, the training job's loss.
2. A short real training run with bf16 autocast on a synthetic corpus: the validation MSE
   must fall, to show mixed precision trains this model (not only that it runs).
3. Embedding images/s: the Embedder mapper (folded BatchNorm, channels_last,
   inference_mode) fed decoded batches on the GPU, at several batch sizes, with the trained
   model calibrated and given a training bank as the train job exports it: the default scores
   (fused, its parts, mse) at the default precision (bfloat16 on GPUs that have it) and in
   float32, and every score (`--scores all`, with a 4,096-entry patch memory: its search is a
   matrix product on the device). The scores run on the device in the same batch; only the
   per-image numbers come back to the host.
Ray Train (NCCL) and the Ray Data job are not exercised here: the lent machines have no Ray
and cannot install it; their CPU paths are tested in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.model import AutoencoderConfig, build_model, count_parameters  # noqa: E402
from pipeline.scoring import mse_per_image  # noqa: E402


def cuda_time(fn, reps: int) -> float:
    """Seconds per call, timed with CUDA events after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def train_speed(arch: str, size: int, amp: bool, batch: int = 256) -> float:
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig(arch=arch, image_size=size)).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = mse_per_image(x, model(x)["x_hat"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / cuda_time(step, 20)


def convergence(work: Path, steps: int = 600) -> dict:
    """bf16 training on real synthetic images: validation MSE before and after."""
    from pipeline.images import decode_batch
    from pipeline.synth import write_synthetic_corpus
    import pyarrow.parquet as pq

    data = work / "shards"
    write_synthetic_corpus(str(data), n=4000, image_size=64, anomaly_fraction=0.0, seed=0, rows_per_shard=1000)
    images = [b for p in sorted(data.glob("*.parquet")) for b in pq.read_table(p, columns=["image"]).column(0).to_pylist()]
    pixels, _ = decode_batch(images, 64, 3)
    x_all = torch.from_numpy(pixels).cuda().permute(0, 3, 1, 2).float().div_(255)
    x_train, x_val = x_all[:3600], x_all[3600:]
    torch.manual_seed(0)
    model = build_model(AutoencoderConfig()).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)

    def val_mse() -> float:
        model.eval()
        with torch.inference_mode():
            v = float(mse_per_image(x_val, model(x_val)["x_hat"]).mean())
        model.train()
        return v

    before = val_mse()
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (128,), device="cuda")
        xb = x_train[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mse_per_image(xb, model(xb)["x_hat"]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    after = val_mse()
    model_url = str(work / "model")
    save_checkpoint(model_url, model.cpu())
    return {"val_mse_before": before, "val_mse_after": after, "steps": steps, "seconds": seconds,
            "model_url": model_url}


def calibrated(model_url: str, work: Path, device: str = "cuda", patch_bank: int = 4096) -> str:
    """The model with a calibration, a 1,000-image training bank, their colour memory and a
    `patch_bank`-entry patch memory (random sample), exported as the train job exports them, so
    that the embedder computes the fused score, the neighbour scores and, with every score, the
    patch scores."""
    from bench.common import scored_rows
    from pipeline.checkpoint import load_checkpoint
    from pipeline.colour_memory import ColourMemory
    from pipeline.inference import ImageScorer, load_inference_model, to_input
    from pipeline.patch_memory import bank_from_candidates
    from pipeline.scoring import calibrate_with_bank
    from pipeline.synth import synthetic_image
    from pipeline.train.export import candidates_of, patch_projection

    model, _ = load_inference_model(model_url, device=device)
    checkpoint = load_checkpoint(model_url)
    pixels = np.stack([synthetic_image(i, 5, 64, 3) for i in range(1200)])
    projection = patch_projection(model, checkpoint.config, seed=0)
    candidates = candidates_of(ImageScorer(model), to_input(torch.from_numpy(pixels[200:])).to(device), projection,
                               per_input=64, generator=np.random.default_rng(0))
    patches = bank_from_candidates(candidates, projection, patch_bank, "random", 0)
    colours = ColourMemory.from_pixels(pixels[200:], seed=0)
    rows = scored_rows(_OnDevice(ImageScorer(model, patch_bank=patches, colours=colours), device), pixels)
    ids = [f"bank-{i}" for i in range(len(pixels))]
    calibration, bank = calibrate_with_bank(ids, np.arange(len(ids)) < 200, rows)
    url = str(work / "calibrated")
    save_checkpoint(url, checkpoint.model, training={"calibration": calibration.to_dict(),
                                                     "preprocessing": {"resize": "pad"}},
                    bank=bank, patch_bank=patches, colours=colours)
    return url


class _OnDevice:
    """An ImageScorer fed from host batches: each batch moved to `device` first."""

    def __init__(self, scorer, device: str):
        self.scorer, self.device = scorer, device

    def rows(self, x: torch.Tensor) -> dict:
        return self.scorer.rows(x.to(self.device))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def embed_speed(model_url: str, batch: int, scores: str | None = None, precision: str = "auto",
                device: str = "cuda") -> float:
    from pipeline.embed import Embedder

    embedder = Embedder(model_url, device=device, scores=scores, precision=precision)
    rng = np.random.default_rng(0)
    decoded = {"id": np.array([f"r{i}" for i in range(batch)]), "error": np.array([None] * batch, dtype=object),
               "pixels": rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)}
    for _ in range(3):
        embedder(decoded)
    synchronize(device)
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 3.0:
        embedder(decoded)  # includes host->device copy and the Arrow output, as in the job
        reps += 1
    synchronize(device)
    return batch * reps / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-check.md")
    args = p.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    name = torch.cuda.get_device_name()
    lines = [f"GPU: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", ""]
    lines += ["| model | size | params | fp32 train img/s | bf16 AMP train img/s | AMP speed-up |", "|---|---|---|---|---|---|"]
    for size in (64, 128):
        for arch in ("fire", "plain"):
            fp32, bf16 = train_speed(arch, size, False), train_speed(arch, size, True)
            params = count_parameters(build_model(AutoencoderConfig(arch=arch, image_size=size)))
            lines.append(f"| {arch} | {size} | {params:,} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f}x |")
            print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as d:
        conv = convergence(Path(d))
        lines += ["", f"bf16 AMP training, Fire 64x64, {conv['steps']} steps of 128 on 3,600 synthetic images: "
                  f"val MSE {conv['val_mse_before']:.4f} -> {conv['val_mse_after']:.4f} in {conv['seconds']:.1f}s", ""]
        print(lines[-2], flush=True)
        model_url = calibrated(conv["model_url"], Path(d))
        lines += ["| embedding batch | images/s, default scores | default scores, float32 | every score |",
                  "|---|---|---|---|"]
        for batch in (256, 1024, 4096):
            speeds = [embed_speed(model_url, batch), embed_speed(model_url, batch, precision="float32"),
                      embed_speed(model_url, batch, scores="all")]
            lines.append(f"| {batch} | " + " | ".join(f"{v:,.0f}" for v in speeds) + " |")
            print(lines[-1], flush=True)
        lines += ["", "(Embedder on the GPU: folded model, the scores on the device, Arrow output; default "
                  "precision auto = bfloat16 where the GPU has it.)"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({"gpu": name, "convergence_ok": conv["val_mse_after"] < 0.7 * conv["val_mse_before"]}))


if __name__ == "__main__":
    main()
