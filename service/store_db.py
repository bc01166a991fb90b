"""SQLite side of the vector store: schema, connections, transactions and every query.

One file per collection, ``items.sqlite``, in WAL mode so readers never block the writer. Tables:

- ``meta(key, value)``: collection uuid, model id, dim, index kind, factory string, metric, schema version.
- ``items``: the truth. ``id INTEGER PRIMARY KEY AUTOINCREMENT`` so ids are never reused after a delete, which
  lets every process track "rows applied so far" with one number (the highest id it has applied).
- ``deleted_items(seq AUTOINCREMENT, item_id)``: one tombstone per delete, so a process that did not do a
  delete learns about it by reading tombstones with ``seq`` above the last one it applied.

Threads: the write connection is used only under a mutex plus the cross-process flock; readers borrow
connections from a pool, one borrower at a time (hence ``check_same_thread=False``: a connection moves
between threads but is never shared by two at once).
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.store_errors import StoreCorrupt, StoreError, WriterBusy
from service.store_locks import FileLock
from service.store_types import Added, Item

SCHEMA_VERSION = 1
DB_FILE = "items.sqlite"
LOCK_FILE = "writer.lock"
_CHUNK = 900  # bound parameters per `IN (...)`, safely below SQLite's limit
_BUSY_TIMEOUT_S = 30.0
_MMAP_BYTES = 1 << 34  # address space only; SQLite maps at most the file's size

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    name TEXT,
    label TEXT,
    source TEXT,
    added_at TEXT NOT NULL,
    model_id TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX items_label ON items(label);
CREATE TABLE deleted_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL,
    deleted_at TEXT NOT NULL
);
"""
_TABLES = {"meta", "items", "deleted_items"}
# (sha256, name, label, source, little-endian float32 vector bytes): one row for `add_items`.
NewRow = tuple[str, str | None, str | None, str | None, bytes]
_META_KEYS = ("collection_uuid", "model_id", "dim", "index_kind", "factory", "metric", "schema_version")


@dataclass(frozen=True, slots=True)
class Meta:
    collection_uuid: str  # distinguishes a re-created collection of the same name from the old one
    model_id: str
    dim: int
    index_kind: str
    factory: str
    metric: str
    schema_version: int


@dataclass(frozen=True, slots=True, eq=False)
class Delta:
    """Changes after a known position, all read in one SQLite read transaction (one consistent view)."""

    item_seq: int  # highest item id ever assigned: the new "applied up to" position
    delete_seq: int  # highest tombstone sequence
    ids: np.ndarray  # int64 (n,), ascending: live rows with id above the old position
    xb: np.ndarray  # float32 (n, dim)
    meta: dict[int, HitMeta]  # those rows' (sha256, name, label)
    deleted: np.ndarray  # int64: ids deleted since the old sequence that are at or below the old position
    live: dict[int, HitMeta] | None  # every live row's metadata, ids ascending (only when asked for)


# (sha256, name, label): what a search hit needs besides id and score.
HitMeta = tuple[str, str | None, str | None]


def _hit_meta(sha256: str, name: str | None, label: str | None) -> HitMeta:
    # Labels repeat across many items (families, classes): share one string object per label.
    return (sha256, name, None if label is None else sys.intern(label))


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def translate(e: sqlite3.Error, path: Path) -> StoreError:
    """Map an sqlite3 error to the store's typed errors."""
    name = getattr(e, "sqlite_errorname", "") or ""
    text = str(e)
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a data" in text:
        return StoreCorrupt(path, text)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return WriterBusy(f"{path} stayed locked by another connection ({text}); retry later")
    return StoreError(f"SQLite error on {path}: {text}")


@contextlib.contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise translate(e, path) from e


def _connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    # mode=rw: opening must never silently create an empty database where a collection's file went missing.
    uri = path.absolute().as_uri() + ("?mode=rwc" if create else "?mode=rw")
    with sqlite_errors(path):
        return sqlite3.connect(
            uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )


def create_db(path: Path, meta: Meta) -> None:
    """Create a collection database with its schema and meta rows (the directory must exist)."""
    conn = _connect(path, create=True)
    try:
        with sqlite_errors(path):
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            # Statement by statement rather than executescript(), which commits first: schema and meta
            # land in one transaction, so a half-created database never exists.
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [(k, str(getattr(meta, k))) for k in _META_KEYS],
            )
            conn.execute("COMMIT")
    finally:
        conn.close()


