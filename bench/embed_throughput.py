"""Embedding throughput and memory: the Ray Data job against a bare single-process loop.

    python bench/embed_throughput.py --images 20000      # prints Markdown tables

Both do the same work on the same cores: read Parquet, decode PNG, encode + decode with the
Fire model, score (MSE and SSIM), write Parquet. The bare loop uses the very same
`decode_batch` and `Embedder` in one process with all cores' torch threads, so the ratio
measures what the distributed pipeline costs (or gains by overlapping decode, model and I/O).

Memory: peak proportional set size (PSS: shared pages split between processes) summed over
the job's whole process tree (driver, raylet, GCS, workers, object store mappings),
sampled every 0.2 s, at N and 5N images. A streaming job's peak must not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, table  # noqa: E402


def make_inputs(root: Path, n: int) -> tuple[str, str]:
    """A synthetic corpus of n 64x64 PNGs and a trained-shape model (weights need not be trained to time them)."""
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.model import AutoencoderConfig, build_model
    from pipeline.synth import write_synthetic_corpus
    from pipeline.train import calibration_from_errors

    data = root / f"shards-{n}"
    if not data.exists():
        write_synthetic_corpus(str(data), n=n, image_size=64, anomaly_fraction=0.05, seed=0, rows_per_shard=1000)
    model = root / "model"
    if not model.exists():
        torch.manual_seed(0)
        save_checkpoint(str(model), build_model(AutoencoderConfig()).eval(),
                        training={"calibration": calibration_from_errors([0.01, 0.02, 0.03])})
    return str(data), str(model)


def bare_loop(data: str, model: str, out: str, batch_size: int) -> dict:
    """The baseline: one process, no Ray, the same decode and Embedder code."""
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.datasets import decode_rows
    from pipeline.embed import Embedder
    from pipeline.shards import Columns

    started = time.perf_counter()
    embedder = Embedder(model, torch_threads=os.cpu_count())
    rows = 0
    os.makedirs(out, exist_ok=True)
    for i, shard in enumerate(storage.list_shards(data)):
        tables = []
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=["id", "image"]):
            plain = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in ("id", "image")}
            tables.append(embedder(decode_rows(plain, Columns(), 64, 3)))
            rows += batch.num_rows
        pq.write_table(__import__("pyarrow").concat_tables(tables), f"{out}/part-{i:05d}.parquet")
    return {"rows": rows, "seconds": time.perf_counter() - started}


def ray_job(data: str, model: str, out: str, batch_size: int) -> dict:
    import ray

    from pipeline.embed import EmbedConfig, embed

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = embed(EmbedConfig(data=data, model=model, out=out, batch_size=batch_size))
    ray.shutdown()
    return {"rows": summary.rows_out, "seconds": summary.seconds}


def run_measured(mode: str, data: str, model: str, out: str, batch_size: int, sample_memory: bool) -> dict:
    """Run one mode in a fresh process; with `sample_memory`, sample its process tree's PSS.

    Reading PSS (/proc/PID/smaps of every process) costs real CPU, more for Ray's many
    processes than for one: throughput runs therefore take no samples.
    """
    cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--model", model, "--out", out,
           "--batch-size", str(batch_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
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
        raise SystemExit(f"{mode} run failed ({proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_pss_mib"] = peak[0] / 2**20
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20_000, help="N; memory is also measured at 5N")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temp dir)")
    p.add_argument("--skip-memory", action="store_true", help="only the throughput comparison at N")
    p.add_argument("--child", choices=["bare", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = bare_loop if args.child == "bare" else ray_job
        print(json.dumps(fn(args.data, args.model, args.out, args.batch_size)), flush=True)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-embed-"))
    n = args.images
    data, model = make_inputs(work, n)
    results = {}
    for mode in ("bare", "ray", "bare", "ray"):  # alternate, keep the better of two runs each
        out = work / f"out-{mode}-{n}-{time.monotonic_ns()}"
        r = run_measured(mode, data, model, str(out), args.batch_size, sample_memory=False)
        assert r["rows"] == n, r
        if mode not in results or r["seconds"] < results[mode]["seconds"]:
            results[mode] = r
    bare, ray_ = results["bare"], results["ray"]
    print(f"Machine: {machine()}\n")
    print(table(["path", "images", "seconds", "images/s", "ratio to bare"], [
        ["bare single-process loop", n, bare["seconds"], n / bare["seconds"], "1.00"],
        ["Ray Data job", n, ray_["seconds"], n / ray_["seconds"], f"{bare['seconds'] / ray_['seconds']:.2f}"],
    ]))
    if args.skip_memory:
        return
    data5, _ = make_inputs(work, 5 * n)
    small = run_measured("ray", data, model, str(work / f"out-ray-mem-{n}-{time.monotonic_ns()}"), args.batch_size,
                         sample_memory=True)
    big = run_measured("ray", data5, model, str(work / f"out-ray-mem-{5 * n}-{time.monotonic_ns()}"),
                       args.batch_size, sample_memory=True)
    assert small["rows"] == n and big["rows"] == 5 * n, (small, big)
    print()
    print(table(["Ray Data job (memory sampled)", "images", "seconds", "peak PSS (MiB)"], [
        ["N", n, small["seconds"], small["peak_pss_mib"]],
        ["5N", 5 * n, big["seconds"], big["peak_pss_mib"]],
    ]))
    print(f"\npeak memory ratio 5N / N: {big['peak_pss_mib'] / small['peak_pss_mib']:.2f}")


if __name__ == "__main__":
    main()
