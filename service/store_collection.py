"""A collection: one model's vectors in SQLite (the truth) and the FAISS index derived from them.

See `service.store` for the design. This module is the public face: writes, reads, search, lifecycle. The
index side (load, verify, catch up, rebuild, snapshot, locking around FAISS) is `service.store_sync`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from service.store_db import DB_FILE, Db, NewRow
from service.store_errors import DimensionMismatch, InvalidInput, StoreError, UnsupportedOperation
from service.store_sync import IndexSync
from service.store_types import Added, CatchUp, CollectionInfo, Hit, IndexStatus, Item, NewItem

log = logging.getLogger("lookalike.store")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NORM_TOLERANCE = 1e-3


class Collection:
    """One collection. Thread-safe: searches run in parallel with each other and with writes.

    Get one from `Store.open_collection` / `create_collection` / `open_or_create`; close it (or use it as a
    context manager) to write a final snapshot.
    """

    def __init__(self, path: Path, *, lock_timeout: float = 60.0) -> None:
        self.path = path
        self.name = path.name
        self._db = Db(path / DB_FILE, lock_timeout=lock_timeout)
        self._meta = self._db.meta
        self._labels: dict[str, faiss.IDSelector | None] = {}
        self._labels_gen = 0
        self._labels_lock = threading.Lock()
        self._warned_norm = False
        self._background: tuple[threading.Thread, threading.Event] | None = None
        self._closed = False
        try:
            self._sync = IndexSync(self.name, path, self._db, self._invalidate_labels)
        except BaseException:
            self._db.close()
            raise
        # Search-time knobs, plain attributes so a caller may tune them on a live collection.
        self.nprobe = max(8, self._sync.spec.nlist // 16)
        self.ef_search = 64

    # -- properties --------------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._meta.model_id

    @property
    def dim(self) -> int:
        return self._meta.dim

    @property
    def index_kind(self) -> str:
        return self._meta.index_kind

    @property
    def factory(self) -> str:
        return self._meta.factory

    @property
    def metric(self) -> str:
        return self._meta.metric

    def info(self) -> CollectionInfo:
        m = self._meta
        return CollectionInfo(
            self.name, self.path, m.model_id, m.dim, m.index_kind, m.factory, m.metric, self.count()
        )

    def index_status(self) -> IndexStatus:
        self._check_open()
        return self._sync.status()

    # -- index maintenance -------------------------------------------------------------------------------

    def catch_up(self) -> CatchUp:
        """Apply rows and deletions committed to SQLite (by any process) since the index last looked.

        Cheap when nothing changed (one small query). Writes through this object catch up by themselves;
        a process that only reads (the API while the batch job writes) calls this on a timer, or uses
        `start_background_catch_up`. For IVF, the catch-up that first sees enough vectors trains the index.
        """
        self._check_open()
        return self._sync.catch_up()

    def is_caught_up(self) -> bool:
        self._check_open()
        return self._sync.is_caught_up()

    def start_background_catch_up(self, interval_s: float = 2.0) -> None:
        """Call `catch_up` every ``interval_s`` seconds in a daemon thread until `close`."""
        if self._background is not None:
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.catch_up()
                except Exception:  # keep serving the last good index; the log says why
                    log.exception("collection %r: background catch-up failed", self.name)

        thread = threading.Thread(target=loop, name=f"catch-up-{self.name}", daemon=True)
        self._background = (thread, stop)
        thread.start()

    def rebuild(self) -> None:
        """Rebuild the index from SQLite: compacts HNSW tombstones, retrains IVF on the current data."""
        self._check_open()
        self._sync.rebuild()

    def snapshot(self, *, force: bool = False) -> bool:
        """Write the index and its SQLite position to ``index.snap`` atomically (searches continue
        meanwhile). Skipped, returning False, when the snapshot on disk is known to be at this position.
        The batch job should call it every few thousand items so a restart does not redo much work."""
        self._check_open()
        return self._sync.snapshot(force=force)

    # -- writes ------------------------------------------------------------------------------------------

    def _prepare(self, items: Sequence[NewItem]) -> list[NewRow]:
        rows = []
        vectors = []
        for i, it in enumerate(items):
            sha = it.sha256.lower() if isinstance(it.sha256, str) else ""
            if not _SHA256.fullmatch(sha):
                raise InvalidInput(f"item {i}: sha256 must be 64 hex digits, got {it.sha256!r}")
            v = np.asarray(it.vector, dtype=np.float32)
            if v.shape != (self.dim,):
                raise DimensionMismatch(
                    f"item {i} ({sha[:12]}): vector shape {v.shape}, but collection {self.name!r} holds "
                    f"{self.dim}-d vectors of model {self.model_id!r}; embed with that model"
                )
            vectors.append(v)
            rows.append((sha, it.name, it.label, it.source, v.astype("<f4").tobytes()))
        if vectors:
            xb = np.stack(vectors)
            if not np.isfinite(xb).all():
                raise InvalidInput("vectors must be finite (NaN or inf found)")
            self._check_norms(xb)
        return rows

    def _check_norms(self, xb: np.ndarray) -> None:
        # Not refused: the caller owns normalisation. But an un-normalised vector under "ip" silently turns
        # cosine scores into something else, so say so once.
        if self.metric == "ip" and not self._warned_norm:
            norms = np.linalg.norm(xb, axis=1)
            if np.abs(norms - 1).max() > _NORM_TOLERANCE:
                self._warned_norm = True
                log.warning(
                    "collection %r: vectors with L2 norm %.3g..%.3g added; scores are cosines only for "
                    "unit vectors (normalise before adding)",
                    self.name,
                    norms.min(),
                    norms.max(),
                )

    def add_many(self, items: Sequence[NewItem]) -> list[Added]:
        """Add items in ONE SQLite transaction (all or none). A sha256 already present (or repeated in the
        batch) is not added again: its entry is ``Added(existing_id, created=False)``. The index is caught
        up before returning, so the items are searchable."""
        self._check_open()
        rows = self._prepare(items)
        if not rows:
            return []
        added = self._db.add_items(self.model_id, rows)
        if any(a.created for a in added):
            self.catch_up()
        return added

    def add(self, item: NewItem) -> Added:
        return self.add_many([item])[0]

    def delete_many(self, ids: Iterable[int]) -> int:
        """Delete items in one transaction; returns how many existed. Other processes see the deletions at
        their next catch-up (via the tombstone table)."""
        self._check_open()
        deleted = self._db.delete_items([int(i) for i in ids])
        if deleted:
            self.catch_up()
        return len(deleted)

    def delete(self, item_id: int) -> bool:
        """Delete one item; False if it did not exist. Works for every index kind: flat and IVF remove the
        vector, HNSW tombstones it (excluded from results; `rebuild` compacts)."""
        return self.delete_many([item_id]) == 1

    # -- reads -------------------------------------------------------------------------------------------

    def get(self, item_id: int) -> Item | None:
        self._check_open()
        return self._db.get(int(item_id))

    def get_by_sha256(self, sha256: str) -> Item | None:
        self._check_open()
        return self._db.get_by_sha256(sha256.lower())

    def has_sha256(self, shas: Iterable[str]) -> set[str]:
        """The subset of these sha256s already stored (lower-cased), e.g. to skip files when resuming."""
        self._check_open()
        return self._db.present_sha256(list({s.lower() for s in shas}))

    def count(self) -> int:
        """Number of items in SQLite (the truth, whether or not the index has caught up)."""
        self._check_open()
        return self._db.count()

    def _label_selector(self, label: str) -> faiss.IDSelector | None:
        """IDSelector of the live ids with this label (None: no such item). Cached until a change to the
        index could make it stale; a generation counter keeps a slow builder from caching a stale one."""
        with self._labels_lock:
            if label in self._labels:
                return self._labels[label]
            gen = self._labels_gen
        ids = self._db.label_ids(label)
        sel = faiss.IDSelectorBatch(ids) if len(ids) else None
        with self._labels_lock:
            if self._labels_gen == gen:
                self._labels[label] = sel
        return sel

    def _invalidate_labels(self, labels: Iterable[str | None] | None) -> None:
        with self._labels_lock:
            self._labels_gen += 1
            if labels is None:
                self._labels.clear()
            else:
                for label in labels:
                    if label is not None:
                        self._labels.pop(label, None)

    def search(
        self,
        xq: np.ndarray,
        k: int = 10,
        *,
        label: str | None = None,
        score_threshold: float | None = None,
    ) -> list[list[Hit]]:
        """The k nearest items for each query row of ``xq`` (shape ``(nq, dim)``, L2-normalised for ip).

        ``label`` restricts results to items with that label with a FAISS ID selector inside the search, not
        by over-fetching and filtering: flat returns k hits whenever k such items exist; IVF and HNSW only
        see the candidates they visit, so a rare label may get fewer. ``score_threshold`` drops hits
        scoring below it (ip) or farther than it (l2). Results are best first and reflect the index's
        SQLite position: another process's writes and deletes show after its next `catch_up`; this
        object's own writes show at once.
        """
        self._check_open()
        xq = np.asarray(xq)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise DimensionMismatch(
                f"queries must have shape (nq, {self.dim}) for collection {self.name!r} (model "
                f"{self.model_id!r}), got {xq.shape}; a single vector v is v[None, :]"
            )
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InvalidInput(f"k must be a positive integer, got {k!r}")
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if not np.isfinite(xq).all():
            raise InvalidInput("queries must be finite (NaN or inf found)")
        sel = None
        if label is not None:
            sel = self._label_selector(label)
            if sel is None:
                return [[] for _ in range(len(xq))]
        try:
            return self._sync.search(
                xq,
                int(k),
                sel,
                nprobe=self.nprobe,
                ef_search=self.ef_search,
                score_threshold=None if score_threshold is None else float(score_threshold),
            )
        except RuntimeError as e:
            if sel is None:
                raise
            raise UnsupportedOperation(
                f"index {self.factory!r} of collection {self.name!r} cannot filter by id "
                f"({str(e).strip()[:160]}); use index kind flat, hnsw or ivf"
            ) from e

    # -- lifecycle ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"collection {self.name!r} is closed")

    def close(self, *, snapshot: bool = True) -> None:
        """Stop background catch-up, write a snapshot if the index moved since the last one, close SQLite.
        Call it after in-flight searches have returned."""
        if self._closed:
            return
        if self._background is not None:
            thread, stop = self._background
            stop.set()
            thread.join()
        if snapshot:
            try:
                self.snapshot()
            except OSError as e:
                log.warning("collection %r: snapshot at close failed (%s)", self.name, e)
        self._closed = True
        self._db.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, model={self.model_id!r}, index={self.factory!r}, path={self.path})"
