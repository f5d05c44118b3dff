"""End to end on real clusters: four `ray job submit` jobs against a token-protected head,
and training plus embedding spread over a three-node `ray.cluster_utils.Cluster`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cluster_utils import REPO_ROOT, start_head, start_multinode_cluster, submit_job

from pipeline.checkpoint import load_checkpoint
from pipeline.colour_memory import LEVELS
from pipeline.images import encode_image
from pipeline.latents import read_latents
from pipeline.scores import FUSED_FROM, computable
from pipeline.thresholds import Calibration
from pipeline.synth import anomaly_plan, synthetic_image

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _image_folder(root: Path, n: int = 120) -> Path:
    """A folder tree of real PNG files: good/ and defect/ (a tenth are anomalies)."""
    plan = anomaly_plan(n, 0.1, seed=5)
    for i in range(n):
        kind = plan.get(i, "")
        folder = root / ("defect" if kind else "good")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img-{i:04d}.png").write_bytes(encode_image(synthetic_image(i, 5, 32, 3, kind)))
    return root


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("e2e-head"))
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.timeout(900)
def test_ingest_train_embed_report_as_four_submitted_jobs(head, tmp_path):
    images = _image_folder(tmp_path / "images")
    shards, run, latents, report = (tmp_path / name for name in ("shards", "run", "latents", "report"))
    jobs = [
        ["python", "-m", "jobs.ingest", "--source", str(images), "--out", str(shards),
         "--labels-from-folders", "--normal-label", "good", "--rows-per-shard", "40"],
        ["python", "-m", "jobs.train", "--data", str(shards), "--out", str(run), "--epochs", "2",
         "--image-size", "32", "--latent-dim", "16", "--base-width", "8", "--batch-size", "16"],
        ["python", "-m", "jobs.embed", "--data", str(shards), "--model", str(run / "model"), "--out", str(latents),
         "--passthrough", "label"],
        ["python", "-m", "jobs.report", "--latents", str(latents), "--out", str(report), "--model", str(run / "model"),
         "--data", str(shards), "--label-column", "label", "--top-k", "8"],
    ]
    for entrypoint in jobs:
        status, logs = submit_job(head, entrypoint, working_dir=REPO_ROOT, timeout=400)
        assert status == "SUCCEEDED", f"{entrypoint[2]} failed:\n{logs[-4000:]}"
        # What a cluster user reads: the job's own lines, not Ray's execution plans or epochs twice.
        assert "Execution plan of Dataset" not in logs and "Reporting training result" not in logs
        if entrypoint[2] == "jobs.train":
            assert [line.split()[1] for line in logs.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]

    ids = pq.ParquetDataset(str(shards)).read(columns=["id"]).column("id").to_pylist()
    assert len(ids) == 120 and any(i.startswith("defect/") for i in ids) and any(i.startswith("good/") for i in ids)
    model = load_checkpoint(str(run / "model"))
    calibration = Calibration.from_dict(model.calibration)
    assert model.training["epoch"] >= 1 and calibration.default_score == "fused"
    assert set(calibration.scores) == set(computable(True, FUSED_FROM, has_colours=True))
    assert calibration.get("mse").count > 0 and calibration.get("colour_top").count > 0
    assert model.bank is not None and len(model.bank.ids) > 0
    # The colour memory counted the training images' pixels (3 channels: LEVELS^3 bins).
    assert model.colours is not None and model.colours.counts.shape == (LEVELS,) * 3 and model.colours.counts.sum() > 0
    table = read_latents(str(latents))
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert set(table.column("label").to_pylist()) == {0, 1}
    summary = json.loads((report / "summary.json").read_text())
    assert summary["counts"]["rows"] == 120 and summary["counts"]["error_rows"] == 0
    assert (report / "index.html").exists()
    # The default (fused) score must rank the planted anomalies above the normal images well beyond
    # chance even after 2 epochs: a one-off replay of this run without Ray (bench/detection.py's
    # train_model and score_corpus, training seeds 0-2) gave fused AUROC 0.83-0.96.
    assert summary["metrics"]["auroc"] >= 0.75


@pytest.mark.timeout(600)
def test_training_and_embedding_spread_over_nodes(tmp_path):
    import ray

    from pipeline.embed import EmbedConfig, embed
    from pipeline.model import AutoencoderConfig
    from pipeline.synth import write_synthetic_corpus
    from pipeline.train import TrainConfig, train

    data = str(tmp_path / "shards")
    # Enough blocks that the actors queue up: with a few tiny blocks one actor keeps pace alone.
    write_synthetic_corpus(data, n=800, image_size=32, anomaly_fraction=0.05, seed=2, rows_per_shard=25)
    with start_multinode_cluster(worker_cpus=(2, 2), head_cpus=1) as cluster:
        workers = {cluster.node_ids["worker1"], cluster.node_ids["worker2"]}
        result = train(TrainConfig(data_url=data, out_url=str(tmp_path / "run"), workers=2, epochs=1,
                                   model=AutoencoderConfig(image_size=32, latent_dim=16, base_width=8), batch_size=16,
                                   placement_strategy="STRICT_SPREAD"))
        trained = load_checkpoint(result.model_url)
        assert len(set(trained.training["worker_nodes"])) == 2, "the two training workers shared a node"

        out = str(tmp_path / "latents")
        # The pool starts work once all three actors are up: otherwise the first actor may take
        # every block before the others have imported torch, and the test would prove nothing.
        ctx = ray.data.DataContext.get_current()
        saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 120
        try:
            summary = embed(EmbedConfig(data_url=data, model_url=result.model_url, out_url=out, actors=3,
                                        batch_size=25, rows_per_file=25, passthrough=("label",)))
        finally:
            ctx.wait_for_min_actors_s = saved
        assert summary.rows_in == summary.rows_out == 800
        assert sum(summary.rows_by_node.values()) == 800
        assert len(summary.rows_by_node) >= 2, f"all rows were embedded on one node: {summary.rows_by_node}"
        assert set(summary.rows_by_node) <= workers | {cluster.node_ids["head"]}
    table = read_latents(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 800
    assert np.isfinite(table.column("mse").to_numpy()).all()
