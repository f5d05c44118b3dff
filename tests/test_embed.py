"""Embedding job: the Ray pipeline equals the plain loop, exactly once across a SIGKILL, clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import kill_part_way, make_tiny_model, rows_written

from pipeline import storage
from pipeline.embed import EmbedConfig, Embedder, embed, embed_reference
from pipeline.errors import InputError
from pipeline.latents import METADATA_KEY, dequantize_latents, read_latents
from pipeline.scores import FUSED_FROM, SCORE_COLUMNS, computable

# What a model with a training bank and a colour memory, without a defect head or patch bank, computes.
BANKED = computable(True, FUSED_FROM, has_colours=True)
from pipeline.resources import (
    CPU_BATCH_SIZE,
    KEEP_FREED_ENV,
    GPU_BATCH_SIZE,
    MIN_OBJECT_STORE_BUDGET,
    object_store_budget,
    plan_actor_pool,
)
from pipeline.thresholds import resolve_threshold
from pipeline.shards import ColumnError, DuplicateIdError
from pipeline.synth import write_synthetic_corpus

REPO = Path(__file__).resolve().parents[1]
BAD_ROWS = {"bad-empty": b"", "bad-junk": b"this is not an image", "bad-truncated": None}


def _make_corpus(root: Path, n: int, rows_per_shard: int, bad: bool = True, image_size: int = 32) -> str:
    write_synthetic_corpus(str(root), n=n, image_size=image_size, anomaly_fraction=0.1, seed=3,
                           rows_per_shard=rows_per_shard)
    if bad:
        good = pq.read_table(next(root.glob("*.parquet")))
        image = good.column("image")[0].as_py()
        truncated = image[: len(image) // 2]
        images = [truncated if v is None else v for v in BAD_ROWS.values()]
        pq.write_table(pa.table({"id": list(BAD_ROWS), "image": pa.array(images, pa.binary()),
                                 "label": [1, 1, 1], "anomaly_kind": ["bad"] * 3}), root / "zz-bad.parquet")
    return str(root)


@pytest.fixture(scope="module")
def model_url(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _make_corpus(tmp_path_factory.mktemp("corpus") / "shards", n=240, rows_per_shard=60)


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


@pytest.mark.ray
def test_ray_job_equals_the_plain_reference_row_for_row(ray_local, corpus, model_url, tmp_path):
    cfg = EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "latents"), passthrough=("label",),
                      batch_size=64, scores="all")
    summary = embed(cfg)
    assert (summary.rows_in, summary.rows_out, summary.error_rows) == (243, 243, 3)

    got = read_latents(cfg.out_url)
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 243
    reference = embed_reference(cfg, summary.threshold)
    assert set(ids) == set(reference.column("id").to_pylist())
    ray_rows, ref_rows = _by_id(got), _by_id(reference)
    for row_id, ref in ref_rows.items():
        row = ray_rows[row_id]
        assert row["error"] == ref["error"] and row["label"] == ref["label"]
        if ref["error"] is None:
            np.testing.assert_allclose(row["latent"], ref["latent"], atol=1e-5)
            for name in BANKED:
                assert row[name] == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name
            assert row["is_anomaly"] == ref["is_anomaly"]
    # Every score is a column, the neighbour and fused ones too (the model has a training bank).
    assert set(BANKED) <= set(got.column_names)
    # Bad rows: a reason each, null latent and scores, and the job went on.
    for bad in BAD_ROWS:
        row = ray_rows[bad]
        assert row["error"] and row["latent"] is None and row["is_anomaly"] is None
        assert all(row[name] is None for name in BANKED)
    assert len({ray_rows[b]["error"] for b in BAD_ROWS}) == 3, "each kind of bad input has its own reason"
    assert summary.flagged_rows == sum(bool(r["is_anomaly"]) for r in ray_rows.values())
    # The threshold is the calibration's 0.99 quantile, and every file records the model.
    assert summary.threshold == pytest.approx(resolve_threshold("quantile:0.99", _calibration(model_url)))
    files = storage.list_files(cfg.out_url)
    assert files
    for f in files:
        meta = json.loads(pq.read_metadata(f).metadata[METADATA_KEY])
        assert meta["model"] == model_url and len(meta["weights_sha256"]) == 64
    # The default storage: int8 latents with a float32 scale, zstd, a dictionary only where values
    # repeat (the int8 latent), not for the float scores (latent_write_options).
    latent = got.schema.field("latent").type
    assert (latent.value_type, latent.list_size) == (pa.int8(), 16)
    assert got.schema.field("latent_scale").type == pa.float32()
    group = pq.ParquetFile(files[0]).metadata.row_group(0)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert {c.compression for c in chunks.values()} == {"ZSTD"}
    assert "RLE_DICTIONARY" not in chunks["mse"].encodings
    assert "RLE_DICTIONARY" in chunks["latent.list.element"].encodings

    # A rerun of a finished job does nothing and duplicates nothing.
    again = embed(cfg)
    assert again.rows_out == 243 and len(read_latents(cfg.out_url)) == 243


@pytest.mark.ray
def test_the_score_option_picks_the_column_that_sets_is_anomaly(ray_local, corpus, model_url, tmp_path):
    by_mse = EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "by-mse"), batch_size=64,
                         scores="all")
    first = embed(by_mse)
    rows = [r for r in read_latents(by_mse.out_url).to_pylist() if r["error"] is None]
    assert first.score == "mse" and all(r["is_anomaly"] == (r["mse"] > first.threshold) for r in rows)
    cut = float(np.median([r["fused"] for r in rows]))  # flags half of the corpus by the fused score
    by_fused = EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "by-fused"), score="fused",
                           threshold=f"value:{cut!r}", batch_size=64)
    second = embed(by_fused)
    flags = {r["id"]: r for r in read_latents(by_fused.out_url).to_pylist() if r["error"] is None}
    assert second.score == "fused" and second.flagged_rows == sum(r["fused"] > cut for r in rows) > 0
    assert all(flags[r["id"]]["is_anomaly"] == (r["fused"] > cut) for r in rows)
    assert any(flags[r["id"]]["is_anomaly"] != r["is_anomaly"] for r in rows), "mse flagged other rows"
    meta = json.loads(pq.read_metadata(storage.list_files(by_fused.out_url)[0]).metadata[METADATA_KEY])
    assert meta["score"] == "fused" and meta["threshold"] == pytest.approx(cut)


def test_an_unknown_score_is_refused_naming_the_scores(corpus, model_url, tmp_path):
    with pytest.raises(InputError, match="ssim_top"):
        embed(EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "l"), score="sharpness"))


def _score_columns(table: pa.Table) -> tuple[str, ...]:
    return tuple(name for name in table.column_names if name in SCORE_COLUMNS)


def test_scores_default_to_the_flag_score_and_mse_and_all_needs_no_retraining(corpus, model_url):
    """The default computes the flag score, what it reads and mse; `all` every score, from the same
    model and calibration; a list those named and what they read; the metadata lists the columns."""
    base = dict(data_url=corpus, model_url=model_url, out_url="", batch_size=64)
    tables = {scores: embed_reference(EmbedConfig(**base, score="fused", scores=scores), 1.0)
              for scores in (None, "all", "gms_top,fused")}
    assert _score_columns(tables[None]) == ("mse", "ssim_top", "stem_knn", "colour_top", "fused")
    assert _score_columns(tables["all"]) == BANKED
    assert _score_columns(tables["gms_top,fused"]) == ("mse", "ssim_top", "gms_top", "stem_knn", "colour_top",
                                                       "fused")
    every = tables["all"].to_pydict()
    for scores, table in tables.items():
        recorded = json.loads(table.schema.metadata[METADATA_KEY])["scores"]
        assert tuple(recorded) == _score_columns(table), scores
        for name in _score_columns(table):
            np.testing.assert_allclose(np.array(table.column(name).to_pylist(), dtype=float),
                                       np.array(every[name], dtype=float), rtol=1e-6, err_msg=name)
        assert table.column("is_anomaly").to_pylist() == every["is_anomaly"]


def test_scores_refusals_name_the_valid_scores(corpus, model_url, tmp_path):
    from pipeline.embed import prepare

    with pytest.raises(InputError, match=r"unknown score\(s\) 'sharpness'.*mse, ssim_error"):
        EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "l"), scores="mse,sharpness")
    flag = _calibration(model_url)["default_score"]
    other = "gms_max" if flag != "gms_max" else "err_max"
    with pytest.raises(InputError, match=f"the score that sets is_anomaly, {flag}, is not among them"):
        prepare(EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "l"), scores=other))
    assert not (tmp_path / "l").exists(), "refused before anything was written"


def test_the_scores_flag_of_the_embed_command(corpus, model_url, tmp_path, capsys):
    from jobs import embed as embed_job

    argv = ["--data", corpus, "--model", model_url, "--out", str(tmp_path / "l")]
    assert embed_job.parse_args([*argv, "--scores", "gms_top,mse"]).scores == "gms_top,mse"
    assert embed_job.parse_args(argv).scores is None
    assert embed_job.main([*argv, "--scores", "sharpness"]) == 2
    err = capsys.readouterr().err
    assert "unknown score(s) 'sharpness'" in err and "all or a comma-separated list of: mse, ssim_error" in err
    assert not (tmp_path / "l").exists()


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 5, 8, 16, 64])
@pytest.mark.parametrize("resuming", [False, True])
def test_the_actor_pool_always_leaves_room_for_a_read_a_write_and_the_checkpoint_filter(cpus, resuming):
    if resuming and cpus < 2:
        with pytest.raises(InputError, match="resuming needs a cluster of at least 2 CPUs"):
            plan_actor_pool({"CPU": float(cpus)}, resuming)
        return
    plan = plan_actor_pool({"CPU": float(cpus)}, resuming)
    reserved = plan.actors * plan.cpus_per_actor + 2 * plan.task_cpus + (1.0 if resuming else 0.0)
    assert plan.actors >= 1 and reserved <= cpus
    assert plan.torch_threads * plan.actors <= max(cpus, 2)  # threads follow the cores, no more
    assert plan.batch_size == CPU_BATCH_SIZE


@pytest.mark.parametrize("cpus,node_cpus", [(5.0, 2.0), (8.0, 2.0), (64.0, 3.0), (16.0, 16.0)])
def test_no_actor_asks_for_more_cpus_or_threads_than_the_largest_node_has(cpus, node_cpus):
    # Nodes of 1, 2 and 2 CPUs: 5 in all, so one actor of 4 CPUs by the total, which no node could host.
    plan = plan_actor_pool({"CPU": cpus}, False, node_cpus=node_cpus)
    assert 0 < plan.cpus_per_actor <= node_cpus and plan.torch_threads <= node_cpus
    # By the total alone, an actor of 4 threads (the neighbours' search) asks for more than such a node has.
    assert plan_actor_pool({"CPU": 5.0}, False, threads_per_actor=4).cpus_per_actor > 2.0


@pytest.mark.parametrize("cpus,actors", [(2, 2), (3, 3), (16, 14), (64, 62)])
def test_cpu_model_actors_are_single_threaded_and_cover_the_cores(cpus, actors):
    plan = plan_actor_pool({"CPU": float(cpus)}, False)
    assert (plan.actors, plan.torch_threads) == (actors, 1)
    if cpus == 64:  # four 16-CPU nodes: no node can take more one-thread actors than it has cores
        assert 16 // plan.cpus_per_actor <= 16
    search = plan_actor_pool({"CPU": float(cpus)}, False, threads_per_actor=4)
    assert search.actors == max(1, cpus // 4) and search.torch_threads * search.actors <= max(cpus, 2)


@pytest.mark.parametrize("nodes", [(1, 2, 2), (2, 2), (1, 1, 1, 1, 1), (4, 4, 4), (16, 16, 16, 16), (2, 16)])
@pytest.mark.parametrize("threads_per_actor", [1, 4])
def test_the_actors_always_leave_a_whole_read_and_write_task_on_some_node(nodes, threads_per_actor):
    """Placed first-fit on the nodes in any order, the actors leave room for the two tasks (whole
    ones, not fragments spread over nodes): 0.6-CPU actors on nodes of 1, 2 and 2 CPUs once left
    no node a 1-CPU read task could run on, and the train job's calibration waited for ever."""
    plan = plan_actor_pool({"CPU": float(sum(nodes))}, False, node_cpus=float(max(nodes)),
                           threads_per_actor=threads_per_actor)
    for order in (nodes, tuple(reversed(nodes))):
        free = list(map(float, order))
        for _ in range(plan.actors):
            node = next(i for i, cpus in enumerate(free) if cpus >= plan.cpus_per_actor)
            free[node] -= plan.cpus_per_actor
        tasks = sum(int(cpus // plan.task_cpus) for cpus in free)
        assert tasks >= 2, (plan, free)


def test_gpu_actors_take_one_gpu_each_and_large_batches():
    gpu = plan_actor_pool({"CPU": 4.0, "GPU": 2.0}, resuming=False)
    assert (gpu.actors, gpu.gpus_per_actor, gpu.cpus_per_actor, gpu.batch_size) == (2, 1.0, 0.0, GPU_BATCH_SIZE)
    assert plan_actor_pool({"CPU": 4.0, "GPU": 2.0}, False, gpu=False).gpus_per_actor == 0.0
    assert plan_actor_pool({"CPU": 2.0}, False, batch_size=32).batch_size == 32


def test_the_object_store_budget_grows_with_actors_and_batches_from_a_floor():
    small = plan_actor_pool({"CPU": 2.0}, False)
    model = {"image_size": 64, "channels": 3}
    assert object_store_budget(small, model) == MIN_OBJECT_STORE_BUDGET
    gpus = plan_actor_pool({"CPU": 64.0, "GPU": 8.0}, False)
    assert object_store_budget(gpus, model) == 8 * 16 * GPU_BATCH_SIZE * 64 * 64 * 3 > MIN_OBJECT_STORE_BUDGET


def _calibration(model_url: str) -> dict:
    from pipeline.checkpoint import read_checkpoint_meta

    return read_checkpoint_meta(model_url)["training"]["calibration"]


@pytest.mark.parametrize("dtype,stated_error", [("float16", 2e-3), ("int8", 1 / 254 + 1e-6)])
def test_compact_latents_stay_within_the_stated_error(model_url, dtype, stated_error):
    """float16: relative error <= 2^-10; int8 with a per-row scale: <= max|z| / 254 per element."""
    rng = np.random.default_rng(0)
    batch = {"id": np.array([f"r{i}" for i in range(16)]), "error": np.array([None] * 16, dtype=object),
             "pixels": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)}
    exact = Embedder(model_url, "float32")(batch)
    compact = Embedder(model_url, dtype)(batch)
    z = np.stack(exact.column("latent").to_numpy(zero_copy_only=False))
    stored = np.stack(compact.column("latent").to_numpy(zero_copy_only=False))
    scale = compact.column("latent_scale").to_numpy() if dtype == "int8" else None
    assert stored.dtype == {"float16": np.float16, "int8": np.int8}[dtype]
    error = np.abs(dequantize_latents(stored, scale) - z)
    bound = stated_error * np.abs(z).max(axis=1, keepdims=True)
    assert (error <= bound).all()
    np.testing.assert_array_equal(compact.column("mse").to_numpy(), exact.column("mse").to_numpy())


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
@pytest.mark.slow
def test_exactly_once_after_sigkill_and_rerun(tmp_path):
    # 64x64 images so the job runs long enough (tens of seconds) to be killed past half way.
    data = _make_corpus(tmp_path / "shards", n=3000, rows_per_shard=100, bad=False, image_size=64)
    model_url = make_tiny_model(str(tmp_path / "model"), image_size=64)
    out = tmp_path / "latents"
    cmd = [sys.executable, "-m", "jobs.embed", "--data", data, "--model", model_url, "--out", str(out),
           "--batch-size", "50", "--rows-per-file", "50", "--actors", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local"}

    before = kill_part_way(cmd, REPO, env, out, rows=1650)
    assert rows_written(out) >= 1500

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = {f: pq.read_metadata(f).num_rows for f in storage.list_files(str(out))}
    new_rows = sum(n for f, n in after.items() if f not in before)
    print(f"killed with {len(before)} files written; the rerun wrote {new_rows} rows in {len(after) - len(before)} files")
    assert new_rows < 0.6 * 3000, f"the rerun wrote {new_rows} rows: it redid finished work"
    ids = read_latents(str(out), columns=["id"]).column("id").to_pylist()
    assert len(ids) == 3000 and len(set(ids)) == 3000
    expected = set(pq.ParquetDataset(data).read(columns=["id"]).column("id").to_pylist())
    assert set(ids) == expected


@pytest.mark.ray
def test_input_and_output_on_s3(ray_local, s3_bucket, model_url, tmp_path):
    local = _make_corpus(tmp_path / "shards", n=60, rows_per_shard=30)
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(local + "/", f"{s3_bucket[5:]}/shards/", recursive=True)
    s3_model = f"{s3_bucket}/model"
    make_tiny_model(s3_model)
    cfg = EmbedConfig(data_url=f"{s3_bucket}/shards", model_url=s3_model, out_url=f"{s3_bucket}/latents",
                      latent_dtype="int8", passthrough=("label", "anomaly_kind"))
    summary = embed(cfg)
    assert (summary.rows_in, summary.rows_out, summary.error_rows) == (63, 63, 3)
    table = read_latents(cfg.out_url)
    assert sorted(table.column("id").to_pylist()) == sorted(
        read_latents(cfg.data_url, columns=["id"]).column("id").to_pylist())
    assert table.schema.field("latent").type == pa.list_(pa.int8(), 16)
    assert {"latent_scale", "label", "anomaly_kind"} <= set(table.column_names)


# ---------------------------------------------------------------- refused before any work


def test_missing_column_is_refused_listing_the_columns_found(corpus, model_url, tmp_path):
    with pytest.raises(ColumnError, match=r"(?s)'jpg'.*image"):
        embed(EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "o"), image_column="jpg"))
    with pytest.raises(ColumnError, match="nope"):
        embed(EmbedConfig(data_url=corpus, model_url=model_url, out_url=str(tmp_path / "o"), passthrough=("nope",)))


