"""One-class scikit-learn digits by reconstruction mse: the Fire autoencoder against the plain one.

    python bench/digits.py                    # a few minutes on 2 cores

What squeezing costs in detection quality, on real images. (Every anomaly score, the
calibration and the defect kinds of the synthetic corpus are bench/detection.py's; its digits
part scores the Fire model alone, by every score.)

Digits (scikit-learn's load_digits: 1,797 real 8x8 scans, upsampled bilinearly to 32x32
grayscale): each digit in turn is the normal class. The model trains on 70% of that digit's
images; AUROC (mse as the score, other digits as anomalies) is taken over the other 30% of
the digit plus every other digit ("held out"), and over all 1,797 images as well ("all",
which counts the training images among the normals). Both architectures, same widths and
latent size, same epochs.

Models train with a bare in-process loop (same model, loss, optimiser and schedule as
pipeline/train.py: per-image MSE, AdamW, cosine decay per epoch). Prints a Markdown section for
docs/BENCHMARKS.md and writes it to <out>/anomaly.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model import AutoencoderConfig, build_model, count_parameters  # noqa: E402
from pipeline.scoring import mse_per_image  # noqa: E402


def train_autoencoder(pixels: np.ndarray, config: AutoencoderConfig, epochs: int, batch_size: int = 64,
                      lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Module:
    """(N, S, S, C) uint8 -> a trained model in eval mode; pipeline/train.py's loop without Ray."""
    torch.manual_seed(seed)
    model = build_model(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    data = torch.from_numpy(pixels)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            x = data[order[start:start + batch_size]].permute(0, 3, 1, 2).float().div_(255.0)
            if len(x) < 2:  # BatchNorm needs two images
                continue
            loss = mse_per_image(x, model(x)["x_hat"]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


@torch.inference_mode()
def score(model: torch.nn.Module, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, S, S, C) uint8 -> (N,) reconstruction MSE."""
    out = []
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[start:start + batch_size]).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(mse_per_image(x, model(x)["x_hat"]).numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- digits, one class at a time


def load_digits_32() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (values 0..16) as (1797, 32, 32, 1) uint8 and their digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR)) for img in small])
    return big[..., None], digits.target


def run_digits(epochs: int, base_width: int, latent_dim: int, batch_size: int) -> dict:
    from sklearn.metrics import roc_auc_score

    pixels, target = load_digits_32()
    results: dict[str, dict] = {}
    for arch in ("fire", "plain"):
        config = AutoencoderConfig(arch=arch, image_size=32, channels=1, base_width=base_width,
                                   latent_dim=latent_dim)
        rows, started = [], time.perf_counter()
        for digit in range(10):
            normal = np.flatnonzero(target == digit)
            rng = np.random.default_rng(digit)
            train = rng.choice(normal, size=int(round(0.7 * len(normal))), replace=False)
            model = train_autoencoder(pixels[train], config, epochs, batch_size=batch_size, seed=digit)
            mse = score(model, pixels)
            anomaly = (target != digit).astype(int)
            held_out = np.ones(len(target), dtype=bool)
            held_out[train] = False
            rows.append({"digit": digit, "train_images": len(train),
                         "auroc_held_out": float(roc_auc_score(anomaly[held_out], mse[held_out])),
                         "auroc_all": float(roc_auc_score(anomaly, mse))})
            print(f"digits {arch}: digit {digit} AUROC held out {rows[-1]['auroc_held_out']:.3f} "
                  f"all {rows[-1]['auroc_all']:.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
        results[arch] = {"params": count_parameters(build_model(config)), "per_digit": rows,
                         "mean_held_out": float(np.mean([r["auroc_held_out"] for r in rows])),
                         "mean_all": float(np.mean([r["auroc_all"] for r in rows])),
                         "seconds": time.perf_counter() - started}
    return {"epochs": epochs, "batch_size": batch_size, "base_width": base_width, "latent_dim": latent_dim,
            "archs": results}


# ---------------------------------------------------------------- the Markdown section


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} thread(s) in the "
            "training loop), "
            f"Python {platform.python_version()}")


def markdown(digits: dict) -> str:
    lines = ["### scikit-learn digits, Fire against plain", "",
             "`python bench/digits.py` — detection quality by reconstruction mse, not speed. "
             f"Machine: {machine()}; load average at the end: {os.getloadavg()[0]:.1f} (shared with other jobs, "
             "which changes run times, not these scores).", ""]
    fire, plain = digits["archs"]["fire"], digits["archs"]["plain"]
    lines += ["1,797 real 8x8 digit scans (`sklearn.datasets.load_digits`) upsampled bilinearly to 32x32 "
              "grayscale. Each digit in turn is the normal class: the model trains on 70% of that digit "
              f"(about 125 images) for {digits['epochs']} epochs (batch {digits['batch_size']}, AdamW 3e-3, "
              "cosine), and every image "
              "is scored by its reconstruction mse with the other nine digits as anomalies. \"Held out\" scores "
              "the unseen 30% of the normal digit against all other digits; \"all\" scores all 1,797 "
              "(the training images count among the normals). Both models: base width "
              f"{digits['base_width']}, latent {digits['latent_dim']}; fire {fire['params']:,} parameters, "
              f"plain {plain['params']:,} ({fire['params'] / plain['params']:.0%}). "
              f"Run time: fire {fire['seconds']:.0f} s, plain {plain['seconds']:.0f} s for all ten digits.", "",
              "| normal digit | fire AUROC held out | plain AUROC held out | fire AUROC all | plain AUROC all |",
              "|---:|---:|---:|---:|---:|"]
    for f, p in zip(fire["per_digit"], plain["per_digit"]):
        lines.append(f"| {f['digit']} | {f['auroc_held_out']:.3f} | {p['auroc_held_out']:.3f} | "
                     f"{f['auroc_all']:.3f} | {p['auroc_all']:.3f} |")
    lines.append(f"| **mean** | **{fire['mean_held_out']:.3f}** | **{plain['mean_held_out']:.3f}** | "
                 f"**{fire['mean_all']:.3f}** | **{plain['mean_all']:.3f}** |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="/tmp/bench-anomaly", help="folder for the Markdown and JSON results")
    p.add_argument("--digits-epochs", type=int, default=40, help="training epochs per digit")
    p.add_argument("--digits-batch", type=int, default=16, help="batch size of the digits models")
    p.add_argument("--digits-width", type=int, default=16, help="base width of the digits models")
    p.add_argument("--digits-latent", type=int, default=32, help="latent size of the digits models")
    # One thread: on a shared 2-core machine, two OpenMP threads with one core taken by another
    # process ran these small models 40x slower (threads spin at every barrier for a descheduled peer).
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training loop")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    digits = run_digits(args.digits_epochs, args.digits_width, args.digits_latent, args.digits_batch)
    text = markdown(digits)
    (out / "anomaly.md").write_text(text)
    from bench.common import write_results

    write_results("digits", {"digits": digits})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
