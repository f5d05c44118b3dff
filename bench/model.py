"""Model efficiency: parameters, GFLOPs per image, inference speed, and how close it runs to matmul.

    python bench/model.py            # prints a Markdown table

Achieved GFLOP/s is set beside the machine's own float32 torch.matmul GFLOP/s, measured in
the same run with the same threads, so the ratio says how well the convolutions use the CPU.
Inference runs as the embedding job runs it: BatchNorm folded into the convolutions
(`fuse_for_inference`), channels_last, inference_mode.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, table, write_results  # noqa: E402
from pipeline.model import AutoencoderConfig, build_model, count_parameters, fuse_for_inference  # noqa: E402


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops()


def images_per_second(model: torch.nn.Module, size: int, batch: int = 64, seconds: float = 3.0) -> float:
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            reps += 1
    return batch * reps / (time.perf_counter() - start)


def main() -> None:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    matmul = matmul_gflops()
    rows = []
    for size in (64, 128):
        for arch in ("fire", "plain"):
            model = build_model(AutoencoderConfig(arch=arch, image_size=size))
            flops = flops_per_image(model, size)
            ips = images_per_second(fuse_for_inference(model), size)
            achieved = flops * ips / 1e9
            rows.append([f"{arch} {size}x{size}x3", f"{count_parameters(model):,}", flops / 1e9, ips, achieved,
                         f"{achieved / matmul:.0%}"])
    print(f"Machine: {machine()}; {threads} torch threads; float32 matmul 1024^3: {matmul:.1f} GFLOP/s\n")
    print(table(["model", "parameters", "GFLOPs/image", "images/s", "GFLOP/s", "of matmul"], rows))
    write_results("model", {"torch_threads": threads, "matmul_gflops": matmul,
                            "columns": ["model", "parameters", "GFLOPs/image", "images/s", "GFLOP/s", "of matmul"],
                            "rows": rows})


if __name__ == "__main__":
    main()
