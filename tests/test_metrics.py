"""Retrieval metrics against hand-computed values and a brute-force per-query implementation."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    rank_metrics_from_distances,
    rank_metrics_from_scores,
    relevant_ranks,
    retrieval_metrics,
)


def brute_force(S: np.ndarray, yq: np.ndarray, yb: np.ndarray, exclude_self: bool = False, k: int = 10):
    """The definitions, one query at a time: sort by score, irrelevant first among equal scores."""
    p1, pk, ap, rr, labels = [], [], [], [], []
    for i in range(len(yq)):
        items = [j for j in range(len(yb)) if not (exclude_self and j == i)]
        items.sort(key=lambda j, i=i: (-float(S[i, j]), bool(yb[j] == yq[i])))
        rel = [bool(yb[j] == yq[i]) for j in items]
        if not any(rel):
            continue
        hits, total = 0, 0.0
        for rank, r in enumerate(rel, 1):
            if r:
                hits += 1
                total += hits / rank
        first = rel.index(True) + 1
        p1.append(float(rel[0]))
        pk.append(sum(rel[:k]) / k)
        ap.append(total / sum(rel))
        rr.append(1 / first if first <= k else 0.0)
        labels.append(yq[i])
    if not p1:
        return None
    p1a, la = np.array(p1), np.array(labels)
    return {
        "P@1": p1a.mean(),
        "macro_P@1": np.mean([p1a[la == c].mean() for c in np.unique(la)]),
        f"P@{k}": np.mean(pk),
        "mAP": np.mean(ap),
        f"MRR@{k}": np.mean(rr),
        "queries": len(p1),
    }


def test_hand_computed_example():
    # query 0 (label 0): ranking 0(rel) 1 3 2(rel) -> relevant ranks 1, 4: AP = (1/1 + 2/4) / 2
    # query 1 (label 1): ranking 0 1(rel) 3(rel) 2 -> relevant ranks 2, 3: AP = (1/2 + 2/3) / 2
    S = np.array([[0.9, 0.8, 0.3, 0.5], [0.9, 0.8, 0.3, 0.5]], dtype=np.float32)
    yq, yb = np.array([0, 1]), np.array([0, 1, 0, 1])
    m = rank_metrics_from_scores(S, yq, yb, k=2)
    assert m["P@1"] == pytest.approx(0.5)
    assert m["macro_P@1"] == pytest.approx(0.5)
    assert m["P@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["mAP"] == pytest.approx(((1 + 2 / 4) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert m["MRR@2"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["queries"] == 2 and m["index"] == 4 and m["queries_without_relevant"] == 0


def test_ties_are_pessimistic():
    # The relevant item ties with an irrelevant one: it ranks second, whatever the index order.
    for yb in (np.array([0, 1]), np.array([1, 0])):
        m = rank_metrics_from_scores(np.array([[0.5, 0.5]], dtype=np.float32), np.array([0]), yb)
        assert m["P@1"] == 0.0
        assert m["mAP"] == pytest.approx(0.5)
        assert m["MRR@10"] == pytest.approx(0.5)


def test_relevant_ranks_counts_irrelevant_ahead():
    neg = -np.array([0.9, 0.8, 0.3, 0.5, 0.8], dtype=np.float32)
    rel = np.array([True, False, True, False, True])
    # relevant 0.9 -> 1; relevant 0.8 ties irrelevant 0.8 -> 3; relevant 0.3 -> 5
    assert relevant_ranks(neg, rel).tolist() == [1, 3, 5]


def test_distances_equal_negated_scores():
    rng = np.random.default_rng(1)
    D = rng.integers(0, 300, (30, 50)).astype(np.float32)  # TLSH-like integer distances: many ties
    yq, yb = rng.integers(0, 4, 30), rng.integers(0, 4, 50)
    assert rank_metrics_from_distances(D, yq, yb) == rank_metrics_from_scores(-D, yq, yb)
    got, want = rank_metrics_from_distances(D, yq, yb), brute_force(-D, yq, yb)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force_on_random_data(exclude_self: bool, ties: bool):
    rng = np.random.default_rng(7 + 2 * exclude_self + ties)
    for _ in range(25):
        q = int(rng.integers(1, 30))
        n = q if exclude_self else int(rng.integers(1, 60))
        S = rng.integers(0, 4, (q, n)) if ties else rng.normal(size=(q, n))
        S = S.astype(np.float32)
        yq = rng.integers(0, 5, q)
        yb = yq.copy() if exclude_self else rng.integers(0, 5, n)
        got = rank_metrics_from_scores(S, yq, yb, exclude_self=exclude_self, chunk=int(rng.integers(1, 9)))
        want = brute_force(S, yq, yb, exclude_self=exclude_self)
        if want is None:
            assert got["P@1"] is None and got["queries"] == 0
            continue
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_retrieval_metrics_is_cosine_of_unit_vectors():
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(300, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    yb = rng.integers(0, 6, 300)
    xq, yq = xb[:40] + 0.05 * rng.normal(size=(40, 16)).astype(np.float32), yb[:40]
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    got = retrieval_metrics(xq, yq, xb, yb, chunk=16)
    assert got == rank_metrics_from_scores(xq @ xb.T, yq, yb)
    assert got["P@1"] > 0.9  # each query's own slightly noisy copy is in the index


def test_leave_one_out_ignores_the_query_itself():
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]]  # two identical pairs
    y = np.array([0, 0, 1, 1])
    m = retrieval_metrics(x, y, x, y, exclude_self=True)
    assert m["P@1"] == 1.0 and m["mAP"] == 1.0
    with pytest.raises(ValueError):
        retrieval_metrics(x[:3], y[:3], x, y, exclude_self=True)


def test_queries_without_relevant_items_are_counted_not_scored():
    S = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    m = rank_metrics_from_scores(S, np.array([0, 5]), np.array([0, 1]))
    assert m["queries"] == 1 and m["queries_without_relevant"] == 1 and m["P@1"] == 0.0
    none = rank_metrics_from_scores(S, np.array([5, 6]), np.array([0, 1]))
    assert none["P@1"] is None and none["mAP"] is None


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        rank_metrics_from_scores(np.zeros((2, 3)), np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError):
        rank_metrics_from_scores(np.array([[np.nan, 1.0]]), np.array([0]), np.array([0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]), np.zeros((2, 4)), np.array([0, 1]))
