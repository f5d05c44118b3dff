"""The whole pipeline on an embedded local Ray: synth -> train -> embed -> neighbours -> report.

    make demo                                   # the same as:
    python -m jobs.demo --out demo-output

Writes a synthetic corpus (64x64 images, a few percent labelled anomalies of five kinds),
trains the Fire autoencoder on it with Ray Train, embeds and scores every image with Ray
Data, finds each image's nearest neighbours and its near-duplicates (the threshold calibrated
on edited copies of the corpus's own images), and builds the anomaly report with its
near-duplicate section; then prints AUROC, flagged rows, near-duplicate clusters, images/s
per stage and where the report is. Each stage's output is kept: running the demo again reuses what
is done (a finished stage is skipped, an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.cli import arguments, parser, run_job
from pipeline import storage
from pipeline.errors import InputError

IMAGE_SIZE = 64


@dataclass(frozen=True)
class DemoConfig:
    out_url: str = "demo-output"
    images: int = 3000
    anomaly_fraction: float = 0.04
    epochs: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 100:
            raise InputError(f"--images must be at least 100, got {self.images}")
        if not 0.0 < self.anomaly_fraction < 0.5:
            raise InputError(f"--anomaly-fraction must be in (0, 0.5), got {self.anomaly_fraction}")
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")

    def folder(self, name: str) -> str:
        return str(Path(self.out_url).resolve() / name)


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = parser("demo", __doc__)
    p.add_argument("--out", default=d.out_url, help="folder for every stage's output")
    p.add_argument("--images", type=int, default=d.images, help="images in the synthetic corpus")
    p.add_argument("--anomaly-fraction", type=float, default=d.anomaly_fraction, help="share of anomalies")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the corpus and the training")
    return p


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    args = arguments(build_parser(), argv)
    return DemoConfig(out_url=args.pop("out"), **args)


def stage(name: str) -> None:
    print(f"\n=== {name} " + "=" * max(0, 60 - len(name)), flush=True)


def make_corpus(cfg: DemoConfig, rates: dict[str, str]) -> str:
    from pipeline.synth import SUMMARY_FILE, write_synthetic_corpus

    shards = cfg.folder("shards")
    summary_url = storage.join(shards, SUMMARY_FILE)
    wanted = {"images": cfg.images, "seed": cfg.seed, "anomaly_fraction": cfg.anomaly_fraction,
              "image_size": IMAGE_SIZE}
    previous = json.loads(storage.read_text(summary_url)) if storage.exists(summary_url) else {}
    if all(previous.get(k) == v for k, v in wanted.items()):
        print(f"reusing {shards} ({cfg.images} images)", flush=True)
        return shards
    started = time.perf_counter()
    made = write_synthetic_corpus(shards, n=cfg.images, image_size=IMAGE_SIZE, anomaly_fraction=cfg.anomaly_fraction,
                                  seed=cfg.seed, rows_per_shard=500)
    seconds = time.perf_counter() - started
    rates["synth"] = f"{cfg.images / seconds:,.0f} img/s"
    print(f"wrote {made['images']} images ({made['anomalies']} anomalies: {made['anomalies_by_kind']}) "
          f"in {seconds:.1f}s", flush=True)
    return shards


def train_model(cfg: DemoConfig, shards: str, rates: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(model URL, the last epoch's metrics)."""
    from pipeline.train import METRICS_FILE, MODEL_DIR, TrainConfig, train

    run = cfg.folder("run")
    model = storage.join(run, MODEL_DIR)
    metrics_url = storage.join(run, METRICS_FILE)
    done = len(storage.read_text(metrics_url).splitlines()) if storage.exists(metrics_url) else 0
    if done >= cfg.epochs and storage.exists(storage.join(model, "config.json")):
        print(f"reusing {model} ({done} epochs)", flush=True)
    else:
        history = train(TrainConfig(data_url=shards, out_url=run, epochs=cfg.epochs, seed=cfg.seed, workers=1)).history
        images = sum(m["train_images"] for m in history)
        seconds = sum(m["train_images"] / m["images_per_s"] for m in history)
        rates["train"] = f"{images / seconds:,.0f} img/s"
    return model, json.loads(storage.read_text(metrics_url).splitlines()[-1])


def embed_corpus(cfg: DemoConfig, shards: str, model: str, rates: dict[str, str]):
    from pipeline.embed import EmbedConfig, embed
    from pipeline.latents import SUCCESS_FILE

    latents = cfg.folder("latents")
    finished_before = storage.exists(storage.join(latents, SUCCESS_FILE))
    summary = embed(EmbedConfig(data_url=shards, model_url=model, out_url=latents,
                                passthrough=("label", "anomaly_kind")))
    if not finished_before:
        rates["embed"] = f"{summary.images_per_s:,.0f} img/s"
    return summary


