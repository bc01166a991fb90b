"""The vector store: collections of embeddings with metadata, searchable by nearest neighbour.

Design
------
A store is a directory; each collection is a sub-directory holding::

    items.sqlite   SQLite in WAL mode: the source of truth (items, tombstones, meta)
    index.snap     FAISS index snapshot with the SQLite position it reflects (derived, disposable)
    writer.lock    flock'ed by writers for the duration of each write transaction

*SQLite is the truth.* Each item row holds id, sha256 (unique: the same input twice is one item), name,
label, source, added_at, model id and the float32 vector. A collection belongs to one model id, recorded in
its meta table at creation; the store never mixes two models' vectors (`ModelMismatch`). Ids come from
AUTOINCREMENT and are never reused, so "rows applied" is one number; every delete also writes a tombstone
row with its own increasing sequence, so "deletes applied" is one number too.

*FAISS is derived.* Each process keeps the collection's FAISS index in memory and catches it up from
SQLite: rows with id above the last applied one are added, tombstones above the last applied sequence are
removed (flat, IVF) or tombstoned in memory and filtered out of results with an ID selector (HNSW, which
FAISS cannot remove from). A writer catches up right after its own commit; a reader process learns about
other processes' writes and deletes via `Collection.catch_up()` (call it on a timer, or use
`start_background_catch_up`). Index kinds, IVF training and the exact fallback: see `service.store_index`.

*Snapshot protocol.* `Collection.snapshot()` (and `close()`) writes the index plus a header (collection
uuid, model id, dim, metric, factory, last applied item id and tombstone sequence, CRC32) into one file:
temp file in the same directory, fsync, os.replace, fsync of the directory. At open the snapshot is
loaded and caught up; it is then checked against SQLite (exactly the live ids for removable kinds). A
missing, corrupt, foreign (other model/collection) or inconsistent snapshot is rebuilt from SQLite with a
warning on the ``lookalike.store`` logger, then rewritten. A corrupt SQLite file is never papered over: it
raises `StoreCorrupt` naming the file.

*Concurrency.* In one process, searches run in parallel threads (FAISS releases the GIL) under the shared
side of a reader/writer lock; applying changes takes the exclusive side briefly. SQLite reads use a pool of
connections (one thread per connection at a time); writes use one connection behind a mutex. Across
processes, writers serialise on ``writer.lock`` per transaction: a second writer waits up to
``lock_timeout`` seconds, then gets `WriterBusy`. Readers never wait for writers (WAL).

*Search path.* FAISS search (with an ID selector for a label filter) plus one ``SELECT ... WHERE id IN``
for the metadata of the hits; nothing else.

Usage::

    store = Store(Path("var/store"))
    with store.open_or_create("executables", model_id=bundle_id, dim=128) as col:
        col.add_many([NewItem(sha256=h, vector=v, name=n, label=fam) for h, v, n, fam in batch])
        hits = col.search(xq, k=10, label="coreutils", score_threshold=0.5)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from service.store_collection import Collection
from service.store_db import DB_FILE, Meta, count_items, create_db, read_meta
from service.store_errors import (
    CollectionExists,
    CollectionNotFound,
    ConfigMismatch,
    DimensionMismatch,
    InvalidInput,
    ModelMismatch,
    StoreCorrupt,
    StoreError,
    UnsupportedOperation,
    WriterBusy,
)
from service.store_index import KIND_FACTORIES, resolve_factory
from service.store_index import METRICS as _METRICS
from service.store_types import Added, CatchUp, CollectionInfo, Hit, IndexStatus, Item, NewItem

__all__ = [
    "INDEX_KINDS",
    "METRICS",
    "Added",
    "CatchUp",
    "Collection",
    "CollectionExists",
    "CollectionInfo",
    "CollectionNotFound",
    "ConfigMismatch",
    "DimensionMismatch",
    "Hit",
    "IndexStatus",
    "InvalidInput",
    "Item",
    "ModelMismatch",
    "NewItem",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "UnsupportedOperation",
    "WriterBusy",
]

log = logging.getLogger("lookalike.store")

INDEX_KINDS = tuple(KIND_FACTORIES)  # short names; any FAISS factory string is accepted too
METRICS = tuple(_METRICS)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Store:
    """A directory of collections. Cheap to construct; collections are opened on demand."""

    def __init__(self, root: Path | str, *, lock_timeout: float = 60.0) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(
                f"collection name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                f"starting with a letter or digit"
            )
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self._dir(name) / DB_FILE).is_file()

    def _meta(self, name: str) -> Meta:
        path = self._dir(name) / DB_FILE
        if not path.is_file():
            known = ", ".join(c.name for c in self._dirs()) or "none"
            raise CollectionNotFound(
                f"no collection {name!r} in store {self.root} (collections: {known}); create it first, "
                f"e.g. with `lookalike index --collection {name} ...`"
            )
        return read_meta(path)

    def _dirs(self) -> list[Path]:
        return sorted(
            p for p in self.root.iterdir() if not p.name.startswith(".") and (p / DB_FILE).is_file()
        )

    def create_collection(
        self, name: str, model_id: str, dim: int, index_kind: str = "flat", metric: str = "ip"
    ) -> Collection:
        """Create and open a collection for vectors of ``model_id``.

        ``index_kind``: "flat" (exact, default), "hnsw", "ivf", or a FAISS factory string. ``metric``: "ip"
        (inner product = cosine on unit vectors) or "l2". Raises `ModelMismatch` if the name is taken by
        another model's collection, `CollectionExists` if taken by the same model's.
        """
        target = self._dir(name)
        if not isinstance(model_id, str) or not model_id:
            raise InvalidInput("model_id must be a non-empty string (the model bundle id)")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidInput(f"dim must be a positive integer, got {dim!r}")
        factory = resolve_factory(index_kind, dim, metric)
        if target.exists():
            if not (target / DB_FILE).is_file():
                raise StoreError(f"{target} exists but is not a collection; remove it or choose another name")
            self._refuse_existing(name, model_id)
        meta = Meta(
            collection_uuid=uuid.uuid4().hex,
            model_id=model_id,
            dim=dim,
            index_kind=index_kind,
            factory=factory,
            metric=metric,
            schema_version=1,
        )
        # Built in a hidden directory and renamed into place: a collection directory is complete or absent,
        # and of two processes creating the same name, exactly one rename wins.
        tmp = self.root / f".creating-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            create_db(tmp / DB_FILE, meta)
            try:
                os.rename(tmp, target)
            except OSError:
                if target.exists():
                    self._refuse_existing(name, model_id)
                raise
            _fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("created collection %r (model %s, %d-d, %s, %s)", name, model_id, dim, factory, metric)
        return Collection(target, lock_timeout=self.lock_timeout)

    def _refuse_existing(self, name: str, model_id: str) -> None:
        existing = self._meta(name)
        if existing.model_id != model_id:
            raise _model_mismatch(name, existing.model_id, model_id)
        raise CollectionExists(f"collection {name!r} already exists in {self.root}; open it instead")

    def open_collection(self, name: str, *, model_id: str | None = None) -> Collection:
        """Open an existing collection (`CollectionNotFound` otherwise). With ``model_id``, also refuse a
        collection of another model (`ModelMismatch`)."""
        meta = self._meta(name)
        if model_id is not None and meta.model_id != model_id:
            raise _model_mismatch(name, meta.model_id, model_id)
        return Collection(self._dir(name), lock_timeout=self.lock_timeout)

    def open_or_create(
        self,
        name: str,
        model_id: str,
        dim: int,
        index_kind: str | None = None,
        metric: str | None = None,
    ) -> Collection:
        """Open the collection, creating it (default kind "flat", metric "ip") if absent.

        An existing collection must match: another model id raises `ModelMismatch`, another dim
        `DimensionMismatch`, an explicitly different index kind or metric `ConfigMismatch`.
        """
        if not self.exists(name):
            with contextlib.suppress(CollectionExists):  # lost a creation race to the same model: open it
                return self.create_collection(name, model_id, dim, index_kind or "flat", metric or "ip")
        meta = self._meta(name)
        if meta.model_id != model_id:
            raise _model_mismatch(name, meta.model_id, model_id)
        if meta.dim != dim:
            raise DimensionMismatch(f"collection {name!r} holds {meta.dim}-d vectors, not {dim}-d")
        if metric is not None and metric != meta.metric:
            raise ConfigMismatch(f"collection {name!r} uses metric {meta.metric!r}, not {metric!r}")
        if index_kind is not None and resolve_factory(index_kind, dim, meta.metric) != meta.factory:
            raise ConfigMismatch(
                f"collection {name!r} uses index {meta.factory!r} ({meta.index_kind!r}), not {index_kind!r}; "
                f"omit index_kind to open it as it is, or use another collection name"
            )
        return Collection(self._dir(name), lock_timeout=self.lock_timeout)

    def list_collections(self) -> list[CollectionInfo]:
        """Every collection with its model, index kind and item count, read from SQLite only (no FAISS).
        A collection whose database is corrupt raises `StoreCorrupt` rather than being left out."""
        out = []
        for d in self._dirs():
            m = read_meta(d / DB_FILE)
            out.append(
                CollectionInfo(
                    d.name, d, m.model_id, m.dim, m.index_kind, m.factory, m.metric, count_items(d / DB_FILE)
                )
            )
        return out


def _model_mismatch(name: str, existing: str, wanted: str) -> ModelMismatch:
    return ModelMismatch(
        f"collection {name!r} holds vectors of model {existing!r}, not {wanted!r}; a collection never mixes "
        f"two models' embeddings: use another collection name for the new model, or embed with {existing!r}"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
