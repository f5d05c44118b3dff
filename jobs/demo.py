"""The whole pipeline on an embedded local Ray: synth -> train -> embed -> report.

    make demo                                   # the same as:
    python -m jobs.demo --out demo-output

Writes a synthetic corpus (64x64 images, a few percent labelled anomalies of five kinds),
trains the Fire autoencoder on it with Ray Train, embeds and scores every image with Ray
Data, and builds the anomaly report; then prints AUROC, flagged rows, images/s per stage
and where the report is. Each stage's output is kept: running the demo again reuses what
is done (a finished stage is skipped, an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.cli import HelpFormatter
from pipeline import storage


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-output"
    images: int = 3000
    anomaly_fraction: float = 0.04
    epochs: int = 8
    seed: int = 0


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default=d.out, help="folder for every stage's output")
    p.add_argument("--images", type=int, default=d.images, help="images in the synthetic corpus")
    p.add_argument("--anomaly-fraction", type=float, default=d.anomaly_fraction, help="share of anomalies")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the corpus and the training")
    return DemoConfig(**vars(p.parse_args(argv)))


def stage(name: str) -> None:
    print(f"\n=== {name} " + "=" * max(0, 60 - len(name)), flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    out = Path(cfg.out).resolve()
    shards, run, latents, report = (str(out / name) for name in ("shards", "run", "latents", "report"))
    print("demo config:", json.dumps(asdict(cfg)), flush=True)
    rates: dict[str, str] = {}

    stage("1/4 synthetic corpus")
    from pipeline.synth import SUMMARY_FILE, write_synthetic_corpus

    summary_url = storage.join(shards, SUMMARY_FILE)
    wanted = {"images": cfg.images, "seed": cfg.seed, "anomaly_fraction": cfg.anomaly_fraction, "image_size": 64}
    previous = json.loads(storage.read_text(summary_url)) if storage.exists(summary_url) else {}
    if all(previous.get(k) == v for k, v in wanted.items()):
        print(f"reusing {shards} ({cfg.images} images)", flush=True)
    else:
        started = time.perf_counter()
        made = write_synthetic_corpus(shards, n=cfg.images, image_size=64, anomaly_fraction=cfg.anomaly_fraction,
                                      seed=cfg.seed, rows_per_shard=500)
        seconds = time.perf_counter() - started
        rates["synth"] = f"{cfg.images / seconds:,.0f} img/s"
        print(f"wrote {made['images']} images ({made['anomalies']} anomalies: {made['anomalies_by_kind']}) "
              f"in {seconds:.1f}s", flush=True)

    import ray

    ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()

    stage("2/4 training (Ray Train)")
    from pipeline.train import METRICS_FILE, MODEL_DIR, TrainConfig, train

    model = storage.join(run, MODEL_DIR)
    metrics_url = storage.join(run, METRICS_FILE)
    done = len(storage.read_text(metrics_url).splitlines()) if storage.exists(metrics_url) else 0
    if done >= cfg.epochs and storage.exists(storage.join(model, "config.json")):
        print(f"reusing {model} ({done} epochs)", flush=True)
    else:
        result = train(TrainConfig(data=shards, out=run, epochs=cfg.epochs, seed=cfg.seed, workers=1))
        history = result.history
        images = sum(m["train_images"] for m in history)
        seconds = sum(m["train_images"] / m["images_per_s"] for m in history)
        rates["train"] = f"{images / seconds:,.0f} img/s"
    last = [json.loads(line) for line in storage.read_text(metrics_url).splitlines()][-1]

    stage("3/4 embedding and scoring (Ray Data)")
    from pipeline.embed import SUCCESS_FILE, EmbedConfig, embed

    finished_before = storage.exists(storage.join(latents, SUCCESS_FILE))
    summary = embed(EmbedConfig(data=shards, model=model, out=latents, passthrough=("label", "anomaly_kind")))
    if not finished_before:
        rates["embed"] = f"{summary.images_per_s:,.0f} img/s"

    stage("4/4 report")
    from jobs.report import main as report_main

    started = time.perf_counter()
    code = report_main(["--latents", latents, "--out", report, "--model", model, "--data", shards,
                        "--label-column", "label", "--top-k", "24"])
    if code:
        print("error: the report job failed", file=sys.stderr)
        return code
    rates["report"] = f"{summary.rows_out / (time.perf_counter() - started):,.0f} img/s"
    facts = json.loads(storage.read_text(storage.join(report, "summary.json")))

    stage("summary")
    metrics = facts.get("metrics") or {}
    print(f"model        fire autoencoder, {last['epoch']} epochs, val PSNR {last['val_psnr']:.2f} dB")
    print(f"rows         {summary.rows_in} in, {summary.rows_out} out, {summary.error_rows} failed to decode")
    threshold = facts["threshold"]
    print(f"flagged      {threshold['flagged_rows']} rows ({threshold['flagged_share']:.1%}; "
          f"mse > {threshold['value']:.4g}, {threshold['spec']} of the held-out errors)")
    if metrics:
        print(f"AUROC        {metrics.get('auroc'):.3f}   average precision {metrics.get('average_precision'):.3f}")
    print("speed        " + ", ".join(f"{k} {v}" for k, v in rates.items()) if rates else "speed        (all reused)")
    print(f"report       {Path(report) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