def _read_meta(conn: sqlite3.Connection, path: Path) -> Meta:
    with sqlite_errors(path):
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables >= _TABLES:
            raise StoreCorrupt(path, f"missing tables {sorted(_TABLES - tables)}")
        values = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    missing = [k for k in _META_KEYS if k not in values]
    if missing:
        raise StoreCorrupt(path, f"meta table lacks {missing}")
    try:
        version = int(values["schema_version"])
        dim = int(values["dim"])
    except ValueError as e:
        raise StoreCorrupt(path, f"unreadable meta value: {e}") from e
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} uses store schema v{version}, newer than this lookalike's v{SCHEMA_VERSION}: "
            f"upgrade lookalike"
        )
    return Meta(
        collection_uuid=values["collection_uuid"],
        model_id=values["model_id"],
        dim=dim,
        index_kind=values["index_kind"],
        factory=values["factory"],
        metric=values["metric"],
        schema_version=version,
    )


def read_meta(path: Path) -> Meta:
    """Read a collection's meta without keeping a connection (for listings and create/open checks)."""
    conn = _connect(path)
    try:
        return _read_meta(conn, path)
    finally:
        conn.close()


def count_items(path: Path) -> int:
    conn = _connect(path)
    try:
        with sqlite_errors(path):
            return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _chunks(seq: Sequence, size: int = _CHUNK) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class Db:
    """A collection's SQLite database: the write connection, a pool of read connections, the queries."""

    def __init__(self, path: Path, *, lock_timeout: float) -> None:
        self.path = path
        self._write_mutex = threading.Lock()
        self._file_lock = FileLock(path.parent / LOCK_FILE, timeout=lock_timeout)
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._writer = self._new_conn()
        try:
            self.meta = _read_meta(self._writer, path)
            with sqlite_errors(path):
                # FULL: a commit the batch job reported is on disk; it commits in batches, so this is cheap.
                self._writer.execute("PRAGMA synchronous=FULL")
                if self._writer.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._writer.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            self.close()
            raise
        self.dim = self.meta.dim

    def _new_conn(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        with sqlite_errors(self.path):
            # Memory-mapped reads: the search path's metadata lookup touches a few pages of a table made
            # large by the vector blobs; through the default 2 MB page cache that is ~30 read() calls per
            # search (measured: +0.4 ms on a 1.8 ms flat search at 100k), through the map it is none.
            conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"collection database {self.path} is closed")

    def _borrow(self) -> sqlite3.Connection:
        self._check_open()
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return self._new_conn()

    def _give_back(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if not self._closed:
            self._pool.put(conn)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Borrow a read connection. Statements run in autocommit unless the caller BEGINs."""
        conn = self._borrow()
        try:
            with sqlite_errors(self.path):
                yield conn
        finally:
            self._give_back(conn)

    @contextlib.contextmanager
    def read_txn(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement inside sees the same committed state."""
        with self.read() as conn:
            conn.execute("BEGIN")
            yield conn
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the in-process mutex and the cross-process flock; all or nothing."""
        self._check_open()
        with self._write_mutex, self._file_lock.hold(), sqlite_errors(self.path):
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- writes ------------------------------------------------------------------------------------------

    def add_items(self, model_id: str, rows: Sequence[NewRow]) -> list[Added]:
        """Insert rows in one transaction, skipping sha256s already present (or repeated in ``rows``)."""
        out: list[Added] = []
        with self.write() as conn:
            known: dict[str, int] = {}
            shas = list({r[0] for r in rows})
            for chunk in _chunks(shas):
                sql = f"SELECT sha256, id FROM items WHERE sha256 IN ({_placeholders(len(chunk))})"
                known.update(conn.execute(sql, chunk).fetchall())
            added_at = now_iso()
            for sha, name, label, source, blob in rows:
                if sha in known:
                    out.append(Added(known[sha], False))
                    continue
                cur = conn.execute(
                    "INSERT INTO items(sha256, name, label, source, added_at, model_id, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (sha, name, label, source, added_at, model_id, blob),
                )
                item_id = int(cur.lastrowid or 0)
                known[sha] = item_id  # a repeat inside the same batch is a duplicate too
                out.append(Added(item_id, True))
        return out

    def delete_items(self, ids: Sequence[int]) -> list[int]:
        """Delete rows and write one tombstone per deleted row, in one transaction. Returns deleted ids."""
        deleted: list[int] = []
        with self.write() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                sql = f"DELETE FROM items WHERE id IN ({_placeholders(len(chunk))}) RETURNING id"
                deleted.extend(r[0] for r in conn.execute(sql, chunk).fetchall())
            deleted.sort()
            at = now_iso()
            conn.executemany(
                "INSERT INTO deleted_items(item_id, deleted_at) VALUES (?, ?)", [(i, at) for i in deleted]
            )
        return deleted

    # -- reads -------------------------------------------------------------------------------------------

    def present_sha256(self, shas: Sequence[str]) -> set[str]:
        present: set[str] = set()
        with self.read() as conn:
            for chunk in _chunks(shas):
                sql = f"SELECT sha256 FROM items WHERE sha256 IN ({_placeholders(len(chunk))})"
                present.update(r[0] for r in conn.execute(sql, chunk))
        return present

    def _item(self, row: tuple | None) -> Item | None:
        if row is None:
            return None
        return Item(*row[:7], vector=self._decode(row[0], row[7]))

    def get(self, item_id: int) -> Item | None:
        with self.read() as conn:
            row = conn.execute(
                "SELECT id, sha256, name, label, source, added_at, model_id, vector FROM items WHERE id = ?",
                (item_id,),
            ).fetchone()
        return self._item(row)

    def get_by_sha256(self, sha256: str) -> Item | None:
        with self.read() as conn:
            row = conn.execute(
                "SELECT id, sha256, name, label, source, added_at, model_id, vector FROM items "
                "WHERE sha256 = ?",
                (sha256,),
            ).fetchone()
        return self._item(row)

    def count(self) -> int:
        with self.read() as conn:
            return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])

    def label_ids(self, label: str) -> np.ndarray:
        with self.read() as conn:
            rows = conn.execute("SELECT id FROM items WHERE label = ?", (label,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _seqs(self, conn: sqlite3.Connection) -> tuple[int, int]:
        seqs = dict(conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
        return int(seqs.get("items", 0)), int(seqs.get("deleted_items", 0))

    def seqs(self) -> tuple[int, int]:
        """(highest item id ever assigned, highest tombstone sequence): where "caught up" is."""
        with self.read() as conn:
            return self._seqs(conn)

    def read_delta(self, after_id: int, after_seq: int, *, all_live: bool = False) -> Delta:
        """Rows added after ``after_id`` and deletions after ``after_seq``, as one consistent view.

        A tombstone for an id above ``after_id`` is left out: that row was added and deleted between two
        catch-ups, so it never reached the index (and it is not among the new rows either). With
        ``all_live``, also every live row's metadata (to verify a loaded snapshot and fill the hit map).
        """
        with self.read_txn() as conn:
            item_seq, delete_seq = self._seqs(conn)
            rows = conn.execute(
                "SELECT id, sha256, name, label, vector FROM items WHERE id > ? ORDER BY id", (after_id,)
            ).fetchall()
            dels = conn.execute(
                "SELECT item_id FROM deleted_items WHERE seq > ? AND item_id <= ?", (after_seq, after_id)
            ).fetchall()
            live = None
            if all_live:
                live = {
                    r[0]: _hit_meta(r[1], r[2], r[3])
                    for r in conn.execute("SELECT id, sha256, name, label FROM items ORDER BY id")
                }
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[4] for r in rows)
        if len(blob) != 4 * self.dim * len(rows):
            bad = next(r[0] for r in rows if len(r[4]) != 4 * self.dim)
            raise StoreCorrupt(self.path, f"item {bad} does not hold a {self.dim}-float vector")
        xb = np.frombuffer(blob, dtype="<f4").astype(np.float32, copy=False).reshape(len(rows), self.dim)
        return Delta(
            item_seq=item_seq,
            delete_seq=delete_seq,
            ids=ids,
            xb=xb,
            meta={r[0]: _hit_meta(r[1], r[2], r[3]) for r in rows},
            deleted=np.unique(np.fromiter((r[0] for r in dels), dtype=np.int64, count=len(dels))),
            live=live,
        )

    def _decode(self, item_id: int, blob: bytes) -> np.ndarray:
        if len(blob) != 4 * self.dim:
            raise StoreCorrupt(self.path, f"item {item_id} does not hold a {self.dim}-float vector")
        return np.frombuffer(blob, dtype="<f4").astype(np.float32)
