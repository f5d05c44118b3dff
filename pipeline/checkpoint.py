"""Model checkpoints: a directory (any fsspec URL) that describes itself and loads without Ray.

    <dir>/model.safetensors   the weights; safetensors never runs code when loaded
    <dir>/config.json         {"format", "format_version", "model": AutoencoderConfig,
                               "weights_sha256", "training": {...facts...}}

`training` holds whatever the trainer knows: data fingerprint, epochs, metrics, and the
calibration (reconstruction-error quantiles on held-out normal data) that thresholds use.
Loading rebuilds the model from the config alone, strips DDP's `module.` prefix, checks
the weights' digest, and refuses weights that do not fit the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline import storage
from pipeline.colour_memory import ColourMemory
from pipeline.errors import InputError
from pipeline.model import AutoencoderConfig, build_model
from pipeline.patch_memory import PatchBank
from pipeline.scores import computable
from pipeline.scoring import TrainingBank

BANK_FILE = "training_bank.parquet"  # the training split's latents and stem statistics, by id
PATCH_BANK_FILE = "patch_bank.safetensors"  # the memory of training patches (pipeline.patch_memory)
COLOUR_FILE = "colour_memory.safetensors"  # the histogram of training pixel values (pipeline.colour_memory)
FORMAT = "squeeze-autoencoder"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DDP_PREFIX = "module."


class CheckpointError(InputError):
    """A checkpoint that is missing, malformed, tampered with, or does not fit its config."""


@dataclass
class Checkpoint:
    model: nn.Module
    config: AutoencoderConfig
    training: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    weights_sha256: str = ""
    bank: TrainingBank | None = None  # for the neighbour scores; None in models made without one
    patch_bank: PatchBank | None = None  # for the patch scores; None in models trained without --patch-bank
    colours: ColourMemory | None = None  # for the colour scores; None in models exported before there was one

    @property
    def calibration(self) -> dict[str, Any]:
        return self.training.get("calibration") or {}

    @property
    def scores(self) -> tuple[str, ...]:
        """Every score this model computes (`scores_of`, from what was loaded)."""
        return computable(self.bank is not None, self.calibration.get("fused_from", ()),
                          has_head=self.config.defect_head, has_patch_bank=self.patch_bank is not None,
                          has_colours=self.colours is not None)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k: v for k, v in state.items()}


def weights_bytes(model: nn.Module) -> bytes:
    """The model's weights as safetensors bytes (standard memory layout, no DDP prefix)."""
    state = strip_ddp_prefix(_unwrap(model).state_dict())
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})


def _bank_bytes(bank: TrainingBank) -> bytes:
    table = pa.table({"id": pa.array(bank.ids, pa.string()),
                      "latent": pa.FixedSizeListArray.from_arrays(pa.array(bank.latents.astype(np.float32).ravel()),
                                                                  bank.latents.shape[1]),
                      "stem_stats": pa.FixedSizeListArray.from_arrays(
                          pa.array(bank.stem_stats.astype(np.float32).ravel()), bank.stem_stats.shape[1])})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue().to_pybytes()


def _read_bank(data: bytes) -> TrainingBank:
    table = pq.read_table(pa.BufferReader(data))

    def matrix(name: str) -> np.ndarray:
        column = table.column(name).combine_chunks()
        return column.values.to_numpy().reshape(len(column), column.type.list_size)

    return TrainingBank(table.column("id").to_pylist(), matrix("latent"), matrix("stem_stats"))


def save_checkpoint(url: str, model: nn.Module, training: dict[str, Any] | None = None,
                    bank: TrainingBank | None = None, patch_bank: PatchBank | None = None,
                    colours: ColourMemory | None = None) -> None:
    """Write `model` (plain or DDP-wrapped), its config and, when given, its training bank, patch
    bank and colour memory to `url`."""
    config: AutoencoderConfig = _unwrap(model).config
    weights = weights_bytes(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "training": training or {},
    }
    # Weights (and bank) first: a config.json present means what it names is complete.
    storage.write_bytes(storage.join(url, WEIGHTS_FILE), weights)
    files = (("bank_sha256", BANK_FILE, None if bank is None else _bank_bytes(bank)),
             ("patch_bank_sha256", PATCH_BANK_FILE, None if patch_bank is None else patch_bank.to_bytes()),
             ("colour_memory_sha256", COLOUR_FILE, None if colours is None else colours.to_bytes()))
    for key, name, data in files:
        if data is not None:
            storage.write_bytes(storage.join(url, name), data)
            meta[key] = hashlib.sha256(data).hexdigest()
    storage.write_text(storage.join(url, CONFIG_FILE), json.dumps(meta, indent=2, sort_keys=True))


