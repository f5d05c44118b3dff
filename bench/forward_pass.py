"""Faster forward passes on a CPU: each way of running the folded inference model, timed and checked.

    python bench/forward_pass.py            # about 10 minutes on 2 cores; prints a Markdown table

The embed job spends most of its time in the model's forward pass. This runs the same
trained model (a default-shape Fire model, 64 px, briefly trained on synthetic images as the
other benches' models are) each of these ways, on the same batch:

- float32, NCHW: the plain eager model;
- float32, channels_last: what the embed job ran before `--precision`;
- float32, TorchScript frozen and `optimize_for_inference` (oneDNN's convolution fusions);
- float32, `torch.compile` (inductor, CPU); its compile time is reported beside it;
- bfloat16 under autocast, channels_last: `--precision bfloat16` (the convolutions and matrix
  products in bfloat16, the statistics in float32), what `auto` picks on a CPU with native
  bfloat16;
- int8 static quantization (`torch.ao` FX, x86 backend), calibrated on 8 batches of the
  training images.

For each: images/s at one thread and at every core (median of `--repeats` interleaved runs, so
drift hits every variant alike), the achieved GFLOP/s as a share of this machine's float32
1024^3 matmul rate measured in the same run, the reconstruction PSNR on 512 synthetic images
the model never saw, and its difference from float32's. What each does to detection is
`bench/detection.py --precision`'s job. Raw results: docs/bench-results/forward_pass.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import briefly_trained_model, machine, table, write_results  # noqa: E402
from bench.model import flops_per_image, matmul_gflops  # noqa: E402
from pipeline.inference import load_inference_model  # noqa: E402
from pipeline.scoring import mse_per_image, psnr  # noqa: E402
from pipeline.synth import synthetic_image  # noqa: E402


class _Plain(torch.nn.Module):
    """The model's forward without its keyword argument, which FX and TorchScript trace badly."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(x)


def variants(model: torch.nn.Module, calibration: torch.Tensor) -> dict[str, tuple]:
    """{name: (callable x -> outputs, memory format of x, seconds spent preparing it)}."""
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    example = calibration[:8].contiguous(memory_format=torch.channels_last)
    made: dict[str, tuple] = {
        "float32, NCHW": (nchw, torch.contiguous_format, 0.0),
        "float32, channels_last (before)": (last, torch.channels_last, 0.0),
    }

    started = time.perf_counter()
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(_Plain(last).eval(), example,
                                                                                   strict=False)))
    made["float32, TorchScript frozen (oneDNN fusion)"] = (frozen, torch.channels_last, time.perf_counter() - started)

    compiled = torch.compile(copy.deepcopy(last))
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(calibration[:128].contiguous(memory_format=torch.channels_last))
    made["float32, torch.compile (inductor)"] = (compiled, torch.channels_last, time.perf_counter() - started)

    def bfloat16(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return last(x)

    made["bfloat16 autocast, channels_last (--precision bfloat16)"] = (bfloat16, torch.channels_last, 0.0)

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    started = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's FX quantization warns that it is in maintenance
        prepared = prepare_fx(_Plain(copy.deepcopy(nchw)).eval(), get_default_qconfig_mapping("x86"), (example,))
        with torch.inference_mode():
            for batch in calibration.split(64)[:8]:
                prepared(batch)
        quantized = convert_fx(prepared)
    made["int8 static quantization (FX, x86)"] = (quantized, torch.contiguous_format, time.perf_counter() - started)
    return made


def reconstruction_psnr(run, memory_format, images: torch.Tensor) -> float:
    with torch.inference_mode():
        x_hat = torch.cat([run(batch.contiguous(memory_format=memory_format))["x_hat"].float()
                           for batch in images.split(128)])
    return float(np.mean(np.minimum(psnr(mse_per_image(images, x_hat)), 100.0)))


def timed(made: dict[str, tuple], x: torch.Tensor, threads: int, repeats: int) -> dict[str, float]:
    """{name: images/s} at `threads` torch threads, median of interleaved runs."""
    torch.set_num_threads(threads)
    inputs = {name: x.contiguous(memory_format=fmt) for name, (_, fmt, _) in made.items()}
    seconds: dict[str, list[float]] = {name: [] for name in made}
    with torch.inference_mode():
        for name, (run, _, _) in made.items():  # warm-up (a compiled model recompiles for a new thread count)
            run(inputs[name])
            run(inputs[name])
        for _ in range(repeats):
            for name, (run, _, _) in made.items():
                started = time.perf_counter()
                run(inputs[name])
                seconds[name].append(time.perf_counter() - started)
    return {name: len(x) / statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (the embed job's CPU batch)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--train-steps", type=int, default=600, help="steps of 64 images for the model under test")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        print(f"training the model under test ({args.train_steps} steps)...", flush=True)
        model, _ = load_inference_model(briefly_trained_model(folder, args.train_steps))
    training = torch.from_numpy(np.stack([synthetic_image(i, 99, 64, 3) for i in range(512)]))
    unseen = torch.from_numpy(np.stack([synthetic_image(i, 1234, 64, 3) for i in range(512)]))
    training = training.permute(0, 3, 1, 2).float() / 255
    unseen = unseen.permute(0, 3, 1, 2).float() / 255
    made = variants(model, training)
    flops = flops_per_image(copy.deepcopy(model).to(memory_format=torch.contiguous_format), 64)
    quality = {name: reconstruction_psnr(run, fmt, unseen) for name, (run, fmt, _) in made.items()}
    speed, matmul = {}, {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        matmul[threads] = matmul_gflops()
        speed[threads] = timed(made, unseen[:args.batch_size], threads, args.repeats)
    reference = quality["float32, channels_last (before)"]
    columns = ["forward pass", *[f"images/s, {t} thread{'s' * (t > 1)}" for t in speed],
               *[f"of fp32 matmul, {t} thread{'s' * (t > 1)}" for t in speed], "vs before, all cores",
               "PSNR dB", "PSNR vs float32", "preparation s"]
    rows = []
    for name, (_, _, prepared) in made.items():
        rows.append([name, *[f"{speed[t][name]:,.0f}" for t in speed],
                     *[f"{flops * speed[t][name] / 1e9 / matmul[t]:.0%}" for t in speed],
                     f"{speed[cores][name] / speed[cores]['float32, channels_last (before)']:.2f}x",
                     f"{quality[name]:.2f}", f"{quality[name] - reference:+.3f}", f"{prepared:.1f}"])
    print(f"\nMachine: {machine()}. Batch {args.batch_size} images of 64 px; {flops / 1e9:.4f} GFLOPs/image; "
          + "; ".join(f"float32 matmul at {t} thread{'s' * (t > 1)}: {m:.1f} GFLOP/s" for t, m in matmul.items())
          + "\n")
    print(table(columns, rows))
    write_results("forward_pass", {"argv": sys.argv[1:] if argv is None else argv, "batch_size": args.batch_size,
                                   "repeats": args.repeats, "train_steps": args.train_steps,
                                   "gflops_per_image": flops / 1e9, "matmul_gflops": matmul,
                                   "images_per_second": speed, "psnr_db": quality,
                                   "preparation_seconds": {name: v[2] for name, v in made.items()},
                                   "columns": columns, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
