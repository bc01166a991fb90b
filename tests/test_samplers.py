"""Batch samplers: exact class balance, determinism per seed, fresh batches per epoch."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from training.samplers import BalancedBatchSampler, RandomBatchSampler, random_batches

# A long-tailed label set like the Debian families: one class of 50, others down to 1 item.
LABELS = np.repeat(np.arange(6), [50, 20, 9, 4, 2, 1])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_every_batch_has_exactly_k_of_every_class(k: int) -> None:
    sampler = BalancedBatchSampler(LABELS, k_per_class=k, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(50 / k)
    for batch in batches:
        assert len(batch) == sampler.batch_size == 6 * k
        assert Counter(LABELS[batch].tolist()) == {c: k for c in range(6)}
        assert all(isinstance(i, int) for i in batch)


def test_largest_class_is_covered_once_per_epoch_and_small_ones_cycle() -> None:
    sampler = BalancedBatchSampler(LABELS, k_per_class=5, seed=0)
    drawn = np.concatenate([np.array(b) for b in sampler])
    largest = drawn[LABELS[drawn] == 0]
    assert sorted(largest.tolist()) == list(range(50))  # each item of the largest class exactly once
    medium = Counter(drawn[LABELS[drawn] == 1].tolist())
    assert set(medium) == set(np.flatnonzero(LABELS == 1).tolist())
    assert set(medium.values()) == {2, 3}  # 50 draws over 20 items, reshuffled each time round


def test_balanced_is_deterministic_per_seed_and_epoch() -> None:
    a = BalancedBatchSampler(LABELS, k_per_class=2, seed=7)
    b = BalancedBatchSampler(LABELS, k_per_class=2, seed=7)
    assert list(a) == list(b) == list(a)  # no epoch change, same batches
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    other_seed = BalancedBatchSampler(LABELS, k_per_class=2, seed=8)
    assert list(other_seed) != first


def test_num_batches_and_validation() -> None:
    sampler = BalancedBatchSampler(LABELS, k_per_class=2, num_batches=3)
    assert len(list(sampler)) == len(sampler) == 3
    with pytest.raises(ValueError, match="k_per_class"):
        BalancedBatchSampler(LABELS, k_per_class=0)
    with pytest.raises(ValueError, match="non-empty"):
        BalancedBatchSampler(np.array([], dtype=np.int64))


def test_balanced_sampler_drives_a_dataloader() -> None:
    ds = torch.utils.data.TensorDataset(torch.from_numpy(LABELS))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BalancedBatchSampler(LABELS, k_per_class=2))
    for (y,) in loader:
        assert torch.bincount(y, minlength=6).tolist() == [2] * 6


def test_random_batches_cover_everything_deterministically() -> None:
    batches = random_batches(103, 10, seed=4, epoch=0)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    again = random_batches(103, 10, seed=4, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(random_batches(103, 10, 4, 1)))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(random_batches(103, 10, 5, 0)))


def test_random_batches_never_leave_a_single_item() -> None:
    # A batch of one would make BatchNorm fail in training mode.
    assert [len(b) for b in random_batches(21, 10, seed=0)] == [10, 11]
    assert [len(b) for b in random_batches(21, 10, seed=0, drop_last=True)] == [10, 10]
    assert [len(b) for b in random_batches(1, 10, seed=0)] == [1]


def test_random_batch_sampler_len_matches_iteration() -> None:
    for n, bs, drop in [(103, 10, False), (103, 10, True), (21, 10, False), (20, 10, False), (5, 10, False)]:
        sampler = RandomBatchSampler(n, bs, seed=2, drop_last=drop)
        assert len(sampler) == len(list(sampler))
    sampler = RandomBatchSampler(50, 8, seed=2)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
