"""Choosing rows by a keyed hash of their id: the same rows whatever the file layout, worker
count or reading order, on every run.

- `split_of`: the training job's held-out validation split.
- `hash_sample`: a uniform sample of a given share (the report's metrics above its exact size,
  the training bank of the neighbour scores above its cap).
- `sample_keys`: 64-bit draw keys; the N smallest are a seeded sample of exactly N rows (decode).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

REPORT_SAMPLE_KEY = b"squeeze-report"
BANK_SAMPLE_KEY = b"squeeze-bank"


def id_hashes(ids: Iterable[str], key: bytes = b"", digest_size: int = 4) -> np.ndarray:
    """(N,) unsigned ints: blake2b of each id's UTF-8 bytes, keyed, `digest_size` bytes, big-endian."""
    dtype = np.uint32 if digest_size <= 4 else np.uint64
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode("utf-8"), digest_size=digest_size,
                                                    key=key).digest(), "big") for i in ids], dtype=dtype)


def _below(ids: Iterable[str], fraction: float, key: bytes) -> np.ndarray:
    return id_hashes(ids, key) < np.uint64(int(fraction * 2**32))


def split_of(ids: Iterable[str], val_fraction: float) -> np.ndarray:
    """(N,) bool, True for held-out validation rows: a stable hash of the id, so any run,
    worker count or shard layout puts the same image on the same side."""
    ids = list(ids)
    if val_fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    return _below(ids, val_fraction, b"")


def hash_sample(ids: Iterable[str], fraction: float, key: bytes = REPORT_SAMPLE_KEY) -> np.ndarray:
    """(N,) bool: a uniform, layout-independent sample of about `fraction` of the rows."""
    ids = list(ids)
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    return _below(ids, fraction, key)


def sample_keys(ids: Iterable[str], seed: int) -> np.ndarray:
    """(N,) uint64 draw keys for `seed`: the rows with the N smallest keys are the seed's sample of N."""
    return id_hashes(ids, key=str(seed).encode("utf-8"), digest_size=8)