def test_duplicate_ids_are_refused_with_examples(tmp_path, model_url):
    data = _make_corpus(tmp_path / "shards", n=20, rows_per_shard=10, bad=False)
    first = pq.read_table(sorted(Path(data).glob("*.parquet"))[0])
    pq.write_table(first.slice(0, 2), Path(data) / "copy.parquet")
    with pytest.raises(DuplicateIdError, match=first.column("id")[0].as_py()):
        embed(EmbedConfig(data_url=data, model_url=model_url, out_url=str(tmp_path / "o")))


def test_grayscale_model_is_refused_for_colour_data(corpus, tmp_path):
    gray = make_tiny_model(str(tmp_path / "gray"), channels=1)
    with pytest.raises(InputError, match="grayscale"):
        embed(EmbedConfig(data_url=corpus, model_url=gray, out_url=str(tmp_path / "o")))


def test_output_folder_of_another_model_is_refused(corpus, model_url, tmp_path):
    from pipeline.checkpoint import read_checkpoint_meta
    from pipeline.embed import check_output_folder

    out = str(tmp_path / "o")
    sha = read_checkpoint_meta(model_url)["weights_sha256"]
    check_output_folder(EmbedConfig(data_url=corpus, model_url=model_url, out_url=out, resize="pad", model_sha256=sha))
    other = make_tiny_model(str(tmp_path / "other"), seed=1)
    with pytest.raises(InputError, match="holds results of another model"):
        embed(EmbedConfig(data_url=corpus, model_url=other, out_url=out))
    with pytest.raises(InputError, match="other settings .*latent_dtype"):
        embed(EmbedConfig(data_url=corpus, model_url=model_url, out_url=out, latent_dtype="float32"))