def scores_of(meta: dict[str, Any]) -> tuple[str, ...]:
    """The scores a checkpoint's model computes (from its config alone): the reconstruction
    scores; the neighbour scores when it has a training bank; the defect scores with a defect
    head; the patch scores with a patch bank; the colour scores with a colour memory; the fused
    score when its calibration says how to fuse."""
    calibration = (meta.get("training") or {}).get("calibration") or {}
    return computable(bool(meta.get("bank_sha256")), calibration.get("fused_from", ()),
                      has_head=bool((meta.get("model") or {}).get("defect_head")),
                      has_patch_bank=bool(meta.get("patch_bank_sha256")),
                      has_colours=bool(meta.get("colour_memory_sha256")))


def _digested_file(url: str, meta: dict[str, Any], key: str, name: str) -> bytes | None:
    """The bytes of the checkpoint's file `name`, checked against the digest `meta[key]`; None
    when the checkpoint names none."""
    if not meta.get(key):
        return None
    file_url = storage.join(url, name)
    if not storage.exists(file_url):
        raise CheckpointError(f"{url}: {name} not found, though {CONFIG_FILE} names one")
    data = storage.read_bytes(file_url)
    if hashlib.sha256(data).hexdigest() != meta[key]:
        raise CheckpointError(f"{file_url} does not match the digest in {CONFIG_FILE}: it was changed or truncated")
    return data


def _load_part(url: str, meta: dict[str, Any], key: str, name: str, parse: Callable[[bytes], Any], what: str,
               errors: tuple[type[Exception], ...]) -> Any:
    """The checkpoint's file `name` parsed by `parse`, checked against its digest `meta[key]`; None
    when the checkpoint has none; CheckpointError naming `what` when it does not parse."""
    data = _digested_file(url, meta, key, name)
    if data is None:
        return None
    try:
        return parse(data)
    except errors as e:
        raise CheckpointError(f"{storage.join(url, name)} is not a readable {what}: {e}") from e


def load_parts(url: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The training bank, patch bank and colour memory a checkpoint names (None for each it does not):
    the `Checkpoint` fields of those names."""
    return {"bank": _load_part(url, meta, "bank_sha256", BANK_FILE, _read_bank, "training bank",
                               (pa.ArrowInvalid, KeyError, ValueError)),
            "patch_bank": _load_part(url, meta, "patch_bank_sha256", PATCH_BANK_FILE, PatchBank.from_bytes,
                                     "patch bank", (SafetensorError, KeyError, ValueError)),
            "colours": _load_part(url, meta, "colour_memory_sha256", COLOUR_FILE, ColourMemory.from_bytes,
                                  "colour memory", (SafetensorError, KeyError, ValueError))}


def read_checkpoint_meta(url: str) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory, validated but without loading weights."""
    config_url = storage.join(url, CONFIG_FILE)
    if not storage.exists(config_url):
        raise CheckpointError(f"{url} is not a checkpoint: {CONFIG_FILE} not found")
    try:
        meta = json.loads(storage.read_text(config_url))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_url} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{config_url} is not a {FORMAT} checkpoint config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{url}: checkpoint format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    try:
        AutoencoderConfig.from_dict(meta.get("model") or {})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{url}: bad model config: {e}") from e
    return meta


def load_checkpoint(url: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint describes, load its weights, and put it in eval mode."""
    meta = read_checkpoint_meta(url)
    config = AutoencoderConfig.from_dict(meta["model"])
    weights_url = storage.join(url, WEIGHTS_FILE)
    if not storage.exists(weights_url):
        raise CheckpointError(f"{url}: {WEIGHTS_FILE} not found")
    data = storage.read_bytes(weights_url)
    digest = hashlib.sha256(data).hexdigest()
    if meta.get("weights_sha256") and digest != meta["weights_sha256"]:
        raise CheckpointError(f"{weights_url} does not match the digest in {CONFIG_FILE}: the weights were changed or truncated")
    try:
        state = strip_ddp_prefix(load_safetensors(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_url} is not a readable safetensors file: {e}") from e

    model = build_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                   for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[:3]})")
        raise CheckpointError(f"{url}: weights do not fit the {config.arch} model its config describes: " + "; ".join(details))
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(model=model, config=config, training=meta.get("training") or {}, url=url, weights_sha256=digest,
                      **load_parts(url, meta))
