"""Tests of the vector store (service.store): real SQLite and real FAISS in tmp_path, small synthetic data.

A second `Store` object on the same directory stands in for a second process: it shares nothing in memory
with the first, only the files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.store import (
    CollectionExists,
    CollectionNotFound,
    ConfigMismatch,
    DimensionMismatch,
    Hit,
    InvalidInput,
    ModelMismatch,
    NewItem,
    Store,
    StoreCorrupt,
    WriterBusy,
)

D = 16
LOGGER = "lookalike.store"


def unit(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int = D, n_clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres: approximate indexes have real neighbourhoods to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(n_clusters, size=n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sha(i: int) -> str:
    return f"{i:064x}"


def new_items(xb: np.ndarray, start: int = 0, n_labels: int = 3) -> list[NewItem]:
    return [
        NewItem(
            sha256=sha(start + i), vector=v, name=f"file{start + i}", label=f"fam{(start + i) % n_labels}"
        )
        for i, v in enumerate(xb)
    ]


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = xq @ xb.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def hit_ids(results: list[list[Hit]]) -> list[list[int]]:
    return [[h.id for h in hits] for hits in results]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


# -- identity: sha256 dedup, model and dimension checks ---------------------------------------------------


def test_same_sha256_is_one_item(store: Store) -> None:
    col = store.create_collection("c", "model-a", D)
    xb = unit(3)
    first = col.add_many(new_items(xb))
    assert [a.created for a in first] == [True, True, True]
    again = col.add_many([*new_items(xb[:1]), NewItem(sha256=sha(7), vector=xb[2]), NewItem(sha(7), xb[2])])
    assert again[0] == (first[0].id, False)
    assert again[1].created and again[2] == (again[1].id, False)  # repeated inside one batch
    assert col.count() == 4
    assert col.has_sha256([sha(0), sha(7), sha(99), sha(0).upper()]) == {sha(0), sha(7)}
    item = col.get(first[1].id)
    assert item is not None and item.sha256 == sha(1) and item.model_id == "model-a"
    np.testing.assert_array_equal(item.vector, xb[1])
    assert col.get_by_sha256(sha(2)).id == first[2].id
    assert col.get(12345) is None


def test_model_mismatch_is_refused(store: Store) -> None:
    store.create_collection("c", "model-a", D).close()
    with pytest.raises(ModelMismatch, match="model-a"):
        store.create_collection("c", "model-b", D)
    with pytest.raises(ModelMismatch):
        store.open_or_create("c", "model-b", D)
    with pytest.raises(ModelMismatch):
        store.open_collection("c", model_id="model-b")
    with pytest.raises(CollectionExists):
        store.create_collection("c", "model-a", D)
    with store.open_or_create("c", "model-a", D) as col:
        assert col.model_id == "model-a"
    with pytest.raises(ConfigMismatch):
        store.open_or_create("c", "model-a", D, index_kind="hnsw")
    with pytest.raises(CollectionNotFound):
        store.open_collection("nope")
    assert [(c.name, c.model_id, c.count) for c in store.list_collections()] == [("c", "model-a", 0)]


def test_wrong_dimension_is_rejected_and_nothing_is_written(store: Store) -> None:
    col = store.create_collection("c", "m", D)
    good = unit(2)
    with pytest.raises(DimensionMismatch):
        col.add_many([*new_items(good), NewItem(sha(9), np.ones(D + 1, np.float32))])
    assert col.count() == 0  # validated before the transaction: all or nothing
    col.add_many(new_items(good))
    with pytest.raises(DimensionMismatch):
        col.search(np.ones((1, D - 1), np.float32), 3)
    with pytest.raises(DimensionMismatch):
        col.search(good[0], 3)  # one vector must be passed as (1, d)
    with pytest.raises(DimensionMismatch):
        store.open_or_create("c", "m", D * 2)
    with pytest.raises(InvalidInput):
        col.add(NewItem("not-a-sha", good[0]))
    with pytest.raises(InvalidInput):
        col.add(NewItem(sha(5), np.full(D, np.nan, np.float32)))
    with pytest.raises(InvalidInput):
        store.create_collection("../escape", "m", D)
    with pytest.raises(InvalidInput):
        store.create_collection("bad-kind", "m", D, index_kind="NotAnIndex")
    assert col.count() == 2


# -- search -------------------------------------------------------------------------------------------------


def test_flat_search_is_exact(store: Store) -> None:
    xb, xq = unit(500), unit(20, seed=1)
    col = store.create_collection("c", "m", D)
    ids = np.array([a.id for a in col.add_many(new_items(xb))])
    ref_scores, ref_rows = brute_force(xb, xq, 10)
    results = col.search(xq, 10)
    assert hit_ids(results) == ids[ref_rows].tolist()
    np.testing.assert_allclose([[h.score for h in r] for r in results], ref_scores, rtol=1e-5, atol=1e-5)
    assert results[0][0].sha256 == sha(int(ref_rows[0, 0])) and results[0][0].name == f"file{ref_rows[0, 0]}"


@pytest.mark.parametrize("kind", ["hnsw", "IVF16,Flat"])
def test_approximate_kinds_find_neighbours(store: Store, kind: str) -> None:
    xb = clustered(1000)
    col = store.create_collection("c", "m", D, index_kind=kind)
    ids = np.array([a.id for a in col.add_many(new_items(xb))])
    assert not col.index_status().exact_fallback  # 1000 >= 39 * 16: IVF was trained
    _, ref_rows = brute_force(xb, xb[:50], 10)
    got = hit_ids(col.search(xb[:50], 10))
    recall = np.mean([len(set(g) & set(ids[r])) / 10 for g, r in zip(got, ref_rows, strict=True)])
    assert recall >= 0.9
    assert [g[0] for g in got] == ids[:50].tolist()  # every vector finds itself first


def test_ivf_serves_exact_results_until_trained_then_trains(store: Store) -> None:
    xb = clustered(700)
    col = store.create_collection("c", "m", D, index_kind="IVF16,Flat")  # trains at 39 * 16 = 624
    reader = Store(store.root).open_collection("c")
    ids = np.array([a.id for a in col.add_many(new_items(xb[:600]))])
    assert col.index_status().exact_fallback
    _, ref_rows = brute_force(xb[:600], xb[600:], 5)
    assert hit_ids(col.search(xb[600:], 5)) == ids[ref_rows].tolist()
    col.add_many(new_items(xb[600:], start=600))
    assert not col.index_status().exact_fallback
    caught = reader.catch_up()
    assert caught.rebuilt and not reader.index_status().exact_fallback
    assert hit_ids(reader.search(xb[650:651], 1)) == [[650 + 1]]
    col.close()
    reader.close()
    with Store(store.root).open_collection("c") as again:
        assert not again.index_status().exact_fallback and again.index_status().ntotal == 700


def test_label_filter_and_score_threshold(store: Store) -> None:
    xb, xq = unit(300), unit(5, seed=2)
    col = store.create_collection("c", "m", D)
    ids = np.array([a.id for a in col.add_many(new_items(xb))])
    labels = np.array([f"fam{i % 3}" for i in range(300)])
    mask = labels == "fam1"
    _, ref_rows = brute_force(xb[mask], xq, 7)
    results = col.search(xq, 7, label="fam1")
    assert hit_ids(results) == ids[mask][ref_rows].tolist()
    assert all(h.label == "fam1" for r in results for h in r)
    assert col.search(xq, 7, label="no-such-label") == [[]] * 5

    threshold = 0.3
    results = col.search(xq, 300, score_threshold=threshold)
    all_scores = xq @ xb.T
    assert [len(r) for r in results] == (all_scores >= threshold).sum(axis=1).tolist()
    assert all(h.score >= threshold for r in results for h in r)
    both = col.search(xq, 300, label="fam2", score_threshold=threshold)
    assert [len(r) for r in both] == ((all_scores >= threshold) & (labels == "fam2")).sum(axis=1).tolist()


def test_l2_metric_scores_are_distances(store: Store) -> None:
    xb = unit(50)
    col = store.create_collection("c", "m", D, metric="l2")
    col.add_many(new_items(xb))
    hits = col.search(xb[:1] * 0.5, 3, score_threshold=0.5)[0]
    assert hits[0].sha256 == sha(0) and hits[0].score == pytest.approx(0.25, abs=1e-5)
    assert all(h.score <= 0.5 for h in hits)
    assert [h.score for h in hits] == sorted(h.score for h in hits)  # nearest (smallest) first


# -- deletes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "IVF16,Flat"])
def test_delete_removes_and_other_processes_catch_up(store: Store, kind: str) -> None:
    xb = clustered(800)
    col = store.create_collection("c", "m", D, index_kind=kind)
    ids = [a.id for a in col.add_many(new_items(xb))]
    other = Store(store.root).open_collection("c")  # "another process", opened before the delete
    victims = ids[:10]
    assert col.delete_many(victims) == 10
    assert col.delete(victims[0]) is False  # already gone
    assert col.count() == 790 and col.get(victims[0]) is None
    assert col.index_status().ntotal == 790
    found = hit_ids(col.search(xb[:20], 5))
    assert not {i for row in found for i in row} & set(victims)
    # Ids stay right after removal (IDMap2 over IVF would return wrong ids here).
    assert [row[0] for row in found[10:]] == ids[10:20]

    assert victims[0] in hit_ids(other.search(xb[:1], 1))[0]  # not caught up yet
    assert other.is_caught_up() is False
    caught = other.catch_up()
    assert (caught.added, caught.removed) == (0, 10) and other.is_caught_up()
    assert hit_ids(other.search(xb[:20], 5)) == found
    other.close()
    col.close()
    with Store(store.root).open_collection("c") as reopened:
        assert reopened.index_status().ntotal == 790
        assert hit_ids(reopened.search(xb[:20], 5)) == found


def test_hnsw_delete_tombstones_and_rebuild_compacts(store: Store) -> None:
    xb = clustered(400)
    col = store.create_collection("c", "m", D, index_kind="hnsw")
    ids = [a.id for a in col.add_many(new_items(xb))]
    other = Store(store.root).open_collection("c")
    assert col.delete_many(ids[:5]) == 5
    status = col.index_status()
    assert (status.ntotal, status.tombstoned) == (400, 5)  # HNSW cannot remove: excluded from results instead
    found = col.search(xb[:5], 10)
    assert all(len(r) == 10 for r in found)  # the filter still fills k
    assert not {h.id for r in found for h in r} & set(ids[:5])
    assert other.catch_up().removed == 5
    assert not {i for r in hit_ids(other.search(xb[:5], 10)) for i in r} & set(ids[:5])
    other.close()
    col.close()
    with Store(store.root).open_collection("c") as reopened:
        assert reopened.index_status().tombstoned == 5  # recovered from snapshot vs SQLite
        assert not {i for r in hit_ids(reopened.search(xb[:5], 10)) for i in r} & set(ids[:5])
        reopened.rebuild()
        assert (reopened.index_status().ntotal, reopened.index_status().tombstoned) == (395, 0)


# -- snapshots ------------------------------------------------------------------------------------------


def _filled(store: Store, kind: str = "flat", n: int = 300) -> tuple[np.ndarray, list[list[int]]]:
    xb = unit(n)
    with store.create_collection("c", "m", D, index_kind=kind) as col:
        col.add_many(new_items(xb))
        col.delete(3)
        results = hit_ids(col.search(xb[:10], 5))
    assert (store.root / "c" / "index.snap").is_file()
    return xb, results


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.unlink(), id="deleted"),
        pytest.param(lambda p: p.write_bytes(os.urandom(4096)), id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), id="truncated"),
        pytest.param(
            lambda p: p.write_bytes(p.read_bytes()[:200] + b"\xff" * 8 + p.read_bytes()[208:]), id="bitrot"
        ),
    ],
)
def test_unusable_snapshot_is_rebuilt_with_a_warning(store: Store, caplog, damage) -> None:
    xb, before = _filled(store)
    snap = store.root / "c" / "index.snap"
    damage(snap)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Store(store.root).open_collection("c") as col:
        assert hit_ids(col.search(xb[:10], 5)) == before
        assert col.index_status().ntotal == 299
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    caplog.clear()
    with Store(store.root).open_collection("c"):  # the rebuild rewrote the snapshot
        pass
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_snapshot_of_another_collection_is_rebuilt(store: Store, caplog) -> None:
    xb, before = _filled(store)
    with store.create_collection("other", "m", D) as other:
        other.add_many(new_items(unit(300, seed=5)))
    (store.root / "other" / "index.snap").replace(store.root / "c" / "index.snap")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Store(store.root).open_collection("c") as col:
        assert hit_ids(col.search(xb[:10], 5)) == before
    assert any("another collection" in r.getMessage() for r in caplog.records)


def test_stale_snapshot_is_caught_up_without_rebuild(store: Store, caplog) -> None:
    xb = unit(200)
    first = store.create_collection("c", "m", D)
    first.add_many(new_items(xb[:100]))
    assert first.snapshot() and not first.snapshot()  # second call: nothing new
    second = Store(store.root).open_collection("c")
    second.add_many(new_items(xb[100:], start=100))
    second.delete(1)
    second.close(snapshot=False)  # leaves the snapshot at 100 items
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Store(store.root).open_collection("c") as col:
        status = col.index_status()
        assert (status.ntotal, status.last_item_id, status.last_delete_seq) == (199, 200, 1)
        assert col.search(xb[150:151], 1)[0][0].sha256 == sha(150)
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert first.catch_up().added == 100
    first.close()


def test_snapshot_leaves_no_temp_files(store: Store) -> None:
    _filled(store)
    assert sorted(p.name for p in (store.root / "c").iterdir() if p.name.startswith(".")) == []


# -- SQLite is the truth ----------------------------------------------------------------------------------


def test_corrupt_sqlite_raises_store_corrupt(store: Store) -> None:
    _filled(store)
    db = store.root / "c" / "items.sqlite"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 400)
    with pytest.raises(StoreCorrupt) as exc:
        Store(store.root).open_collection("c")
    assert exc.value.path == db and str(db) in str(exc.value)
    with pytest.raises(StoreCorrupt):
        store.list_collections()


def test_damaged_sqlite_pages_raise_store_corrupt(store: Store) -> None:
    _filled(store)
    db = store.root / "c" / "items.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    data[page:] = b"\xa5" * (len(data) - page)  # keep the header page, wreck every table page
    db.write_bytes(bytes(data))
    (store.root / "c" / "index.snap").unlink()  # force a full read of the items table
    with pytest.raises(StoreCorrupt, match=r"items\.sqlite"):
        Store(store.root).open_collection("c")


# -- concurrency ------------------------------------------------------------------------------------------


def test_searches_during_writes_stay_consistent(store: Store) -> None:
    base, extra = unit(200), unit(1500, seed=3)
    vectors = {sha(i): v for i, v in enumerate(np.vstack([base, extra]))}
    col = store.create_collection("c", "m", D)
    col.add_many(new_items(base))
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0] * 4

    def searcher(t: int) -> None:
        rng = np.random.default_rng(t)
        try:
            while not stop.is_set():
                i = int(rng.integers(200))
                label = "fam1" if t % 2 else None
                hits = col.search(base[i : i + 1], 8, label=label)[0]
                if label is None:
                    assert hits[0].sha256 == sha(i) and hits[0].score == pytest.approx(1.0, abs=1e-5)
                assert len(hits) == 8 and len({h.id for h in hits}) == 8
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True)
                for h in hits:  # metadata belongs to the vector that produced the score
                    assert h.score == pytest.approx(float(vectors[h.sha256] @ base[i]), abs=1e-4)
                    assert label is None or h.label == label
                searches[t] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    try:
        for start in range(0, 1500, 100):
            col.add_many(new_items(extra[start : start + 100], start=200 + start))
            if start == 700:
                assert col.delete_many(range(900, 910)) == 10
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors[0]
    assert min(searches) > 0
    assert col.count() == 1690 and col.index_status().ntotal == 1690


def test_second_writer_waits_then_fails_clearly(tmp_path: Path) -> None:
    store = Store(tmp_path, lock_timeout=0.2)
    col = store.create_collection("c", "m", D)
    fd = os.open(tmp_path / "c" / "writer.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer holds the lock
        with pytest.raises(WriterBusy, match=r"writer\.lock"):
            col.add_many(new_items(unit(2)))
    finally:
        os.close(fd)
    assert col.add_many(new_items(unit(2)))[0].created  # lock released: writes go through
    assert col.search(unit(2)[:1], 1)[0][0].sha256 == sha(0)


def test_background_catch_up_sees_other_writers(store: Store) -> None:
    xb = unit(20)
    writer = store.create_collection("c", "m", D)
    reader = Store(store.root).open_collection("c")
    reader.start_background_catch_up(interval_s=0.02)
    writer.add_many(new_items(xb))
    writer.delete(1)
    deadline = time.monotonic() + 10
    while not reader.is_caught_up() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert reader.index_status().ntotal == 19
    assert reader.search(xb[5:6], 1)[0][0].sha256 == sha(5)
    reader.close()
    writer.close()
