"""Nearest-neighbour index: build time, query throughput, memory and recall@10, flat vs IVF-PQ.

    python bench/neighbours.py                        # 100k real latents and 1M random vectors
    python bench/neighbours.py --sizes 100000 --queries 2000

Two latent datasets of the real dimension (128, the default Fire model's latent):
- 100k real latents: synthetic 64x64 images embedded by a default-shape Fire model trained
  here for --train-steps steps (the embed job's `Embedder`, without Ray);
- 1M random float32 vectors (standard normal: no structure, the hardest case for an
  approximate index).
For each, each index kind is built by the job's own code (`pipeline.neighbours.index`:
two streaming passes over the Parquet latents, nprobe tuned to recall@10 >= 0.9 on 1,000 probe
queries) in a fresh process, which reports its build time, index bytes and peak RSS (after the build: what the job's
driver needs; after loading the index: what a search actor holds), then
searches --queries rows of the corpus (k = 11, the job's k + 1) for queries/s. recall@10 is
measured against exact search (faiss IndexFlatL2) on 1,000 sampled rows, the row itself left
out. Writes docs/bench-results/neighbours.json and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import briefly_trained_model, machine, table, write_results  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.latents import SUCCESS_FILE, fixed_size_list  # noqa: E402

DIM = 128
ROWS_PER_FILE = 50_000
RECALL_QUERIES = 1_000
OUT = Path("bench-output/neighbours")


def write_latents(folder: Path, z: np.ndarray, ids: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(z), ROWS_PER_FILE)):
        rows = slice(start, start + ROWS_PER_FILE)
        pq.write_table(pa.table({"id": ids[rows], "latent": fixed_size_list(z[rows], np.ones(len(z[rows]), bool))}),
                       folder / f"part-{part:04d}.parquet")
    storage.write_text(str(folder / "_rows.json"), json.dumps(len(z)))
    storage.write_text(str(folder / SUCCESS_FILE), "{}")


def real_latents(n: int, train_steps: int) -> np.ndarray:
    """Latents of n synthetic 64x64 images from a default-shape Fire model briefly trained on others."""
    import torch

    from pipeline.embed import Embedder
    from pipeline.synth import synthetic_image

    torch.set_num_threads(1)  # a shared 2-core machine: two threads spin against other work
    briefly_trained_model(str(OUT / "model"), train_steps)
    embedder = Embedder(str(OUT / "model"), latent_dtype="float32", device="cpu", torch_threads=1)
    chunks = []
    for start in range(0, n, 1000):
        pixels = np.stack([synthetic_image(i, 0, 64, 3) for i in range(start, min(n, start + 1000))])
        out = embedder({"id": np.arange(len(pixels)).astype(str), "pixels": pixels,
                        "error": np.array([None] * len(pixels), dtype=object)})
        chunks.append(np.stack(out.column("latent").to_numpy(zero_copy_only=False)))
    return np.concatenate(chunks).astype(np.float32)


def one(latents: str, kind: str, queries: int) -> dict:
    """In a fresh process: build one index kind over `latents`, search, measure recall and peak RSS."""
    import faiss

    from pipeline.neighbours.index import (
        LoadedIndex,
        build_index,
        plan_index,
        stream_latents,
    )

    n = int(json.loads((Path(latents) / "_rows.json").read_text()))
    out = OUT / f"index-{Path(latents).name}-{kind}"
    plan = plan_index(n, DIM, kind)
    started = time.perf_counter()
    settings = build_index(latents, str(out), plan, 0.9, {"latents_url": latents}, log=lambda line: None)
    build_s = time.perf_counter() - started
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the job's driver: streaming build
    index = LoadedIndex(str(out))
    search_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    z = np.concatenate([v for _, v in stream_latents(latents)])  # queries and exact ground truth
    rng = np.random.default_rng(0)
    rows = rng.choice(n, min(queries, n), replace=False)
    started = time.perf_counter()
    for start in range(0, len(rows), 1024):
        index.search(z[rows[start:start + 1024]], 11)
    search_s = time.perf_counter() - started
    probe = rng.choice(n, RECALL_QUERIES, replace=False)
    _, exact = faiss.knn(z[probe], z, 11)
    found, _ = index.search(z[probe], 11)
    names = [str(i) for i in range(n)]
    recalls = []
    for own, truth, got in zip(probe, exact, found):
        truth = [names[t] for t in truth if t != own][:10]
        got = [g for g in got if g != names[own]][:10]
        recalls.append(len(set(truth) & set(got)) / 10)
    return {"kind": plan.kind, "rows": n, "build_s": build_s, "bytes": settings["bytes"],
            "nlist": settings.get("nlist"), "m": settings.get("m"), "nprobe": settings.get("nprobe"),
            "queries": len(rows), "queries_per_s": len(rows) / search_s, "recall_at_10": float(np.mean(recalls)),
            "recall_at_build": settings["recall_at_10"], "build_peak_rss_mib": build_rss,
            "loaded_peak_rss_mib": search_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="real latents for the first, random above")
    parser.add_argument("--queries", type=int, default=5_000, help="rows searched for queries/s")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--one", nargs=2, metavar=("LATENTS", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.queries)))
        return
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        real = size <= 100_000
        folder = OUT / f"latents-{size}"
        if not (folder / SUCCESS_FILE).exists():
            started = time.perf_counter()
            z = real_latents(size, args.train_steps) if real else \
                np.random.default_rng(1).standard_normal((size, DIM)).astype(np.float32)
            write_latents(folder, z, [str(i) for i in range(size)])
            print(f"{size:,} {'real' if real else 'random'} latents written in {time.perf_counter() - started:.0f} s",
                  flush=True)
        for kind in ("flat", "ivf-pq"):
            child = subprocess.run([sys.executable, __file__, "--one", str(folder), kind, "--queries",
                                    str(args.queries)], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["data"] = "real latents" if real else "random vectors"
            results.append(result)
            print(json.dumps(result), flush=True)
    write_results("neighbours", {"results": results})
    print(f"\nMachine: {machine()}\n")
    print(table(["rows", "data", "index", "build s", "index MiB", "nprobe", "queries/s", "recall@10",
                 "peak RSS building MiB", "peak RSS loaded MiB"],
                [[f"{r['rows']:,}", r["data"], r["kind"] + (f" (nlist {r['nlist']}, m {r['m']})" if r["nlist"] else ""),
                  r["build_s"], r["bytes"] / 2**20, r["nprobe"] or "-", r["queries_per_s"], r["recall_at_10"],
                  r["build_peak_rss_mib"], r["loaded_peak_rss_mib"]] for r in results]))


if __name__ == "__main__":
    main()
