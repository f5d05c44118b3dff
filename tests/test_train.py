"""Training on Ray Train: learning, resume after a kill, surviving a crashed worker, seeds, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import train as train_job
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import InputError
from pipeline.images import decode_batch, encode_image
from pipeline.model import AutoencoderConfig, build_model
from pipeline.sampling import split_of
from pipeline.scores import DEFAULT_SCORE, FUSED_FROM, names_needing
from pipeline.scoring import mse_per_image
from pipeline.synth import synthetic_image, write_synthetic_corpus
from pipeline.thresholds import Calibration
from pipeline.train import METRICS_FILE, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY = AutoencoderConfig(image_size=32, latent_dim=16, base_width=8)
SMALL = dict(model=TINY, batch_size=8, val_fraction=0.2, lr=5e-3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "shards"
    write_synthetic_corpus(str(out), n=320, image_size=32, anomaly_fraction=0.0, seed=1, rows_per_shard=80)
    # Two rows that cannot decode: counted in the metrics, left out of training.
    pq.write_table(pa.table({"id": ["bad-0", "bad-1"], "image": [b"junk", b""]}), out / "zz-bad.parquet")
    return str(out)


def _val_images(data: str, cfg: TrainConfig) -> torch.Tensor:
    table = pa.concat_tables(pq.read_table(p, columns=["id", "image"]) for p in sorted(Path(data).glob("*.parquet")))
    ids = table.column("id").to_pylist()
    val = split_of(ids, cfg.val_fraction)
    images = [b for b, v in zip(table.column("image").to_pylist(), val) if v]
    pixels, errors = decode_batch(images, cfg.model.image_size, cfg.model.channels)
    pixels = pixels[[e is None for e in errors]]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def _val_mse(model, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float(mse_per_image(x, model.eval()(x)["x_hat"]).mean())


def _metrics(out: str) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]


@pytest.mark.ray
def test_two_worker_training_learns_and_exports_a_model_that_loads_without_ray(ray_local, corpus, tmp_path):
    cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / "run"), workers=2, epochs=6,
                      **{**SMALL, "batch_size": 4, "model": replace(TINY, latent_dim=32)})
    x_val = _val_images(corpus, cfg)
    torch.manual_seed(cfg.seed)
    untrained = _val_mse(build_model(cfg.model), x_val)

    result = train(cfg)

    history = _metrics(cfg.out_url)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert {"train_loss", "val_mse", "val_psnr", "images_per_s", "decode_failures"} <= set(history[0])
    assert history[-1]["val_mse"] < 0.6 * untrained
    assert history[0]["train_images"] + history[0]["val_images"] == 320
    assert all(m["decode_failures"] == 2 for m in history)
    assert history[0]["val_images"] == len(x_val)
    # Both workers' splits fit the default --cache-mb: decoded once, then read from memory, with
    # the same rows every epoch.
    assert [m["data_in_memory"] for m in history] == [False] + [True] * 5
    assert {(m["train_images"], m["val_images"]) for m in history} == {(history[0]["train_images"], len(x_val))}
    # The exported model is the best epoch; loaded with no Ray, it reproduces the reported val MSE.
    exported = load_checkpoint(result.model_url)
    best = min(history, key=lambda m: m["val_mse"])
    assert result.best_epoch == best["epoch"] == exported.training["exported_epoch"]
    assert _val_mse(exported.model, x_val) == pytest.approx(best["val_mse"], rel=1e-4)
    # The calibration carries every score, each fitted on the held-out split; the bank holds the training split.
    calibration = Calibration.from_dict(exported.calibration)
    assert set(calibration.scores) == {*names_needing("reconstruction", "bank", "colours"), "fused"}
    assert calibration.default_score == DEFAULT_SCORE and calibration.fused_from == FUSED_FROM
    for name, fitted in calibration.scores.items():
        assert fitted.count == len(x_val), name
        assert calibration.threshold(name, 0.5) < calibration.threshold(name, 0.99) <= 10 * fitted.grid[-1] + 10
    assert len(exported.bank.ids) == history[0]["train_images"] and not split_of(exported.bank.ids, cfg.val_fraction).any()
    # The colour memory counted the same number of random pixels (at least 64) of every bank image.
    counted, bank_images = int(exported.colours.counts.sum()), len(exported.bank.ids)
    assert counted % bank_images == 0 and counted // bank_images >= 64
    # Ray Train kept the best checkpoints and the latest one, no more.
    kept = sorted(p.name for p in (Path(cfg.out_url) / "checkpoints").glob("epoch-*"))
    assert f"epoch-{len(history):04d}" in kept and len(kept) <= cfg.keep_checkpoints + 1


@pytest.mark.ray
def test_the_structure_aware_loss_and_defect_aware_training_learn_through_the_train_job(ray_local, corpus, tmp_path):
    cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / "run"), workers=1, epochs=4, loss="ssim_l1",
                      defect_aware=True, **{**SMALL, "batch_size": 8})
    x_val = _val_images(corpus, cfg)
    torch.manual_seed(cfg.seed)
    untrained = _val_mse(build_model(cfg.model), x_val)
    aware = train(cfg)
    history = _metrics(cfg.out_url)
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert min(m["val_mse"] for m in history) < untrained  # the loss is not mse, yet mse improves too
    # The option reaches the training step: the same seeded run without it (identical weights run
    # to run, test_same_seed_gives_identical_weights) trains on other inputs, so other losses and
    # weights. (Whether it helps is bench/detection.py's question.)
    plain_cfg = replace(cfg, defect_aware=False, out_url=str(tmp_path / "plain"))
    plain = train(plain_cfg)
    assert _metrics(plain_cfg.out_url)[0]["train_loss"] != history[0]["train_loss"]
    assert load_checkpoint(aware.model_url).weights_sha256 != load_checkpoint(plain.model_url).weights_sha256


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
def test_a_worker_crash_mid_epoch_is_survived(ray_local, corpus, tmp_path):
    marker = tmp_path / "crashed"
    cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / "run"), workers=2, epochs=2, inject_crash=str(marker), **SMALL)
    train(cfg)
    assert marker.exists(), "the injected crash never happened"
    assert [m["epoch"] for m in _metrics(cfg.out_url)] == [1, 2]


@pytest.mark.ray
def test_same_seed_gives_identical_weights(ray_local, corpus, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / name), workers=1, epochs=1, seed=7, **SMALL)
        runs.append(load_checkpoint(train(cfg).model_url))
    assert runs[0].weights_sha256 == runs[1].weights_sha256
    assert runs[0].training["seed"] == 7
    # --invariance reaches the training step: the same seeded run with it learns other weights, and
    # the checkpoint records the weight.
    invariant = TrainConfig(data_url=corpus, out_url=str(tmp_path / "invariant"), workers=1, epochs=1, seed=7,
                            invariance=0.5, **SMALL)
    trained = load_checkpoint(train(invariant).model_url)
    assert trained.weights_sha256 != runs[0].weights_sha256 and trained.training["invariance"] == 0.5
    assert math.isfinite(_metrics(invariant.out_url)[0]["train_loss"])


@pytest.mark.ray
def test_splits_kept_in_memory_train_on_the_same_rows_as_streamed_ones(ray_local, corpus, tmp_path):
    runs = {}
    for name, cache_mb in (("kept", TrainConfig.cache_mb), ("streamed", 0)):
        cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / name), workers=1, epochs=2, seed=3,
                          cache_mb=cache_mb, **SMALL)
        train(cfg)
        runs[name] = _metrics(cfg.out_url)
    kept, streamed = runs["kept"], runs["streamed"]
    assert [m["data_in_memory"] for m in kept] == [False, True]
    assert [m["data_in_memory"] for m in streamed] == [False, False]
    # The first epoch streams in both, so it is the same epoch; the second reads other orders of the same rows.
    assert (kept[0]["train_loss"], kept[0]["val_mse"]) == (streamed[0]["train_loss"], streamed[0]["val_mse"])
    for a, b in zip(kept, streamed):
        assert (a["train_images"], a["val_images"], a["decode_failures"]) == (
            b["train_images"], b["val_images"], b["decode_failures"]) == (a["train_images"], a["val_images"], 2)
    assert kept[1]["train_loss"] != streamed[1]["train_loss"]


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
def test_a_run_resumed_with_its_data_in_memory_ends_with_the_weights_of_an_uninterrupted_one(ray_local, corpus,
                                                                                            tmp_path):
    # The crash comes in epoch 2, after epoch 1's checkpoint: the restarted worker decodes both
    # splits again before epoch 2 and reads them in the order the uninterrupted run did.
    marker = tmp_path / "crashed"
    runs = {}
    for name, crash in (("whole", None), ("resumed", str(marker))):
        cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / name), workers=1, epochs=3, seed=5,
                          inject_crash=crash, **SMALL)
        runs[name] = (load_checkpoint(train(cfg).model_url).weights_sha256, _metrics(cfg.out_url))
        assert [m["data_in_memory"] for m in runs[name][1]] == [False, True, True]
    assert marker.exists(), "the injected crash never happened"
    (whole, whole_history), (resumed, resumed_history) = runs["whole"], runs["resumed"]
    assert [(m["train_loss"], m["val_mse"]) for m in resumed_history] == [
        (m["train_loss"], m["val_mse"]) for m in whole_history]
    assert resumed == whole


@pytest.mark.faults  # a kill or a crash mid-job: `make test-faults`
@pytest.mark.ray
@pytest.mark.slow
def test_rerun_after_sigkill_resumes_and_stops_at_the_requested_epochs(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.train", "--data", corpus, "--out", str(out), "--epochs", "4",
           "--workers", "1", "--image-size", "32", "--latent-dim", "16", "--base-width", "8",
           "--batch-size", "8", "--val-fraction", "0.2"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    # Killed once Ray Train has registered epoch 1's checkpoint (its snapshot names it): the
    # folder alone appears before the registration, and a kill in between leaves nothing to resume.
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (snapshot.exists() and "epoch-0001" in snapshot.read_text()):
        time.sleep(0.2)
    assert snapshot.exists() and "epoch-0001" in snapshot.read_text(), "no checkpoint registered before the deadline"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    first.wait()
    done_before = len(_metrics(str(out))) if (out / METRICS_FILE).exists() else 0
    assert done_before < 4, "the first run finished before it could be killed"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from epoch" in second.stdout + second.stderr
    assert [m["epoch"] for m in _metrics(str(out))] == [1, 2, 3, 4]


def test_empty_dataset_is_refused_before_training(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "image": pa.array([], pa.binary())}),
                   tmp_path / "data" / "part-0.parquet")
    with pytest.raises(InputError, match="holds no rows"):
        train(TrainConfig(data_url=str(tmp_path / "data"), out_url=str(tmp_path / "run")))


def test_data_where_no_image_decodes_is_refused_before_training(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [b"", b"not an image", b"\x89PNG\r\n"]}),
                   tmp_path / "data" / "part-0.parquet")
    with pytest.raises(InputError, match="none of the first 3 images .* decode"):
        train(TrainConfig(data_url=str(tmp_path / "data"), out_url=str(tmp_path / "run")))


@pytest.mark.ray
def test_an_epoch_without_one_decodable_training_image_fails_the_job_without_a_traceback(ray_local, tmp_path,
                                                                                          capsys):
    # The images that decode all fall in the held-out split (by id hash), so the preflight passes but the
    # training split has none: the job ends with exit 1 and a summary, and exports no model.
    ids = [f"row-{i:03d}" for i in range(40)]
    held_out = split_of(ids, 0.5)
    good = [i for i, v in zip(ids, held_out) if v][:4]
    junk = [i for i, v in zip(ids, held_out) if not v][:8]
    images = [encode_image(synthetic_image(n, 0, 32, 3)) for n in range(len(good))] + [b"not an image"] * len(junk)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": good + junk, "image": pa.array(images, pa.binary())}),
                   tmp_path / "data" / "part-0.parquet")
    out = tmp_path / "run"
    code = train_job.main(["--data", str(tmp_path / "data"), "--out", str(out), "--image-size", "32",
                           "--latent-dim", "16", "--base-width", "8", "--epochs", "2", "--batch-size", "4",
                           "--val-fraction", "0.5", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 1, captured.out[-3000:] + captured.err[-3000:]
    assert json.loads(captured.out.strip().splitlines()[-1]) == {"epoch": 1, "train_images": 0,
                                                                  "decode_failures": len(junk)}
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: no training image decoded in epoch 1 ({len(junk)} rows failed to decode): check "
                      f"column 'image' of {tmp_path / 'data'}; no model was exported"]
    assert "Traceback" not in captured.out + captured.err
    assert not (out / "model").exists()


def test_resuming_with_other_settings_is_refused(tmp_path, corpus):
    cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / "run"), **SMALL)
    from pipeline.shards import fingerprint
    from pipeline.train import check_run_folder

    check_run_folder(replace(cfg, data_fingerprint=fingerprint(corpus)))
    with pytest.raises(InputError, match=r"image_size: 32 -> 64"):
        train(replace(cfg, model=replace(TINY, image_size=64)))
    with pytest.raises(InputError, match=r"arch: 'fire' -> 'plain'"):
        train(replace(cfg, model=replace(TINY, arch="plain")))
    with pytest.raises(InputError, match=r"invariance: 0.0 -> 0.1"):
        train(replace(cfg, invariance=0.1))
    with pytest.raises(InputError, match=r"working_size: 0 -> 64"):
        train(replace(cfg, model=replace(TINY, working_size=64)))
    with pytest.raises(InputError, match=r"corruptions: \['texture', 'patch', 'stroke', 'shade'\] -> \['shade'\]"):
        train(replace(cfg, corruptions=("shade",)))


def test_a_run_folder_of_an_older_version_resumes_with_the_defaults_it_did_not_record(tmp_path, corpus):
    """Settings added since a run began (tiles, corruption kinds) were at their defaults then."""
    import json

    from pipeline.shards import fingerprint
    from pipeline.train import check_run_folder

    cfg = TrainConfig(data_url=corpus, out_url=str(tmp_path / "run"), **SMALL, data_fingerprint=fingerprint(corpus))
    check_run_folder(cfg)
    run_file = tmp_path / "run" / "run.json"
    recorded = json.loads(run_file.read_text())
    del recorded["corruptions"], recorded["model"]["working_size"], recorded["model"]["tile_stride"]
    run_file.write_text(json.dumps(recorded))
    check_run_folder(cfg)  # no refusal: what the old run did not record, it ran at the default
    with pytest.raises(InputError, match="working_size: 0 -> 64"):
        check_run_folder(replace(cfg, model=replace(TINY, working_size=64)))


@pytest.mark.ray
def test_data_checkpoints_and_model_on_s3_and_resume_from_there(ray_local, corpus, s3_bucket):
    from pipeline import storage

    fs, _ = storage.filesystem(s3_bucket)
    fs.put(corpus + "/", f"{s3_bucket[5:]}/shards/", recursive=True)
    cfg = TrainConfig(data_url=f"{s3_bucket}/shards", out_url=f"{s3_bucket}/run", workers=1, epochs=1, **SMALL)
    first = train(cfg).history
    # Asking for one epoch more continues from the checkpoint on S3 rather than starting over:
    # epoch 1's record (its timings included) is the first run's, untouched.
    result = train(replace(cfg, epochs=2))

    history = [json.loads(line) for line in storage.read_text(f"{cfg.out_url}/{METRICS_FILE}").splitlines()]
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[0] == first[0]
    assert history[0]["train_images"] + history[0]["val_images"] == 320
    run = f"{s3_bucket[5:]}/run"
    assert fs.exists(f"{run}/checkpoints/epoch-0002") and fs.exists(f"{run}/run.json")
    assert result.model_url == f"{cfg.out_url}/model"
    exported = load_checkpoint(result.model_url)
    x_val = _val_images(corpus, cfg)
    best = min(history, key=lambda m: m["val_mse"])
    assert _val_mse(exported.model, x_val) == pytest.approx(best["val_mse"], rel=1e-4)
