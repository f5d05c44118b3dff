"""A worker's decoded split kept in memory after its first pass, when it fits a budget.

Every epoch of a streamed split starts a Ray Data pipeline that reads the Parquet shards and
decodes every image again, in tasks that share the machine's cores with the training step
(docs/BENCHMARKS.md, "Decoded splits kept in memory", measures what that costs). A split that
fits `--cache-mb` is decoded once; later epochs shuffle the kept rows in memory (a full
permutation per epoch, seeded, where the stream shuffles within a window). A split over the
budget streams every epoch as before, so memory stays bounded on corpora of any size.

Rows that failed to decode stay in the cache (their `ok` is False), so an epoch sees the same
rows, and every worker the same number of batches, whether it streams or reads the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

# The columns a decoded split carries (pipeline.datasets.decode_split): "key" orders the kept
# rows by id, so the epochs after a resume see what an uninterrupted run's would have.
COLUMNS = ("pixels", "ok", "key")


class DecodedCache:
    """Keeps a split's decoded batches as they stream by, until they pass `budget_bytes`.

    fill(batches) passes the batches through and keeps copies; seal(keep) ends the pass (keep
    False drops them, as when another worker's split did not fit); then `ready` says whether
    batches(...) can replace the stream.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.parts: list[dict[str, torch.Tensor]] = []
        self.nbytes = 0
        self.fits = budget_bytes > 0
        self.rows: dict[str, torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        return self.rows is not None

    def fill(self, batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            if self.fits:
                self.nbytes += sum(batch[c].nbytes for c in COLUMNS)
                if self.nbytes > self.budget_bytes:
                    self.fits, self.parts = False, []
                else:
                    self.parts.append({c: batch[c].detach().to("cpu", copy=True) for c in COLUMNS})
            yield batch

    def seal(self, keep: bool) -> None:
        """End the first pass: keep what was filled (if it all fit and `keep`), and fill no more."""
        if keep and self.fits:
            rows = {c: torch.cat([p[c] for p in self.parts]) for c in COLUMNS} if self.parts else {}
            self.parts = []  # at most two copies of the rows alive at once: the budget's worth, twice
            order = torch.argsort(rows["key"], stable=True) if rows else None
            self.rows = {c: rows.pop(c)[order] for c in COLUMNS} if rows else {}
        self.fits, self.parts = False, []

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The kept rows `batch_size` at a time: in a fresh random order drawn from `generator`, or
        in key order without one."""
        assert self.rows is not None, "seal() a filled cache first"
        if not self.rows:  # an empty split
            return
        n = len(self.rows["key"])
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            yield {c: self.rows[c][chosen] for c in COLUMNS}


def _on_device(batches: Iterator[dict[str, torch.Tensor]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        yield {c: v.to(device, non_blocking=True) for c, v in batch.items()}


class WorkerSplits:
    """One Ray Train worker's training and held-out splits: streamed from its Ray Data shards in
    its first epoch, and from memory afterwards when both fit `budget_bytes` together on every
    worker (so no worker reads its cache while another's split iterator waits for it)."""

    def __init__(self, train_shard, val_shard, budget_bytes: int, batch_size: int, seed: int, rank: int,
                 device: torch.device):
        self.shards = {"train": train_shard, "val": val_shard}
        self.budget_bytes, self.batch_size, self.seed, self.rank, self.device = (
            budget_bytes, batch_size, seed, rank, device)
        self.train = DecodedCache(budget_bytes)
        self.val: DecodedCache | None = None  # made at the first validation, with what training left of the budget

    @property
    def in_memory(self) -> bool:
        return self.train.ready

    def train_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.train.ready:
            order = torch.Generator().manual_seed(self.seed * 100_043 + epoch * 41 + self.rank)
            return _on_device(self.train.batches(self.batch_size, order), self.device)
        return self.train.fill(self.shards["train"].iter_torch_batches(
            batch_size=self.batch_size, local_shuffle_buffer_size=4 * self.batch_size,
            local_shuffle_seed=self.seed * 100_003 + epoch * 31 + self.rank, pin_memory=self.device.type == "cuda",
        ))

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.val is None:
            left = self.budget_bytes - self.train.nbytes if self.train.fits else 0
            self.val = DecodedCache(max(left, 0))
        if self.val.ready:
            return _on_device(self.val.batches(2 * self.batch_size), self.device)
        return self.val.fill(self.shards["val"].iter_torch_batches(
            batch_size=2 * self.batch_size, pin_memory=self.device.type == "cuda"))

    def end_first_pass(self, every_worker: Callable[[bool], bool]) -> None:
        """After both splits streamed once: keep them if they fit here and, by `every_worker` (a
        collective AND over the workers), everywhere."""
        assert self.val is not None, "stream the held-out split (val_batches) before ending the first pass"
        keep = every_worker(self.train.fits and self.val.fits)
        self.train.seal(keep)
        self.val.seal(keep)

    def load(self, epoch: int, every_worker: Callable[[bool], bool]) -> None:
        """A resumed run whose data was in memory: decode both splits before `epoch` trains, so it
        reads them in the order an uninterrupted run's epoch would have."""
        for _ in self.train_batches(epoch):
            pass
        for _ in self.val_batches():
            pass
        self.end_first_pass(every_worker)
