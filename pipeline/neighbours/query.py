"""Ask a built index for the nearest ids of new images (through the model) or of ids it holds.

    from pipeline.neighbours import query
    query("out/neighbours", model_url="runs/r1/model", images=[open("a.png", "rb").read()], k=5)
    query("out/neighbours", ids=["synth-00000001"], k=5)

Images go through the same path as the embed job (decode at the model's size and resize
policy, the folded model, the latents' storage type round trip), so an image that is in the
corpus finds itself at distance ~0. A query by id looks its latent up in the latent dataset
the index was built from (index.json) and leaves the row itself out of the answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.checkpoint import read_checkpoint_meta
from pipeline.errors import InputError
from pipeline.latents import read_latent_rows
from pipeline.neighbours.calibrate import encode_images
from pipeline.neighbours.index import LoadedIndex

MAX_K = 1000


def query(neighbours_url: str, model_url: str | None = None, images: Sequence[bytes] | None = None,
          ids: Sequence[str] | None = None, k: int = 10, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """For each query, {"query", "ids", "distances", "error"}: its k nearest ids, nearest first.

    Give `images` (encoded bytes; needs `model_url`, the model that made the latents) or `ids`.
    `names` label the image queries in the answer (default "image-1", ...). A query image that
    cannot be decoded gets empty lists and the reason in "error".
    """
    if (images is None) == (ids is None):
        raise InputError("give images or ids to query, not both or neither")
    if not 1 <= k <= MAX_K:
        raise InputError(f"k must be from 1 to {MAX_K}, got {k}")
    index = LoadedIndex(neighbours_url)
    if ids is not None:
        ids = [str(i) for i in ids]
        latents = read_latent_rows(index.settings["latents_url"], ids)
        found, distances = index.search(np.stack([latents[i] for i in ids]) if ids else np.zeros((0, index.dim)),
                                        k + 1)
        return [{"query": own, "ids": [n for n in names_ if n != own][:k],
                 "distances": [d for n, d in zip(names_, dists) if n != own][:k], "error": None}
                for own, names_, dists in zip(ids, found, distances)]
    if not model_url:
        raise InputError("a query by image needs --model: the model that made the latents")
    meta = read_checkpoint_meta(model_url)
    expected = index.settings.get("model_sha256")
    if expected and meta.get("weights_sha256") and meta["weights_sha256"] != expected:
        raise InputError(f"{model_url} (weights {meta['weights_sha256'][:12]}) is not the model the indexed latents "
                         f"were made with (weights {expected[:12]}): its latents would not be comparable")
    labels = list(names) if names is not None else [f"image-{n}" for n in range(1, len(images) + 1)]
    ok, reasons, z = encode_images(model_url, list(images), index.settings.get("latent_dtype", "float32"),
                                   index.settings.get("precision", "float32"))
    found, distances = index.search(z[ok], k)
    answers, hit = [], iter(zip(found, distances))
    for label, good, reason in zip(labels, ok, reasons):
        if good:
            near, dists = next(hit)
            answers.append({"query": label, "ids": near, "distances": dists, "error": None})
        else:
            answers.append({"query": label, "ids": [], "distances": [], "error": reason})
    return answers


@dataclass(frozen=True)
class QueryConfig:
    """A `jobs.query` run: the index, the queries, k; validated when built (InputError)."""

    neighbours_url: str
    model_url: str | None = None
    images: tuple[str, ...] = ()  # URLs or paths of image files
    ids: tuple[str, ...] = ()
    k: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "ids", tuple(self.ids))
        if bool(self.images) == bool(self.ids):
            raise InputError("give --image (one or more) or --ids, not both or neither")
        if not 1 <= self.k <= MAX_K:
            raise InputError(f"--k must be from 1 to {MAX_K}, got {self.k}")
        if self.images and not self.model_url:
            raise InputError("a query by image needs --model: the model that made the latents")


def run_query(cfg: QueryConfig, emit=print) -> dict[str, Any]:
    """Answer the queries, `emit` each answer as it is made, and return the summary."""
    started = time.perf_counter()
    if cfg.images:
        data = []
        for url in cfg.images:
            if not storage.exists(url):
                raise InputError(f"--image {url}: no such file")
            data.append(storage.read_bytes(url))
        answers = query(cfg.neighbours_url, cfg.model_url, images=data, k=cfg.k, names=cfg.images)
    else:
        answers = query(cfg.neighbours_url, ids=cfg.ids, k=cfg.k)
    for answer in answers:
        emit(answer)
    return {"queries": len(answers), "failed": sum(a["error"] is not None for a in answers), "k": cfg.k,
            "index": cfg.neighbours_url, "seconds": round(time.perf_counter() - started, 3)}