# A child process loads a model for inference (as every embed actor does), then runs a
# default-size model on batches of 128, on a pool thread (as Ray Data runs an actor's batches)
# and on the main thread (the bare loop): the pages each of the last five of twelve batches
# faults in.
_REUSES_FREED_MEMORY = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from pipeline.inference import load_inference_model
from pipeline.model import AutoencoderConfig, build_model, fuse_for_inference
from pipeline.resources import keep_freed_memory
load_inference_model(sys.argv[1])
torch.set_num_threads(1)
model = fuse_for_inference(build_model(AutoencoderConfig(image_size=64)).eval()).to(memory_format=torch.channels_last)
def faults_per_batch():
    x = torch.rand(128, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    counts = []
    with torch.inference_mode():
        for _ in range(12):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts[-5:]
with ThreadPoolExecutor(1) as pool:
    thread = pool.submit(faults_per_batch).result()
print(json.dumps({"kept": keep_freed_memory(), "thread": thread, "main": faults_per_batch()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is tuned")
def test_an_inference_process_reuses_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    model = make_tiny_model(str(tmp_path / "model"))

    def run(env: dict[str, str]) -> dict:
        out = subprocess.run([sys.executable, "-c", _REUSES_FREED_MEMORY, model], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    kept, default = run({}), run({KEEP_FREED_ENV: "0"})
    assert kept["kept"] and not default["kept"]
    for place in ("thread", "main"):
        # glibc's default gives part of each batch's activations back and faults them in again,
        # thousands of pages every batch; kept, a batch faults in next to none (a heap may still
        # grow once in a while: at most one batch of the five).
        assert min(default[place]) > 5000, default
        assert sorted(kept[place])[3] < 256, kept
