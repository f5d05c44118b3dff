"""Builders of small real artefacts the tests share: a tiny checkpoint with a real calibration."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.colour_memory import ColourMemory
from pipeline.model import AutoencoderConfig, build_model
from pipeline.inference import ImageScorer
from pipeline.scoring import calibrate_with_bank, mse_per_image
from pipeline.synth import synthetic_image


def make_tiny_model(url: str, channels: int = 3, seed: int = 0, image_size: int = 32, train_steps: int = 0,
                    default_score: str = "mse") -> str:
    """A real checkpoint of a tiny Fire autoencoder (latent 16, base width 8) at `url`.

    Untrained by default (its weights come from `seed`); `train_steps` > 0 fits it briefly to
    40 synthetic images, enough for its decoder to draw distinct images from distinct latents.
    Its calibration holds every score, calibrated as the train job does it
    (`calibrate_with_bank`): the held-out rows are 32 random images, the training bank and the
    colour memory those 40 synthetic images. `default_score` is the score it flags by unless
    told otherwise.
    """
    torch.manual_seed(seed)
    model = build_model(AutoencoderConfig(image_size=image_size, channels=channels, latent_dim=16, base_width=8))
    bank_pixels = np.stack([synthetic_image(i, 3, image_size, channels) for i in range(40)])
    synthetic = torch.from_numpy(bank_pixels).permute(0, 3, 1, 2).float() / 255
    if train_steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(train_steps):
            loss = mse_per_image(synthetic, model(synthetic)["x_hat"]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    x = torch.cat([torch.rand(32, channels, image_size, image_size), synthetic])
    ids = [f"held-out-{i}" for i in range(32)] + [f"bank-{i}" for i in range(40)]
    colours = ColourMemory.from_pixels(bank_pixels, seed=seed)
    calibration, bank = calibrate_with_bank(ids, np.arange(len(ids)) < 32, ImageScorer(model, colours=colours).rows(x),
                                            default=default_score)
    save_checkpoint(url, model, training={"calibration": calibration.to_dict(), "preprocessing": {"resize": "pad"}},
                    bank=bank, colours=colours)
    return url


def fit_briefly(model: torch.nn.Module, images: torch.Tensor, steps: int, batch_size: int, lr: float) -> torch.nn.Module:
    """Train `model` for `steps` AdamW steps of per-image MSE on random batches of `images`
    (B, C, S, S) in [0, 1], batches drawn with seed 0; returns it in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        loss = mse_per_image(batch, model(batch)["x_hat"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# --- WebDataset tar shards in img2dataset's layout ----------------------------------------

NO_IMAGE_KEY = "000000003"  # a sample with .json and .txt but no image member
BAD_IMAGE_KEY = "000000005"  # a .jpg that is not an image


def write_tar_shards(root, n: int, shards: int = 2, image_size: int = 32, bad: bool = True, seed: int = 0) -> dict:
    """img2dataset-style tar shards under `root`: `<key>.jpg`, `<key>.json`, `<key>.txt` per sample,
    keys `%09d` counting on across shards (`00000.tar`, `00001.tar`, ...).

    With `bad`, sample NO_IMAGE_KEY has no image member and BAD_IMAGE_KEY's .jpg is not an image;
    every 7th sample has a .png instead of a .jpg. Returns {key: its JSON}, in key order.
    """
    import io
    import json
    import tarfile
    from pathlib import Path

    from pipeline.images import encode_image
    from pipeline.synth import synthetic_image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    per_shard = -(-n // shards)
    samples: dict[str, dict] = {}
    for shard in range(shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for index in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                key = f"{index:09d}"
                meta = {"key": key, "uid": f"u-{index}", "caption": f"image number {index}", "width": image_size,
                        "status": "success"}
                members = {}
                pixels = synthetic_image(index, seed, image_size, 3)
                if bad and key == BAD_IMAGE_KEY:
                    members["jpg"] = b"this is not a jpeg"
                elif index % 7 == 6:
                    members["png"] = encode_image(pixels, "png")
                elif not (bad and key == NO_IMAGE_KEY):
                    members["jpg"] = encode_image(pixels, "jpeg", quality=90)
                members["json"] = json.dumps(meta).encode()
                members["txt"] = meta["caption"].encode()
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples[key] = meta
    return samples


def load_with_datasets(files, cache_dir):
    """Parquet files opened the way a Hugging Face user would: `datasets.load_dataset("parquet", ...)`,
    offline, with its cache under `cache_dir`."""
    import os

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                                 cache_dir=str(cache_dir))


# --- killing a job part way ----------------------------------------------------------------


def rows_written(out, prefix: str = "") -> int:
    """Rows in the Parquet files under `out` whose names start with `prefix` (a job's row files,
    not its other tables); a file still being written (no footer yet) counts 0."""
    import posixpath

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    rows = 0
    fs, _ = storage.arrow_filesystem(str(out))  # an s3:// folder too, at the project's endpoint
    for f in storage.list_files(str(out)):
        if not posixpath.basename(f).startswith(prefix):
            continue
        try:
            rows += pq.read_metadata(storage.filesystem(f)[1], filesystem=fs).num_rows
        except (OSError, pa.ArrowInvalid):
            pass
    return rows


def kill_when(cmd: list[str], cwd, env: dict, ready, timeout: float = 300) -> None:
    """Start `cmd` in its own session and SIGKILL the whole group once `ready()` holds."""
    import os
    import signal
    import subprocess
    import time

    job = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None and not ready():
        time.sleep(0.1)
    assert job.poll() is None, "the job ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def kill_part_way(cmd: list[str], cwd, env: dict, out, rows: int, timeout: float = 300,
                  prefix: str = "") -> set[str]:
    """Start `cmd` in its own session, SIGKILL the whole group once `out` holds `rows` rows (in
    the files named `prefix`*, see rows_written); returns the files written by then."""
    from pipeline import storage

    kill_when(cmd, cwd, env, lambda: rows_written(out, prefix) >= rows, timeout)
    return set(storage.list_files(str(out)))
