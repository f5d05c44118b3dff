"""Embedding throughput and memory: the Ray Data job against a bare single-process loop.

    python bench/embed_throughput.py --images 20000      # prints Markdown tables
    python bench/embed_throughput.py --images 20000 --skip-5n --pool 1x2 --results embed_throughput-pool
        # also the Ray job with one model actor of two torch threads (repeatable), at N only
    python bench/embed_throughput.py --images 20000 --skip-5n --ray-reader --results embed_throughput-reader
        # also the Ray job reading its shards with Ray's own read_parquet (V1), as before, at N only
    python bench/embed_throughput.py --images 20000 --skip-5n --malloc-defaults --results embed_throughput-malloc
        # also both with glibc's malloc left as it is (SQUEEZE_KEEP_FREED_MEMORY=0), at N only

Both do the same work on the same cores: read Parquet, decode PNG, encode + decode with the
Fire model, compute the anomaly scores `--scores` names (default: embed's default, the fused
score, its parts and mse; `all`: every score), write Parquet (embed's defaults: int8 latents,
zstd). The bare loop uses the very same
`decode_batch` and `Embedder` in one process with all cores' torch threads, so the ratio
measures what the distributed pipeline costs (or gains by overlapping decode, model and I/O).
Each run is a fresh process, timed from the job's first step (imports done) to its last;
bare and Ray alternate, `--rounds` times at N and once at 5N, and ratios are of medians.
The gap between the two at both sizes tells a fixed start-up from a slower per-image rate.

Before the jobs run, bench/score_cost.py's table: what each anomaly score costs per batch
against the model's forward pass (the embedding work the scores add).

Memory: peak proportional set size (PSS: shared pages split between processes) summed over
the job's whole process tree (driver, raylet, GCS, workers, object store mappings),
sampled every 0.2 s, at N and 5N images. A streaming job's peak must not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import machine, run_child, scored_rows, table, write_results  # noqa: E402



def make_inputs(root: Path, n: int) -> tuple[str, str]:
    """A synthetic corpus of n 64x64 PNGs and a model shaped as the train job exports one: every
    score calibrated, a training bank of the corpus's training split (BANK_CAP at most) and the
    colour memory of its pixels, so that the embed job computes every column it computes in real
    use. The weights are untrained: the time of a forward pass does not depend on them."""
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    from pipeline.checkpoint import save_checkpoint
    from pipeline.colour_memory import ColourMemory
    from pipeline.images import decode_batch
    from pipeline.inference import ImageScorer
    from pipeline.model import AutoencoderConfig, build_model, fuse_for_inference
    from pipeline.sampling import hash_sample, split_of
    from pipeline.scoring import BANK_CAP, calibrate_with_bank
    from pipeline.shards import image_bytes
    from pipeline.synth import write_synthetic_corpus

    data = root / f"shards-{n}"
    if not data.exists():
        write_synthetic_corpus(str(data), n=n, image_size=64, anomaly_fraction=0.05, seed=0, rows_per_shard=1000)
    model = root / "model"
    if not model.exists():
        torch.manual_seed(0)
        autoencoder = build_model(AutoencoderConfig()).eval()
        table = pads.dataset(str(data), format="parquet").to_table(columns=["id", "image"])
        ids = table.column("id").to_pylist()
        keep = np.flatnonzero(split_of(ids, 0.05) | hash_sample(ids, min(1.0, BANK_CAP / len(ids))))
        pixels, _ = decode_batch(image_bytes(table.column("image").take(keep)), 64, 3)
        kept_ids = [ids[i] for i in keep]
        held_out = split_of(kept_ids, 0.05)
        colours = ColourMemory.from_pixels(pixels[~held_out], seed=0)
        rows = scored_rows(ImageScorer(fuse_for_inference(autoencoder), colours=colours), pixels, 512)
        calibration, bank = calibrate_with_bank(kept_ids, held_out, rows)
        save_checkpoint(str(model), autoencoder, training={"calibration": calibration.to_dict()}, bank=bank,
                        colours=colours)
    return str(data), str(model)


def bare_loop(data: str, model: str, out: str, batch_size: int, scores: str | None) -> dict:
    """The baseline: one process, no Ray, the same decode and Embedder code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.datasets import decode_rows
    from pipeline.embed import Embedder
    from pipeline.latents import latent_write_options
    from pipeline.shards import Columns

    started = time.perf_counter()
    embedder = Embedder(model, torch_threads=os.cpu_count(), scores=scores)
    rows = 0
    os.makedirs(out, exist_ok=True)
    for i, shard in enumerate(storage.list_files(data)):
        tables = []
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=["id", "image"]):
            plain = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in ("id", "image")}
            tables.append(embedder(decode_rows(plain, Columns(), 64, 3)))
            rows += batch.num_rows
        pq.write_table(pa.concat_tables(tables), f"{out}/part-{i:05d}.parquet",
                       **latent_write_options(embedder.latent_dtype))  # as the embed job writes
    return {"rows": rows, "seconds": time.perf_counter() - started, "bytes": parquet_bytes(out)}


