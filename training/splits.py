"""Train/test splits of the evaluation protocol (docs: DESIGN "Evaluation protocol").

Both rules are pure functions of content, never of file order, random state or machine: the same file
is a query on every machine and in every run, and a model trained on the "seen" train side has never
seen a single query.

* ``seen`` -- a file is a test file (a query) when ``int(sha256[:8], 16) % 10 < 3``, else a train file
  (the index). About 30 % of every family are queries.
* ``unseen`` -- a family is held out of training when ``int(sha256(family)[:8], 16) % 4 == 0``. Train is
  every file of the other families; test is every file of the held-out families, and retrieval on them
  is leave-one-out among themselves (each test file queries the other test files), since the model has
  seen none of them and the index must hold their family.
* ``none`` -- everything is train, test is empty.

IDX data (Fashion-MNIST) loaded with both parts (``idx:DIR``) uses its natural split for ``seen``:
index = the 60,000 training records, queries = the 10,000 test records, the published protocol whose
P@1 equals 1-NN accuracy. A single IDX part, or any other data, uses the sha256 rule.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from embedder.dataspec import LabelledData

SplitKind = Literal["seen", "unseen", "none"]
SPLIT_KINDS: tuple[str, ...] = ("seen", "unseen", "none")

_IDX_NAME = re.compile(r"^(train|t10k)-images-idx3-ubyte(?:\.gz)?#\d+$")


class SplitError(ValueError):
    """A split that would leave nothing to train on or nothing to query."""


def is_seen_test(sha256_hex: str) -> bool:
    """True when a file is a query (test) of the seen split: ``int(sha256[:8], 16) % 10 < 3``."""
    return int(sha256_hex[:8], 16) % 10 < 3


def is_unseen_family(family: str) -> bool:
    """True when a family is held out of training: ``int(sha256(family)[:8], 16) % 4 == 0``."""
    return int(hashlib.sha256(family.encode()).hexdigest()[:8], 16) % 4 == 0


@dataclass
class Split:
    """Index arrays into a :class:`LabelledData`; ``held_out`` names the unseen split's families."""

    train: np.ndarray
    test: np.ndarray
    kind: str
    held_out: list[str] = field(default_factory=list)


def idx_parts(names: list[str]) -> np.ndarray | None:
    """For IDX records, a boolean array "is a test (t10k) record"; None when not all names are IDX."""
    parts = []
    for name in names:
        m = _IDX_NAME.match(name.rsplit("/", 1)[-1])
        if m is None:
            return None
        parts.append(m.group(1) == "t10k")
    return np.array(parts, dtype=bool)


def _indices(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64)


def make_split(data: LabelledData, kind: SplitKind | str) -> Split:
    """Split ``data`` by the protocol's rule for ``kind``; raises :class:`SplitError` when one side of a
    seen/unseen split would be empty (the evaluation would be meaningless, not just noisy)."""
    n = len(data.keys)
    if kind == "none":
        return Split(np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64), "none")
    if kind == "seen":
        test_mask = idx_parts(data.names)
        natural = test_mask is not None and test_mask.any() and not test_mask.all()
        if not natural:
            test_mask = np.array([is_seen_test(k) for k in data.keys], dtype=bool)
        split = Split(_indices(~test_mask), _indices(test_mask), "seen")
        if len(split.train) == 0 or len(split.test) == 0:
            raise SplitError(
                f"seen split of {n} items gives {len(split.train)} train and {len(split.test)} test; "
                "it needs both (use more files or --split none)"
            )
        return split
    if kind == "unseen":
        present = np.unique(data.y)  # a subset keeps every label name, not every family
        held_idx = [int(i) for i in present if is_unseen_family(data.labels[i])]
        held = [data.labels[i] for i in held_idx]
        test_mask = np.isin(data.y, held_idx)
        split = Split(_indices(~test_mask), _indices(test_mask), "unseen", held)
        if len(split.test) < 2 or len(split.train) == 0:
            raise SplitError(
                f"unseen split of {len(present)} families holds out {len(held)} ({', '.join(held)}), "
                f"giving {len(split.train)} train and {len(split.test)} test items; "
                "it needs training items and at least two held-out items"
            )
        return split
    raise SplitError(f"unknown split {kind!r}; choose one of {', '.join(SPLIT_KINDS)}")
