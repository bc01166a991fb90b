"""Retrieval metrics: plain numpy over score (or distance) matrices, shared by the model and the baselines.

Conventions follow FAISS: ``xq`` queries, ``xb`` the indexed items, ``yq`` / ``yb`` their integer labels.
An indexed item is *relevant* to a query when it has the query's label. Every metric is computed from one
thing, the rank of each relevant item in the query's full ranking of the index:

* ``P@1``       -- the top-ranked item is relevant (equals 1-NN accuracy);
* ``macro_P@1`` -- P@1 averaged per query class first, then over classes (small families count as much
  as glibc);
* ``P@10``      -- relevant items among the first 10, divided by 10;
* ``mAP``       -- average precision over the FULL ranking of the index (not truncated at k);
* ``MRR@10``    -- 1 / rank of the first relevant item, 0 when it is not in the first 10.

Ties are broken pessimistically: an irrelevant item with the same score as a relevant one ranks ahead of
it. Cosine scores of a CNN almost never tie, but integer distances (TLSH, ssdeep) tie all the time, and a
tie must never flatter a method; this rule also makes the result independent of the index order.

Queries without any relevant item in the index (a class absent from the index) have no defined AP; they
are left out of every metric and counted in ``queries_without_relevant``.

Scores are compared at float32 precision (exact for cosine scores and for integer distances below 2**24).

Speed: each chunk of queries is ranked by ONE row-wise integer sort (numpy's SIMD sort) of keys that carry
the relevance bit; no Python loop runs per query, and the metrics are read off the sorted bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Rows of the score matrix handled at once: 256 x 60,000 int64 keys are ~120 MB.
CHUNK = 256


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D")
    return y.astype(np.int64, copy=False)


def _sortable(neg: np.ndarray) -> np.ndarray:
    """float32 -> int64 with the same order (IEEE-754 bit trick); -0.0 and +0.0 map to the same key."""
    bits = (neg + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
    return (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)


def _sorted_relevance(
    S: np.ndarray, yq: np.ndarray, yb: np.ndarray, self_idx: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's full ranking reduced to its relevance bits, best first, plus the relevant counts.

    One integer sort per row: the key is the order-preserving integer of ``-score`` shifted left one bit,
    with the relevance bit below it, so among equal scores the irrelevant items (bit 0) come first. That
    is the pessimistic tie rule at the price of a single sort, no per-query Python loop. The query
    itself, in leave-one-out, gets the largest even key: last, irrelevant, and never counted.
    """
    if not np.isfinite(S).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    rel = yb[None, :] == yq[:, None]
    if self_idx is not None:
        rel[np.arange(len(yq)), self_idx] = False
    keys = (_sortable(-S.astype(np.float32, copy=False)) << 1) | rel
    if self_idx is not None:
        keys[np.arange(len(yq)), self_idx] = np.iinfo(np.int64).max - 1
    keys.sort(axis=1)
    return (keys & 1).astype(bool), rel.sum(axis=1)


def rank_metrics_from_scores(
    S: np.ndarray,
    yq: np.ndarray,
    yb: np.ndarray,
    *,
    exclude_self: bool = False,
    k: int = 10,
    higher_is_better: bool = True,
    chunk: int = CHUNK,
) -> dict[str, Any]:
    """Retrieval metrics from a full ``(len(yq), len(yb))`` score matrix (or distances, see below).

    ``higher_is_better=False`` reads ``S`` as distances (TLSH, ssdeep's ``100 - score``), so baselines go
    through exactly the same code. ``exclude_self`` is leave-one-out: the query set is the index and row
    ``i``'s own column is ignored.
    """
    S = np.asarray(S)
    yq, yb = _as_labels(yq, "yq"), _as_labels(yb, "yb")
    if S.shape != (len(yq), len(yb)):
        raise ValueError(f"score matrix is {S.shape}, labels say {(len(yq), len(yb))}")
    if exclude_self and len(yq) != len(yb):
        raise ValueError("exclude_self needs the query set to be the index (same length)")
    acc = _Accumulator(k)
    for start in range(0, len(yq), chunk):
        rows = slice(start, min(start + chunk, len(yq)))
        block = S[rows] if higher_is_better else -np.asarray(S[rows], dtype=np.float32)
        self_idx = np.arange(rows.start, rows.stop) if exclude_self else None
        acc.add(*_sorted_relevance(block, yq[rows], yb, self_idx), yq[rows])
    return acc.result(n_index=len(yb))