def parquet_bytes(folder: str) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*.parquet"))


def ray_v1_read_parquet(paths, filesystem, columns=None, *, include_paths=False, override_num_blocks=None,
                        num_cpus=1.0):
    """`pipeline.datasets.read_parquet` as it was before our own reader: Ray's `read_parquet` through
    its V1 reader, whose dataset waits for a remote task that samples the files."""
    import ray.data

    from pipeline.datasets import PATH_COLUMN

    ctx = ray.data.DataContext.get_current()
    saved, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(list(paths), filesystem=filesystem, include_paths=include_paths,
                                   override_num_blocks=override_num_blocks, num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2 = saved
    return ds if columns is None else ds.select_columns([*columns, *([PATH_COLUMN] if include_paths else [])])


def ray_job(data: str, model: str, out: str, batch_size: int, scores: str | None, pool: str | None = None,
            ray_reader: bool = False) -> dict:
    """The embed job on a fresh local Ray cluster; `pool` "AxT": A model actors of T torch threads
    each (default: what the job plans for this machine); `ray_reader`: reading the shards with
    `ray_v1_read_parquet` (the readers import `pipeline.datasets.read_parquet` when they read)."""
    import ray

    import pipeline.datasets
    from pipeline.embed import EmbedConfig, embed

    if ray_reader:
        pipeline.datasets.read_parquet = ray_v1_read_parquet

    actors, threads = (int(part) for part in pool.split("x")) if pool else (None, None)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = embed(EmbedConfig(data_url=data, model_url=model, out_url=out, batch_size=batch_size, scores=scores,
                                actors=actors, torch_threads=threads))
    ray.shutdown()
    return {"rows": summary.rows_out, "seconds": summary.seconds, "bytes": parquet_bytes(out)}


def run_measured(mode: str, data: str, model: str, out: str, batch_size: int, sample_memory: bool,
                 scores: str | None) -> dict:
    """Run one mode in a fresh process (bench.common.run_child: with `sample_memory`, its peak PSS).
    A mode "ray AxT" is the Ray job with that actor pool; "ray-v1" the Ray job with Ray's own reader;
    "bare-glibc" and "ray-glibc" either with glibc's malloc as it is (pipeline.resources.keep_freed_memory off)."""
    from pipeline.resources import KEEP_FREED_ENV

    mode, _, pool = mode.partition(" ")
    mode, glibc, _ = mode.partition("-glibc")
    cmd = [sys.executable, __file__, "--child", mode, "--data", data, "--model", model, "--out", out,
           "--batch-size", str(batch_size), *(["--scores", scores] if scores else []),
           *(["--pool", pool] if pool else [])]
    return run_child(cmd, sample_memory, env={KEEP_FREED_ENV: "0"} if glibc else None)


def alternate(modes: list[str], rounds: int, data: str, model: str, work: Path, n: int,
              batch_size: int, scores: str | None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Run the modes in turn, `rounds` times, each in a fresh process; seconds of every run.

    This machine's speed drifts by 20-30% over minutes (other tenants): alternating puts both
    sides under the same drift, and medians keep one slow spell from deciding the ratio.
    """
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    written: dict[str, int] = {}
    for _ in range(rounds):
        for mode in modes:
            out = work / f"out-{mode.replace(' ', '-')}-{n}-{time.monotonic_ns()}"
            r = run_measured(mode, data, model, str(out), batch_size, sample_memory=False, scores=scores)
            assert r["rows"] == n, r
            seconds[mode].append(r["seconds"])
            written[mode] = r["bytes"]
            print(f"  {mode} {n:,}: {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    return seconds, written


def main() -> None:
    from pipeline.resources import CPU_BATCH_SIZE

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20_000, help="N; throughput and memory are also measured at 5N")
    p.add_argument("--rounds", type=int, default=3, help="alternating bare/Ray runs at N (1 at 5N)")
    p.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    p.add_argument("--work", default=None, help="folder for inputs and outputs (default: a temp dir)")
    p.add_argument("--skip-5n", action="store_true", help="only the throughput comparison at N")
    p.add_argument("--scores", default=None, help="embed --scores (default: embed's default scores)")
    p.add_argument("--pool", action="append", default=[], metavar="AxT",
                   help="also time the Ray job with A model actors of T torch threads (repeatable; at N only)")
    p.add_argument("--results", default="embed_throughput",
                   help="name of the raw results file under docs/bench-results/ (without .json)")
    p.add_argument("--ray-reader", action="store_true",
                   help="also time the Ray job reading with Ray's own read_parquet (V1), as before (at N only)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="also time both with glibc's malloc as it is, not keeping freed memory (at N only)")
    p.add_argument("--child", choices=["bare", "ray", "ray-v1"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "bare":
            result = bare_loop(args.data, args.model, args.out, args.batch_size, args.scores)
        else:
            result = ray_job(args.data, args.model, args.out, args.batch_size, args.scores,
                             args.pool[0] if args.pool else None, ray_reader=args.child == "ray-v1")
        print(json.dumps(result), flush=True)
        return

    from bench import score_cost

    print("What the scores cost against the forward pass (bench/score_cost.py):\n", flush=True)
    score_cost.main(["--batch-size", str(args.batch_size), "--results", f"{args.results}.score_cost"])
    print(flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-embed-"))
    n = args.images
    data, model = make_inputs(work, n)
    pools = ([f"ray {pool}" for pool in args.pool] + (["ray-v1"] if args.ray_reader else [])
             + (["bare-glibc", "ray-glibc"] if args.malloc_defaults else []))
    runs, written = alternate(["bare", "ray", *pools], args.rounds, data, model, work, n, args.batch_size, args.scores)
    table_rows = []

    def add(size: int, result: dict[str, list[float]]) -> None:
        bare = statistics.median(result["bare"])
        names = {"bare": "bare single-process loop", "ray": "Ray Data job",
                 "ray-v1": "Ray Data job, Ray's own read_parquet (V1, before)",
                 "bare-glibc": "bare single-process loop, glibc's malloc as it is (before)",
                 "ray-glibc": "Ray Data job, glibc's malloc as it is (before)",
                 **{mode: f"Ray Data job, {mode.split()[1]} (actors x threads)" for mode in pools if " " in mode}}
        for mode, all_runs in result.items():
            secs = statistics.median(all_runs)
            table_rows.append([f"{size:,}", names[mode], len(all_runs), ", ".join(f"{s:.1f}" for s in all_runs), secs,
                               size / secs, f"{bare / secs:.2f}"])

    add(n, runs)
    if not args.skip_5n:
        data5, _ = make_inputs(work, 5 * n)
        runs5, _ = alternate(["bare", "ray"], 1, data5, model, work, 5 * n, args.batch_size, args.scores)
        add(5 * n, runs5)
    print(f"Machine: {machine()}\n")
    print(f"Batch {args.batch_size}; seconds of each run in the order they ran (bare and Ray alternating); "
          f"the ratio is of medians.\n")
    print(table(["images", "path", "runs", "seconds (each run)", "median s", "images/s", "ratio to bare"],
                table_rows))
    per_row = {mode: written[mode] / n for mode in written}
    print(f"\nOutput bytes per row (Parquet files, every column): Ray job {per_row['ray']:.0f}, "
          f"bare loop {per_row['bare']:.0f}; scores: {args.scores or 'embed default'}")
    if args.skip_5n:
        write_results(args.results, {"images": n, "batch_size": args.batch_size, "scores": args.scores,
                                           "seconds": runs, "bytes_per_row": per_row})
        return
    # What the pipeline costs beyond the bare loop's work, at both sizes: a fixed start-up shows as
    # a gap that stays put while N grows five-fold; a slower per-image rate as one that grows with N.
    gap_n = statistics.median(runs["ray"]) - statistics.median(runs["bare"])
    gap_5n = runs5["ray"][0] - runs5["bare"][0]
    print(f"\nRay job minus bare loop: {gap_n:+.1f} s at N, {gap_5n:+.1f} s at 5N")

    small = run_measured("ray", data, model, str(work / f"out-ray-mem-{n}-{time.monotonic_ns()}"), args.batch_size,
                         sample_memory=True, scores=args.scores)
    big = run_measured("ray", data5, model, str(work / f"out-ray-mem-{5 * n}-{time.monotonic_ns()}"),
                       args.batch_size, sample_memory=True, scores=args.scores)
    assert small["rows"] == n and big["rows"] == 5 * n, (small, big)
    print()
    print(table(["Ray Data job (memory sampled)", "images", "seconds", "peak PSS (MiB)"], [
        ["N", n, small["seconds"], small["peak_pss_mib"]],
        ["5N", 5 * n, big["seconds"], big["peak_pss_mib"]],
    ]))
    print(f"\npeak memory ratio 5N / N: {big['peak_pss_mib'] / small['peak_pss_mib']:.2f}")
    write_results(args.results, {"images": n, "batch_size": args.batch_size, "scores": args.scores,
                                       "seconds": runs, "seconds_5n": runs5, "memory_n": small, "memory_5n": big,
                                       "bytes_per_row": per_row})


if __name__ == "__main__":
    main()
