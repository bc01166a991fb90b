"""Retrieval metrics: plain numpy over score (or distance) matrices, shared by the model and the baselines.

Conventions follow FAISS: ``xq`` queries, ``xb`` the indexed items, ``yq`` / ``yb`` their integer labels.
An indexed item is *relevant* to a query when it has the query's label. Every metric is read off one
thing, the rank of each relevant item in the query's full ranking of the index:

* ``P@1``       -- the top-ranked item is relevant (equals 1-NN accuracy);
* ``macro_P@1`` -- P@1 averaged per query class first, then over classes (a small family counts as
  much as glibc);
* ``P@10``      -- relevant items among the first 10, divided by 10;
* ``mAP``       -- average precision over the FULL ranking of the index (not truncated at k);
* ``MRR@10``    -- 1 / rank of the first relevant item, 0 when it is not in the first 10.

Ties are broken pessimistically: an irrelevant item with the same score as a relevant one ranks ahead of
it. Cosine scores of a CNN rarely tie, but integer distances (TLSH, ssdeep) tie all the time, and a tie
must never flatter a method; the rule also makes the result independent of the order of the index.
Scores are compared at float32 precision (exact for cosine scores and for integer distances < 2**24).

Queries without any relevant item in the index (a class absent from the index) have no defined AP; they
are left out of every metric and counted in ``queries_without_relevant``.

Speed: per query, the relevant and the irrelevant scores are sorted separately (float32 sorts, together
exactly one sort's worth of elements) and merged with one ``searchsorted``. Sorting dominates, numpy
releases the GIL while it sorts, so chunks of queries run on a small thread pool; 10,000 queries against
60,000 items take seconds, and the full score matrix (2.4 GB there) is never held at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Queries scored per matmul: 256 x 60,000 float32 scores are ~60 MB.
CHUNK = 256


def _labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D")
    return y.astype(np.int64, copy=False)


def relevant_ranks(neg: np.ndarray, rel: np.ndarray, usable: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks, ascending, of one query's relevant items; ``neg`` is the NEGATED score row.

    A relevant item's rank is its position among the relevant items plus the number of irrelevant items
    whose score is at least as high (pessimistic ties). ``usable`` masks out items that are neither
    (the query itself in leave-one-out).
    """
    irr = ~rel if usable is None else usable & ~rel
    r = np.sort(neg[rel])
    o = np.sort(neg[irr])
    return np.searchsorted(o, r, side="right") + np.arange(1, len(r) + 1)


class _PerQuery:
    """Per-query values, filled in place by the worker threads (disjoint rows, so no locking)."""

    def __init__(self, n: int) -> None:
        self.n_rel = np.zeros(n, dtype=np.int64)
        self.first = np.zeros(n, dtype=np.int64)  # rank of the first relevant item
        self.hits_k = np.zeros(n, dtype=np.int64)  # relevant items within the first k
        self.ap = np.zeros(n, dtype=np.float64)

    def fill(self, i: int, ranks: np.ndarray, k: int) -> None:
        self.n_rel[i] = len(ranks)
        if len(ranks):
            self.first[i] = ranks[0]
            self.hits_k[i] = int(np.searchsorted(ranks, k, side="right"))
            self.ap[i] = float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def _run_chunks(n: int, chunk: int, work: Callable[[int, int], None], threads: int | None) -> None:
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    threads = threads or min(4, os.cpu_count() or 1)
    if threads <= 1 or len(spans) <= 1:
        for lo, hi in spans:
            work(lo, hi)
        return
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work, lo, hi) for lo, hi in spans]:
            f.result()  # re-raise a worker's exception here


