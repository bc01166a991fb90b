"""Keeping a collection's in-memory FAISS index in step with SQLite: load, verify, catch up, rebuild,
snapshot.

Locks, in the only order they are ever taken:
1. ``_apply_mutex``: one thread at a time changes the index (catch-up, rebuild) or serialises it (snapshot).
   Snapshotting holds only this, so searches go on while the file is written.
2. ``_rw``: searches hold it shared for the FAISS call only; applying changes holds it exclusive, briefly.
SQLite writes take the Db's own mutex and the cross-process flock, and never run under either of these.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from service.store_db import Db, HitMeta, now_iso
from service.store_index import (
    METRICS,
    SNAPSHOT_FILE,
    IndexSpec,
    SnapshotHeader,
    SnapshotInvalid,
    SnapshotMissing,
    build_index,
    index_ids,
    matches_spec,
    read_snapshot,
    remove_stale_temp_files,
    search_params,
    write_snapshot,
)
from service.store_locks import RWLock
from service.store_types import CatchUp, Hit, IndexStatus

log = logging.getLogger("lookalike.store")


@dataclass(slots=True, eq=False)
class _State:
    """The index and the SQLite position it reflects. Changed only under the RW write lock."""

    index: faiss.Index
    exact_fallback: bool
    last_item_id: int
    last_delete_seq: int
    # id -> (sha256, name, label) of every live item at this position: hits are assembled from here, so the
    # search path runs no SQL (a cold-cache SQLite lookup after a 50 MB flat scan cost ~0.3-0.4 ms, about
    # 20% of the 100k search). About 300 bytes per item.
    meta: dict[int, HitMeta] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)  # tombstoned ids still inside a non-removable index
    dead_sel: faiss.IDSelector | None = None  # excludes `dead` from results


class IndexSync:
    """The derived FAISS index of one collection and the protocol that keeps it true to SQLite.

    ``on_change(labels)`` is called after rows or deletions were applied, with the labels of the new rows,
    or None when any label may be affected (deletes, rebuilds); the collection drops cached selectors.
    """

    def __init__(
        self, name: str, path: Path, db: Db, on_change: Callable[[Iterable[str | None] | None], None]
    ) -> None:
        self.name = name
        self.snapshot_path = path / SNAPSHOT_FILE
        self._db = db
        self._meta = db.meta
        self.spec = IndexSpec.probe(self._meta.factory, self._meta.dim, self._meta.metric)
        self._higher_is_closer = METRICS[self._meta.metric] == faiss.METRIC_INNER_PRODUCT
        self._on_change = on_change
        self._rw = RWLock()
        self._apply_mutex = threading.Lock()
        self._snapshot_at: tuple[int, int] | None = None  # position of the snapshot on disk, if known
        remove_stale_temp_files(self.snapshot_path)
        with self._apply_mutex:
            self._state = self._load()

    # -- loading -----------------------------------------------------------------------------------------

    def _load(self) -> _State:
        try:
            return self._from_snapshot()
        except SnapshotMissing as e:
            if self._db.seqs() == (0, 0):
                return self._build()  # a new, empty collection: nothing to warn about
            log.warning(
                "collection %r: %s; rebuilding the FAISS index from SQLite %s", self.name, e, self._db.path
            )
        except SnapshotInvalid as e:
            log.warning(
                "collection %r: FAISS snapshot %s is unusable (%s); rebuilding the index from SQLite %s",
                self.name,
                self.snapshot_path,
                e,
                self._db.path,
            )
        self._state = self._build()
        try:  # so that the next process to open the collection does not rebuild as well
            self._snapshot_locked(force=True)
        except OSError as e:
            log.warning("collection %r: could not write snapshot (%s)", self.name, e)
        return self._state

    def _from_snapshot(self) -> _State:
        index, h = read_snapshot(self.snapshot_path)
        m = self._meta
        mine = (m.collection_uuid, m.model_id, m.dim, m.metric, m.factory)
        if (h.collection_uuid, h.model_id, h.dim, h.metric, h.factory) != mine:
            raise SnapshotInvalid(
                f"it was made for another collection or model (model {h.model_id!r}, index {h.factory!r})"
            )
        if (h.exact_fallback and not self.spec.needs_training) or not matches_spec(
            index, self.spec, exact_fallback=h.exact_fallback
        ):
            raise SnapshotInvalid("its index type differs from the collection's")
        item_seq, delete_seq = self._db.seqs()
        if h.last_item_id > item_seq or h.last_delete_seq > delete_seq:
            raise SnapshotInvalid("it is ahead of the database (was SQLite restored from an older copy?)")
        self._state = _State(index, h.exact_fallback, h.last_item_id, h.last_delete_seq)
        self._apply(verify=True)
        self._snapshot_at = (h.last_item_id, h.last_delete_seq)
        return self._state

    def _build(self) -> _State:
        """A fresh index from every live SQLite row (trains IVF when there are enough rows)."""
        delta = self._db.read_delta(0, 0)
        index, exact_fallback = build_index(self.spec, delta.ids, delta.xb)
        return _State(index, exact_fallback, delta.item_seq, delta.delete_seq, meta=delta.meta)

    def _replace(self, state: _State) -> None:
        with self._rw.write():
            self._state = state
        self._on_change(None)

    # -- catching up -------------------------------------------------------------------------------------

    def catch_up(self) -> CatchUp:
        with self._apply_mutex:
            return self._apply(verify=False)

    def rebuild(self) -> None:
        with self._apply_mutex:
            self._replace(self._build())

    def _apply(self, *, verify: bool) -> CatchUp:
        """Apply SQLite changes after the state's position (caller holds ``_apply_mutex``). With ``verify``,
        also check the index holds exactly the live ids (once, after loading a snapshot); a mismatch raises
        SnapshotInvalid."""
        st = self._state
        delta = self._db.read_delta(st.last_item_id, st.last_delete_seq, all_live=verify)
        if delta.item_seq < st.last_item_id or delta.delete_seq < st.last_delete_seq:
            if verify:
                raise SnapshotInvalid("it is ahead of the database")
            log.warning("collection %r: SQLite went backwards (restored?); rebuilding the index", self.name)
            self._replace(self._build())
            return CatchUp(0, 0, rebuilt=True)
        added, removed = len(delta.ids), len(delta.deleted)
        if st.exact_fallback and self.spec.needs_training:
            live = st.index.ntotal + added - removed  # the flat fallback removes, so ntotal is the live count
            if live >= self.spec.min_train:
                log.info("collection %r: %d live vectors, training %s", self.name, live, self.spec.factory)
                self._replace(self._build())
                return CatchUp(added, removed, rebuilt=True)
        position = (delta.item_seq, delta.delete_seq)
        if not (added or removed or verify) and position == (st.last_item_id, st.last_delete_seq):
            return CatchUp(0, 0, rebuilt=False)
        with self._rw.write():
            if added:
                st.index.add_with_ids(delta.xb, delta.ids)
                st.meta.update(delta.meta)
            if removed:
                for item_id in delta.deleted.tolist():
                    st.meta.pop(item_id, None)
                if st.exact_fallback or self.spec.removable:
                    st.index.remove_ids(faiss.IDSelectorBatch(delta.deleted))
                else:
                    st.dead.update(delta.deleted.tolist())
                    st.dead_sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(st.dead, np.int64)))
            st.last_item_id, st.last_delete_seq = position
        if verify and delta.live is not None:
            self._verify(st, delta.live)
        if added or removed:
            self._on_change(None if removed else {m[2] for m in delta.meta.values()})
        return CatchUp(added, removed, rebuilt=False)

    def _verify(self, st: _State, live_meta: dict[int, HitMeta]) -> None:
        live = np.fromiter(live_meta, dtype=np.int64, count=len(live_meta))  # ascending (ORDER BY id)
        have = np.sort(index_ids(st.index))
        if len(np.unique(have)) != len(have):
            raise SnapshotInvalid("the index holds an id twice")
        if st.exact_fallback or self.spec.removable:
            if not np.array_equal(have, live):
                raise SnapshotInvalid(f"the index holds {len(have)} ids but SQLite has {len(live)} items")
            with self._rw.write():
                st.meta = live_meta
            return
        missing = np.setdiff1d(live, have, assume_unique=True)
        if len(missing):
            raise SnapshotInvalid(f"{len(missing)} SQLite items are missing from the index")
        # HNSW: the ids the index holds beyond the live ones are exactly the tombstoned items.
        dead = np.setdiff1d(have, live, assume_unique=True)
        with self._rw.write():
            st.meta = live_meta
            st.dead = set(dead.tolist())
            st.dead_sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead)) if len(dead) else None

    def is_caught_up(self) -> bool:
        st = self._state
        return self._db.seqs() == (st.last_item_id, st.last_delete_seq)

    def status(self) -> IndexStatus:
        st = self._state
        return IndexStatus(
            ntotal=int(st.index.ntotal),
            tombstoned=len(st.dead),
            exact_fallback=st.exact_fallback,
            last_item_id=st.last_item_id,
            last_delete_seq=st.last_delete_seq,
            caught_up=self.is_caught_up(),
        )

    # -- searching ---------------------------------------------------------------------------------------

    def search(
        self,
        xq: np.ndarray,
        k: int,
        sel: faiss.IDSelector | None,
        *,
        nprobe: int,
        ef_search: int,
        score_threshold: float | None,
    ) -> list[list[Hit]]:
        """FAISS search plus hit assembly, under the shared lock so ids and metadata come from the same
        position. ``sel`` (live ids of a label) replaces the tombstone filter: it holds no tombstoned ids."""
        self._rw.acquire_read()
        try:
            st = self._state
            kk = min(k, st.index.ntotal)
            if kk == 0:
                return [[] for _ in range(len(xq))]
            params = search_params(
                self.spec,
                exact_fallback=st.exact_fallback,
                sel=sel if sel is not None else st.dead_sel,
                k=kk,
                nprobe=nprobe,
                ef_search=ef_search,
            )
            D, I = st.index.search(xq, kk, params=params)  # noqa: E741 - FAISS naming
            meta = st.meta
            out = []
            for d_row, i_row in zip(D.tolist(), I.tolist(), strict=True):
                hits = []
                for score, item_id in zip(d_row, i_row, strict=True):
                    # -1: fewer than k candidates (selector, IVF probes); not in meta: tombstoned.
                    m = meta.get(item_id) if item_id >= 0 else None
                    if m is None:
                        continue
                    if score_threshold is not None and (
                        score < score_threshold if self._higher_is_closer else score > score_threshold
                    ):
                        continue
                    hits.append(Hit(item_id, score, m[0], m[1], m[2]))
                out.append(hits)
            return out
        finally:
            self._rw.release_read()

    # -- snapshots ---------------------------------------------------------------------------------------

    def snapshot(self, *, force: bool = False) -> bool:
        with self._apply_mutex:
            return self._snapshot_locked(force=force)

    def _snapshot_locked(self, *, force: bool) -> bool:
        # Only the apply mutex is held: the index cannot change, and searches keep running meanwhile.
        st = self._state
        position = (st.last_item_id, st.last_delete_seq)
        if position == self._snapshot_at and not force:
            return False
        m = self._meta
        header = SnapshotHeader(
            collection_uuid=m.collection_uuid,
            model_id=m.model_id,
            dim=m.dim,
            metric=m.metric,
            factory=m.factory,
            exact_fallback=st.exact_fallback,
            last_item_id=st.last_item_id,
            last_delete_seq=st.last_delete_seq,
            ntotal=int(st.index.ntotal),
            written_at=now_iso(),
        )
        write_snapshot(self.snapshot_path, st.index, header)
        self._snapshot_at = position
        return True
