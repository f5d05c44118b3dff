"""Shared bits of the benchmark scripts: the machine's description, Markdown tables, the raw
results each one commits under docs/bench-results/ (docs/BENCHMARKS.md's tables name them), and
a child process run with its peak memory."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path

import torch


def scored_rows(scorer, pixels, batch_size: int = 256) -> dict:
    """`ImageScorer.rows` over (N, S, S, C) uint8 pixels in batches: {name: (N, ...) array}."""
    import numpy as np

    from pipeline.inference import to_input

    parts: dict[str, list] = {}
    for start in range(0, len(pixels), batch_size):
        for name, values in scorer.rows(to_input(torch.from_numpy(pixels[start:start + batch_size]))).items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def briefly_trained_model(folder: str, steps: int, pixels=None, extra_loss=None) -> str:
    """A default-shape Fire model (64 px RGB, latent 128) trained `steps` steps of 64 on `pixels`
    ((N, 64, 64, 3) uint8; by default 2,000 synthetic images of seed 99, apart from the images
    benches embed), saved under `folder`. `extra_loss(model, batch, out)` adds a term to the
    reconstruction loss (a bench's candidate training objective)."""
    import numpy as np

    from pipeline.checkpoint import save_checkpoint
    from pipeline.model import AutoencoderConfig, build_model
    from pipeline.scoring import mse_per_image
    from pipeline.synth import synthetic_image

    torch.manual_seed(0)
    model = build_model(AutoencoderConfig())
    if pixels is None:
        pixels = np.stack([synthetic_image(i, 99, 64, 3) for i in range(2000)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (64,))]
        out = model(batch)
        loss = mse_per_image(batch, out["x_hat"]).mean()
        if extra_loss is not None:
            loss = loss + extra_loss(model, batch, out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_checkpoint(folder, model, training={"preprocessing": {"resize": "pad"}})
    return folder


RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "bench-results"


def write_results(name: str, results: dict) -> Path:
    """Write a bench's raw results (small JSON, with the machine) to docs/bench-results/<name>.json,
    to be committed beside the table made from them."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=1, default=str) + "\n")
    print(f"raw results: {path}", flush=True)
    return path


def machine() -> str:
    """One line naming the CPU, cores, memory and library versions."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import ray

    return (f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}")


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run_child(cmd: list[str], sample_memory: bool, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` (a bench's child mode, printing its result as the last line of JSON) in a fresh
    process session, with `env` added to its environment; with `sample_memory`, its result gets
    "peak_pss_mib": the peak proportional set size (shared pages split between processes) summed
    over its whole process tree (driver, raylet, GCS, workers, object store mappings), sampled
    every 0.2 s.

    Reading PSS (/proc/PID/smaps of every process) costs real CPU, more for Ray's many processes
    than for one: timed runs should take no samples.
    """
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    stdout, _ = proc.communicate()
    if sample_memory:
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:4])} failed ({proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_pss_mib"] = peak[0] / 2**20
    return result
