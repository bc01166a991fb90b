"""Batch samplers: uniform random batches and class-balanced batches.

Both yield lists of indices (use them as ``DataLoader(batch_sampler=...)`` or iterate directly over
in-memory tensors) and are deterministic functions of ``(seed, epoch)``: a run is reproducible, and
epochs still differ because the epoch number is part of the seed. Follow the ``DistributedSampler``
convention: call ``set_epoch(e)`` before each epoch, otherwise every epoch repeats the first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch.utils.data


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def random_batches(
    n: int, batch_size: int, seed: int, epoch: int = 0, *, drop_last: bool = False
) -> list[np.ndarray]:
    """A random permutation of ``range(n)`` cut into batches of ``batch_size``.

    The last batch is smaller when ``n`` is not a multiple of ``batch_size`` (or dropped with
    ``drop_last``); a leftover of a single item joins the previous batch instead, because BatchNorm in
    training mode cannot compute a variance from one sample and would fail on it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = _rng(seed, epoch).permutation(n).astype(np.int64)
    full = n // batch_size
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]
    rest = order[full * batch_size :]
    if len(rest) and not drop_last:
        if len(rest) == 1 and batches:
            batches[-1] = np.concatenate([batches[-1], rest])
        else:
            batches.append(rest)
    return batches


class RandomBatchSampler(torch.utils.data.Sampler[list[int]]):
    """:func:`random_batches` as a batch sampler with ``set_epoch``."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in random_batches(self.n, self.batch_size, self.seed, self.epoch, drop_last=self.drop_last):
            yield batch.tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if rest == 0 or self.drop_last or (rest == 1 and full > 0) else full + 1


class BalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches holding exactly ``k_per_class`` items of every class (Hajaj & Gillies).

    With a few large families and many small ones, random batches are dominated by the large ones: the
    batch statistics BatchNorm learns from, and the gradient, barely see the small families. Here every
    batch has the same class mix, so batch size = ``k_per_class * n_classes``.

    Each class is drawn from its own shuffled stream; a class with fewer items than the epoch needs is
    re-drawn (its stream cycles, reshuffled each time round), so its items repeat, and a class smaller
    than ``k_per_class`` repeats items within a batch. One epoch is ``ceil(largest class / k)`` batches,
    every item of the largest class once, unless ``num_batches`` says otherwise. Items within a batch are
    shuffled so no position is tied to a class.
    """

    def __init__(
        self, labels: np.ndarray, k_per_class: int = 1, seed: int = 0, num_batches: int | None = None
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("labels must be a non-empty 1-D array")
        if k_per_class < 1:
            raise ValueError(f"k_per_class must be at least 1, not {k_per_class}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be at least 1, not {num_batches}")
        self.classes = np.unique(labels)
        self.members = [np.flatnonzero(labels == c).astype(np.int64) for c in self.classes]
        self.k = k_per_class
        self.seed = seed
        self.epoch = 0
        largest = max(len(m) for m in self.members)
        self.num_batches = num_batches if num_batches is not None else math.ceil(largest / k_per_class)

    @property
    def batch_size(self) -> int:
        return self.k * len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream(self, members: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        rounds = math.ceil(need / len(members))
        return np.concatenate([rng.permutation(members) for _ in range(rounds)])[:need]

    def __iter__(self) -> Iterator[list[int]]:
        rng = _rng(self.seed, self.epoch)
        need = self.num_batches * self.k
        # (classes, batches, k): row c holds class c's draws for the whole epoch.
        draws = np.stack([self._stream(m, need, rng) for m in self.members]).reshape(
            len(self.members), self.num_batches, self.k
        )
        for b in range(self.num_batches):
            yield rng.permutation(draws[:, b, :].ravel()).tolist()

    def __len__(self) -> int:
        return self.num_batches