def find_neighbours(cfg: DemoConfig, shards: str, model: str, latents, rates: dict[str, str]):
    from pipeline.neighbour_output import SUCCESS_FILE
    from pipeline.neighbours import NeighboursConfig, neighbours

    out = cfg.folder("neighbours")
    finished_before = storage.exists(storage.join(out, SUCCESS_FILE))
    summary = neighbours(NeighboursConfig(latents_url=latents.out, out_url=out, model_url=model, data_url=shards,
                                          seed=cfg.seed))
    if not finished_before:
        rates["neighbours"] = f"{summary.rows_per_s:,.0f} img/s"
    return summary


def make_report(cfg: DemoConfig, shards: str, model: str, latents, near, rates: dict[str, str]) -> dict[str, Any]:
    from pipeline.report import ReportConfig, report

    started = time.perf_counter()
    facts = report(ReportConfig(latents_url=latents.out, out_url=cfg.folder("report"), model_url=model,
                                data_url=shards, label_column="label", top_k=24, neighbours_url=near.out))
    rates["report"] = f"{latents.rows_out / (time.perf_counter() - started):,.0f} img/s"
    return facts


def flag_rates(by_kind: list[dict[str, Any]]) -> dict[str, float]:
    """{kind: share of its scored rows flagged}, normal images first (their rate is the false
    positives), then the anomaly kinds; rows that could not be read have no rate."""
    rates = {(row["kind"] or "normal"): row["flag_rate"] for row in by_kind if row.get("flag_rate") is not None}
    return dict(sorted(rates.items(), key=lambda item: (item[0] != "normal", item[0])))


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Every stage in turn; prints the summary a person reads and returns it for the JSON line."""
    rates: dict[str, str] = {}
    stage("1/5 synthetic corpus")
    shards = make_corpus(cfg, rates)
    stage("2/5 training (Ray Train)")
    model, last = train_model(cfg, shards, rates)
    stage("3/5 embedding and scoring (Ray Data)")
    latents = embed_corpus(cfg, shards, model, rates)
    stage("4/5 nearest neighbours and near-duplicates (Ray Data, faiss)")
    near = find_neighbours(cfg, shards, model, latents, rates)
    stage("5/5 report")
    facts = make_report(cfg, shards, model, latents, near, rates)

    stage("summary")
    metrics, threshold = facts.get("metrics") or {}, facts["threshold"]
    index = Path(cfg.folder("report")) / "index.html"
    print(f"model        fire autoencoder, {last['epoch']} epochs, val PSNR {last['val_psnr']:.2f} dB")
    print(f"rows         {latents.rows_in} in, {latents.rows_out} out, {latents.error_rows} failed to decode")
    print(f"score        {threshold['score']} (the model's default; --score on embed and report picks another)")
    print(f"flagged      {threshold['flagged_rows']} rows ({threshold['flagged_share']:.1%}; "
          f"{threshold['score']} > {threshold['value']:.4g}, {threshold['spec']} of the held-out scores' normal bulk)")
    by_kind = flag_rates(facts.get("by_kind") or [])
    if by_kind:
        print("flag rate    " + ", ".join(f"{kind} {rate:.1%}" for kind, rate in by_kind.items()))
    if metrics:
        print(f"AUROC        {metrics.get('auroc'):.3f}   average precision {metrics.get('average_precision'):.3f}")
    print(f"duplicates   {near.clusters} near-duplicate clusters ({near.rows_in_clusters} images) within latent "
          f"distance {near.threshold:.3g} ({near.threshold_source})")
    print("speed        " + (", ".join(f"{k} {v}" for k, v in rates.items()) if rates else "(all reused)"))
    print(f"report       {index}", flush=True)
    return {"rows_in": latents.rows_in, "rows_out": latents.rows_out, "flagged_rows": threshold["flagged_rows"],
            "score": threshold["score"], "threshold": threshold["value"], "flag_rate_by_kind": by_kind, "auroc": metrics.get("auroc"),
            "average_precision": metrics.get("average_precision"), "near_duplicate_clusters": near.clusters,
            "near_duplicate_recall_by_edit": (facts.get("near_duplicates") or {}).get("recall_by_edit"),
            "rates": rates, "report": str(index)}


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("demo", argv, parse_args, run=run)


if __name__ == "__main__":
    sys.exit(main())
