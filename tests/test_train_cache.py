"""The decoded-split cache of a training worker: what it keeps, when it gives up, the order it reads in."""

import numpy as np
import torch

from pipeline.datasets import decode_split
from pipeline.formats.columns import Columns
from pipeline.images import encode_image
from pipeline.sampling import split_of
from pipeline.train.cache import DecodedCache, WorkerSplits


def _batches(n: int, batch_size: int, side: int = 4, failed: tuple[int, ...] = ()) -> list[dict[str, torch.Tensor]]:
    """Rows 0..n-1 as a stream would bring them: pixels filled with the row's number, key = a
    shuffled label, so key order and stream order differ."""
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(n)).long() * 7 - 50
    out = []
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        pixels = rows.view(-1, 1, 1, 1).expand(-1, side, side, 3).to(torch.uint8).clone()
        ok = torch.tensor([int(r) not in failed for r in rows])
        out.append({"pixels": pixels, "ok": ok, "key": keys[rows]})
    return out


def _rows(batches) -> list[int]:
    return [int(p[0, 0, 0]) for b in batches for p in b["pixels"]]


def test_the_stream_passes_through_untouched_and_every_epoch_then_reads_each_kept_row_once():
    stream = _batches(50, 8, failed=(3, 41))
    cache = DecodedCache(budget_bytes=1 << 20)
    passed = list(cache.fill(iter(stream)))
    assert all(a is b for a, b in zip(passed, stream)) and len(passed) == len(stream)
    assert not cache.ready
    cache.seal(keep=True)
    assert cache.ready and cache.parts == []
    orders = []
    for seed in (1, 2, 1):
        epoch = list(cache.batches(8, torch.Generator().manual_seed(seed)))
        assert [len(b["key"]) for b in epoch] == [8] * 6 + [2]  # as many batches as the stream had
        assert sorted(_rows(epoch)) == list(range(50))  # each row once, the failed ones too
        failed = {int(p[0, 0, 0]) for b in epoch for p, ok in zip(b["pixels"], b["ok"]) if not ok}
        assert failed == {3, 41}  # each row keeps its own ok flag
        for b in epoch:  # and its own key
            assert all(stream[r // 8]["key"][r % 8] == k for r, k in zip(_rows([b]), b["key"]))
        orders.append(_rows(epoch))
    assert orders[0] == orders[2] and orders[0] != orders[1]  # a seed's order, and a fresh one per seed
    # Without a generator: key order, whatever order the stream came in.
    by_key = list(cache.batches(16))
    keys = torch.cat([b["key"] for b in by_key])
    assert torch.equal(keys, torch.sort(keys).values)


def test_a_split_over_the_budget_is_not_kept_and_nothing_is_held_from_then_on():
    stream = _batches(40, 8, side=8)  # 8 * 8 * 3 + 1 + 8 bytes a row: 201
    cache = DecodedCache(budget_bytes=201 * 20)
    assert len(list(cache.fill(iter(stream)))) == len(stream)  # the stream goes on past the budget
    assert not cache.fits and cache.parts == []
    cache.seal(keep=True)
    assert not cache.ready
    assert len(list(cache.fill(iter(stream)))) == len(stream) and cache.parts == []


def test_a_split_that_fits_is_dropped_when_another_worker_says_so_and_a_zero_budget_keeps_nothing():
    cache = DecodedCache(budget_bytes=1 << 20)
    list(cache.fill(iter(_batches(10, 4))))
    cache.seal(keep=False)
    assert not cache.ready and cache.parts == []
    off = DecodedCache(budget_bytes=0)
    list(off.fill(iter(_batches(10, 4))))
    off.seal(keep=True)
    assert not off.ready


def test_an_empty_split_is_kept_as_empty():
    cache = DecodedCache(budget_bytes=1 << 20)
    assert list(cache.fill(iter([]))) == []
    cache.seal(keep=True)
    assert cache.ready and list(cache.batches(4, torch.Generator().manual_seed(0))) == []


class _Shard:
    """A Ray Train dataset shard's one method that WorkerSplits uses, over fixed batches; counts passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def iter_torch_batches(self, **_):
        self.passes += 1
        return iter(self.batches)


def test_worker_splits_stream_once_then_read_memory_and_a_resumed_worker_reads_what_an_uninterrupted_one_did():
    def splits(stream_order=lambda batches: batches):
        shards = _Shard(stream_order(_batches(30, 8))), _Shard(_batches(6, 16))
        return WorkerSplits(*shards, budget_bytes=1 << 20, batch_size=8, seed=3, rank=0,
                            device=torch.device("cpu")), shards

    data, (train, val) = splits()
    list(data.train_batches(0))
    list(data.val_batches())
    data.end_first_pass(lambda fits: fits)
    assert data.in_memory
    epochs = [_rows(data.train_batches(e)) for e in (1, 2)]
    assert sorted(_rows(data.val_batches())) == list(range(6))
    assert (train.passes, val.passes) == (1, 1)  # no stream read after the first pass
    # A run resumed at epoch 2 decodes both splits first (its stream shuffled otherwise), then
    # reads them in the order the uninterrupted run did.
    resumed, (train2, val2) = splits(lambda batches: batches[::-1])
    resumed.load(2, lambda fits: fits)
    assert resumed.in_memory and (train2.passes, val2.passes) == (1, 1)
    assert _rows(resumed.train_batches(2)) == epochs[1]


def test_worker_splits_share_one_budget_and_stream_every_epoch_when_another_worker_cannot_keep_its_own():
    row = 4 * 4 * 3 + 1 + 8
    data = WorkerSplits(_Shard(_batches(30, 8)), _Shard(_batches(6, 16)), budget_bytes=row * 33, batch_size=8,
                        seed=0, rank=0, device=torch.device("cpu"))
    list(data.train_batches(0))
    list(data.val_batches())  # 30 + 6 rows over a budget of 33: the held-out split gets 3 rows' worth
    assert data.train.fits and not data.val.fits
    asked = []
    data.end_first_pass(lambda fits: asked.append(fits) or fits)
    assert asked == [False] and not data.in_memory
    other = WorkerSplits(_Shard(_batches(30, 8)), _Shard(_batches(6, 16)), budget_bytes=1 << 20, batch_size=8,
                         seed=0, rank=1, device=torch.device("cpu"))
    list(other.train_batches(0))
    list(other.val_batches())
    other.end_first_pass(lambda fits: False)  # fits here, not on some other worker
    assert not other.in_memory
    assert sorted(_rows(other.train_batches(1))) == list(range(30)) and other.shards["train"].passes == 2


def test_decoded_splits_carry_a_key_per_row_that_depends_on_the_id_alone():
    ids = [f"img-{i}" for i in range(40)]
    images = [encode_image(np.full((8, 8, 3), i, np.uint8)) for i in range(40)]
    columns = Columns(id="id", image="image")
    kw = dict(columns=columns, image_size=8, channels=3, resize="stretch", val_fraction=0.25)
    train = decode_split({"id": np.array(ids, object), "image": np.array(images, object)}, validation=False, **kw)
    reversed_order = decode_split({"id": np.array(ids[::-1], object), "image": np.array(images[::-1], object)},
                                  validation=False, **kw)
    assert train["key"].dtype == np.int64 and len(train["key"]) == len(train["pixels"]) == (~split_of(ids, 0.25)).sum()
    assert len(set(train["key"].tolist())) == len(train["key"])
    assert sorted(train["key"].tolist()) == sorted(reversed_order["key"].tolist())
    assert np.array_equal(train["pixels"][np.argsort(train["key"])],
                          reversed_order["pixels"][np.argsort(reversed_order["key"])])