def rank_metrics_from_distances(D: np.ndarray, yq: np.ndarray, yb: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """:func:`rank_metrics_from_scores` for a distance matrix (smaller is more similar)."""
    return rank_metrics_from_scores(D, yq, yb, higher_is_better=False, **kwargs)


def retrieval_metrics(
    xq: np.ndarray,
    yq: np.ndarray,
    xb: np.ndarray,
    yb: np.ndarray,
    *,
    exclude_self: bool = False,
    k: int = 10,
    chunk: int = CHUNK,
) -> dict[str, Any]:
    """Exact cosine retrieval metrics of unit-vector embeddings ``xq`` against ``xb``.

    Scores are computed chunk by chunk (a float32 matmul, exactly what FAISS ``IndexFlatIP`` does) and
    never held in full: 10,000 x 60,000 would be 2.4 GB.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    yq, yb = _as_labels(yq, "yq"), _as_labels(yb, "yb")
    if xq.ndim != 2 or xb.ndim != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError(f"embeddings must be 2-D with equal width, got {xq.shape} and {xb.shape}")
    if len(xq) != len(yq) or len(xb) != len(yb):
        raise ValueError("embeddings and labels differ in length")
    if exclude_self and len(xq) != len(xb):
        raise ValueError("exclude_self needs the query set to be the index (same length)")
    acc = _Accumulator(k)
    xbt = xb.T.copy()
    for start in range(0, len(yq), chunk):
        rows = slice(start, min(start + chunk, len(yq)))
        self_idx = np.arange(rows.start, rows.stop) if exclude_self else None
        acc.add(*_sorted_relevance(xq[rows] @ xbt, yq[rows], yb, self_idx), yq[rows])
    return acc.result(n_index=len(yb))


class _Accumulator:
    """Per-query values gathered chunk by chunk, averaged once at the end."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.p1: list[np.ndarray] = []
        self.pk: list[np.ndarray] = []
        self.ap: list[np.ndarray] = []
        self.rr: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.skipped = 0

    def add(self, bits: np.ndarray, n_rel: np.ndarray, yq: np.ndarray) -> None:
        has = n_rel > 0
        self.skipped += int((~has).sum())
        bits, n_rel = bits[has], n_rel[has]
        if len(n_rel) == 0:
            return
        k = min(self.k, bits.shape[1])
        self.p1.append(bits[:, 0])
        self.pk.append(bits[:, :k].sum(axis=1) / self.k)
        # AP = mean over relevant positions c of (relevant items up to c) / (c + 1). np.nonzero walks row
        # by row, columns ascending, so the running count is the item's position in its row's list.
        r, c = np.nonzero(bits)
        starts = np.concatenate(([0], np.cumsum(n_rel)[:-1]))
        hits = np.arange(len(r)) - starts[r] + 1
        self.ap.append(np.bincount(r, weights=hits / (c + 1.0), minlength=len(n_rel)) / n_rel)
        first = bits.argmax(axis=1) + 1  # every row here has at least one relevant item
        self.rr.append(np.where(first <= self.k, 1.0 / first, 0.0))
        self.labels.append(yq[has])

    def result(self, *, n_index: int) -> dict[str, Any]:
        base: dict[str, Any] = {"queries": 0, "index": n_index, "queries_without_relevant": self.skipped}
        if not self.p1:
            return base | {"P@1": None, "macro_P@1": None, f"P@{self.k}": None, "mAP": None, f"MRR@{self.k}": None}
        p1 = np.concatenate(self.p1).astype(np.float64)
        labels = np.concatenate(self.labels)
        classes = np.unique(labels)
        macro = float(np.mean([p1[labels == c].mean() for c in classes]))
        return base | {
            "queries": len(p1),
            "P@1": float(p1.mean()),
            "macro_P@1": macro,
            f"P@{self.k}": float(np.concatenate(self.pk).mean()),
            "mAP": float(np.concatenate(self.ap).mean()),
            f"MRR@{self.k}": float(np.concatenate(self.rr).mean()),
        }
