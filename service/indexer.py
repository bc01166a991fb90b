"""The batch indexing job: files in, vectors in the store, resumable after a crash at any point.

Files are read, hashed and preprocessed in worker processes (the one path, ``embedder.inputs.prepare``),
embedded in batches by the frozen model, and written one transaction per chunk.

Resuming gives exactly what an uninterrupted run gives, ids and vectors bit for bit, because:

* the file list is processed in fixed chunks of ``chunk_size`` paths, in spec order;
* a chunk's items are committed in one transaction, so after a SIGKILL a chunk is either all there or
  not at all;
* a rerun skips files whose sha256 is already in the collection, so every chunk it redoes holds exactly
  the new items it held the first time, embedded in one batch of the same composition (same floating
  point operations, same vectors), and SQLite hands out the same ids in the same order.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.dataspec import process_pool
from embedder.embed import Embedder
from embedder.errors import InputError
from embedder.inputs import InputSpec, check_size, prepare
from service.store import Collection, NewItem

INDEXED, DUPLICATE, UNREADABLE = "indexed", "duplicate", "unreadable"


@dataclass
class _Done:
    """What a worker learnt about one file."""

    path: str
    outcome: str  # "ok", DUPLICATE, UNREADABLE or an InputError code
    sha256: str = ""
    array: np.ndarray | None = None
    size: int = 0
    message: str = ""
    read_s: float = 0.0
    prepare_s: float = 0.0


@dataclass
class IndexReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (path, code, message)
    files: int = 0
    bytes_read: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: Counter())
    wall_s: float = 0.0

    @property
    def indexed(self) -> int:
        return self.outcomes[INDEXED]


_spec: InputSpec | None = None
_allow_raw = False


def _init(spec: InputSpec, allow_raw: bool) -> None:
    global _spec, _allow_raw
    _spec, _allow_raw = spec, allow_raw


def _read(path: str) -> tuple[bytes | None, _Done]:
    assert _spec is not None
    t0 = time.perf_counter()
    try:
        check_size(os.stat(path).st_size, _spec)
        with open(path, "rb") as f:
            data = f.read(_spec.max_bytes + 1)
        check_size(len(data), _spec)
    except InputError as exc:
        return None, _Done(path, exc.code, message=str(exc))
    except OSError as exc:
        return None, _Done(path, UNREADABLE, message=f"{type(exc).__name__}: {exc.strerror or exc}")
    done = _Done(
        path, "ok", hashlib.sha256(data).hexdigest(), size=len(data), read_s=time.perf_counter() - t0
    )
    return data, done


def _hash(path: str) -> _Done:
    """Phase 1: read and hash, so files already in the collection are never preprocessed again."""
    return _read(path)[1]


def _prepare(path: str) -> _Done:
    """Phase 2, for new files only: preprocess through the one path (the re-read hits the page cache)."""
    data, done = _read(path)
    if data is None:
        return done
    t = time.perf_counter()
    try:
        done.array = prepare(data, _spec, allow_raw=_allow_raw).array  # type: ignore[arg-type]
    except InputError as exc:
        done.outcome, done.message = exc.code, str(exc)
    done.prepare_s = time.perf_counter() - t
    return done


def _chunks(seq: Sequence[tuple[Path, str]], n: int) -> Iterator[Sequence[tuple[Path, str]]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def index_files(
    collection: Collection,
    embedder: Embedder,
    files: Sequence[tuple[Path, str]],
    *,
    workers: int | None = None,
    chunk_size: int = 64,
    snapshot_every: int = 10_000,
    allow_raw: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Index ``(path, label)`` pairs into ``collection``; ``on_progress(files, bytes)`` after each chunk."""
    if collection.model_id != embedder.model_id:
        raise ValueError(f"collection holds model {collection.model_id}, not {embedder.model_id}")
    report = IndexReport()
    started = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    seen_in_run: set[str] = set()
    since_snapshot = 0
    with process_pool(workers, _init, (embedder.spec, allow_raw)) as pool:
        for chunk in _chunks(files, chunk_size):
            hashed = list(pool.map(_hash, [str(p) for p, _ in chunk]))
            present = collection.has_sha256([d.sha256 for d in hashed if d.outcome == "ok"])
            fresh = [
                i
                for i, d in enumerate(hashed)
                if d.outcome == "ok" and d.sha256 not in present and d.sha256 not in seen_in_run
            ]
            # Duplicates of a file earlier in this chunk are also re-marked below.
            prepared = dict(zip(fresh, pool.map(_prepare, [hashed[i].path for i in fresh]), strict=True))
            new: list[tuple[_Done, str]] = []
            for i, (d, (_, label)) in enumerate(zip(hashed, chunk, strict=True)):
                d = prepared.get(i, d)
                report.files += 1
                report.bytes_read += d.size
                report.seconds["read"] += d.read_s
                report.seconds["preprocess"] += d.prepare_s
                if d.outcome == "ok" and (d.sha256 in present or d.sha256 in seen_in_run):
                    report.outcomes[DUPLICATE] += 1
                elif d.outcome == "ok":
                    seen_in_run.add(d.sha256)
                    new.append((d, label))
                else:
                    report.outcomes[d.outcome] += 1
                    report.rejected.append((d.path, d.outcome, d.message))
            if new:
                t = time.perf_counter()
                vectors = embedder.embed_arrays(np.stack([d.array for d, _ in new]))
                report.seconds["embed"] += time.perf_counter() - t
                t = time.perf_counter()
                items = [
                    NewItem(sha256=d.sha256, vector=v, name=Path(d.path).name, label=label, source=d.path)
                    for (d, label), v in zip(new, vectors, strict=True)
                ]
                added = collection.add_many(items)
                report.seconds["write"] += time.perf_counter() - t
                report.outcomes[INDEXED] += sum(a.created for a in added)
                report.outcomes[DUPLICATE] += sum(not a.created for a in added)
                since_snapshot += len(new)
                if since_snapshot >= snapshot_every:
                    # A crash then costs at most this many items of catch-up, not a full index rebuild.
                    collection.snapshot()
                    since_snapshot = 0
            if on_progress is not None:
                on_progress(len(chunk), sum(d.size for d in hashed))
    report.wall_s = time.perf_counter() - started
    return report