def _score_rows(
    scores: Callable[[int, int], np.ndarray],
    yq: np.ndarray,
    yb: np.ndarray,
    *,
    exclude_self: bool,
    k: int,
    chunk: int,
    threads: int | None,
) -> dict[str, Any]:
    if k < 1:
        raise ValueError("k must be at least 1")
    if exclude_self and len(yq) != len(yb):
        raise ValueError("exclude_self needs the query set to be the index (same length and order)")
    out = _PerQuery(len(yq))

    def work(lo: int, hi: int) -> None:
        neg = -np.asarray(scores(lo, hi), dtype=np.float32)
        if not np.isfinite(neg).all():
            raise ValueError("scores must be finite (no NaN or inf)")
        usable = np.ones(len(yb), dtype=bool) if exclude_self else None
        for row, i in enumerate(range(lo, hi)):
            rel = yb == yq[i]
            if usable is not None:
                usable[i] = rel[i] = False
            out.fill(i, relevant_ranks(neg[row], rel, usable), k)
            if usable is not None:
                usable[i] = True

    _run_chunks(len(yq), chunk, work, threads)
    return _summarise(out, yq, n_index=len(yb), k=k)


def _summarise(out: _PerQuery, yq: np.ndarray, *, n_index: int, k: int) -> dict[str, Any]:
    has = out.n_rel > 0
    base: dict[str, Any] = {"queries": int(has.sum()), "index": n_index}
    base["queries_without_relevant"] = int((~has).sum())
    if not has.any():
        return base | {"P@1": None, "macro_P@1": None, f"P@{k}": None, "mAP": None, f"MRR@{k}": None}
    first = out.first[has]
    p1 = (first == 1).astype(np.float64)
    labels = yq[has]
    macro = float(np.mean([p1[labels == c].mean() for c in np.unique(labels)]))
    return base | {
        "P@1": float(p1.mean()),
        "macro_P@1": macro,
        f"P@{k}": float((out.hits_k[has] / k).mean()),
        "mAP": float(out.ap[has].mean()),
        f"MRR@{k}": float(np.where(first <= k, 1.0 / first, 0.0).mean()),
    }


def rank_metrics_from_scores(
    S: np.ndarray,
    yq: np.ndarray,
    yb: np.ndarray,
    *,
    exclude_self: bool = False,
    k: int = 10,
    higher_is_better: bool = True,
    chunk: int = CHUNK,
    threads: int | None = None,
) -> dict[str, Any]:
    """Retrieval metrics from a full ``(len(yq), len(yb))`` score matrix.

    ``higher_is_better=False`` reads ``S`` as distances (TLSH ``diff``, ssdeep's ``100 - score``), so the
    baselines go through exactly the same ranking code as the model. ``exclude_self`` is leave-one-out:
    the query set is the index, and row ``i``'s own column ``i`` is ignored.
    """
    S = np.asarray(S)
    yq, yb = _labels(yq, "yq"), _labels(yb, "yb")
    if S.shape != (len(yq), len(yb)):
        raise ValueError(f"score matrix is {S.shape}, the labels say {(len(yq), len(yb))}")
    sign = 1.0 if higher_is_better else -1.0
    return _score_rows(
        lambda lo, hi: sign * np.asarray(S[lo:hi], dtype=np.float32),
        yq,
        yb,
        exclude_self=exclude_self,
        k=k,
        chunk=chunk,
        threads=threads,
    )


def rank_metrics_from_distances(
    D: np.ndarray, yq: np.ndarray, yb: np.ndarray, **kwargs: Any
) -> dict[str, Any]:
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
    threads: int | None = None,
) -> dict[str, Any]:
    """Exact cosine retrieval metrics of unit-vector embeddings ``xq`` (queries) against ``xb`` (index).

    Scores are inner products computed chunk by chunk in float32, exactly what FAISS ``IndexFlatIP``
    returns, without materialising the whole matrix.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    yq, yb = _labels(yq, "yq"), _labels(yb, "yb")
    if xq.ndim != 2 or xb.ndim != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError(f"embeddings must be 2-D with equal width, got {xq.shape} and {xb.shape}")
    if len(xq) != len(yq) or len(xb) != len(yb):
        raise ValueError("embeddings and labels differ in length")
    xbt = np.ascontiguousarray(xb.T)
    return _score_rows(
        lambda lo, hi: xq[lo:hi] @ xbt,
        yq,
        yb,
        exclude_self=exclude_self,
        k=k,
        chunk=chunk,
        threads=threads,
    )
