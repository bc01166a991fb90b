"""Values that cross the vector store's API: what callers pass in and what they get back.

Re-exported by `service.store`; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True, slots=True, eq=False)
class NewItem:
    """One item to add: the sha256 of the input's bytes and its embedding (shape ``(dim,)``).

    The vector must already be L2-normalised for the default ``ip`` metric (score = cosine).
    ``eq=False`` because numpy arrays do not compare to a single bool.
    """

    sha256: str
    vector: np.ndarray
    name: str | None = None
    label: str | None = None
    source: str | None = None


class Added(NamedTuple):
    """Result of adding one item: its id and whether this call created it (False: sha256 was present)."""

    id: int
    created: bool


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result.

    ``score`` is the inner product (= cosine for unit vectors, higher is closer) for metric ``ip``, and the
    squared L2 distance (lower is closer) for metric ``l2``.
    """

    id: int
    score: float
    sha256: str
    name: str | None
    label: str | None


@dataclass(frozen=True, slots=True, eq=False)
class Item:
    """One stored row, vector included (float32, shape ``(dim,)``)."""

    id: int
    sha256: str
    name: str | None
    label: str | None
    source: str | None
    added_at: str  # ISO 8601, UTC
    model_id: str
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """What SQLite says about a collection; reading it never loads the FAISS index."""

    name: str
    path: Path
    model_id: str
    dim: int
    index_kind: str  # as given at creation ("flat", "hnsw", "ivf" or a FAISS factory string)
    factory: str  # the FAISS factory string it resolved to (wrapped in IDMap2)
    metric: str  # "ip" or "l2"
    count: int


@dataclass(frozen=True, slots=True)
class IndexStatus:
    """State of a collection's in-memory FAISS index, for readiness checks and metrics."""

    ntotal: int  # vectors in the FAISS index, tombstoned ones included
    tombstoned: int  # deleted items still in an index that cannot remove (HNSW); excluded from results
    exact_fallback: bool  # True while an untrained kind (IVF) is served by an exact flat index
    last_item_id: int  # SQLite position the index reflects: highest item id applied ...
    last_delete_seq: int  # ... and highest deletion sequence applied
    caught_up: bool  # False when SQLite holds rows or deletions the index has not applied yet


@dataclass(frozen=True, slots=True)
class CatchUp:
    """What one `Collection.catch_up()` applied."""

    added: int
    removed: int
    rebuilt: bool  # True when the index was rebuilt from SQLite (e.g. IVF trained for the first time)
