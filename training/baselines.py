"""Baselines the model must beat: fuzzy hashes (TLSH, ssdeep), byte histograms and raw pixels.

Every baseline ends in a matrix that :mod:`training.metrics` scores exactly like the model's cosine scores,
so the comparison differs only in the representation, never in the ranking or metric code:

* ``tlsh``     -- py-tlsh ``hash`` of the file's bytes, distance ``tlsh.diff``. Files too small or too
  uniform for TLSH hash to ``TNULL``; they get :data:`NULL_DISTANCE` to everything, so as index items they
  rank last, and as queries every item ties (the pessimistic tie rule then scores them as misses). They
  are counted and reported, never dropped, so TLSH answers the same queries as everyone else.
* ``ssdeep``   -- ppdeep ``hash``, distance ``100 - ppdeep.compare``.
* ``bytehist`` -- 256-bin byte counts, square-root of the frequencies, L2-normalised, cosine (the
  Hellinger kernel: it damps the zero byte that dominates every executable).
* ``pixels``   -- the model's own preprocessed ``uint8`` input, flattened, L2-normalised, cosine; NOT
  mean-centred (neither per image nor over the data set), the usual raw-pixel 1-NN floor.

Hashes and histograms are computed from the file bytes in worker processes and cached in SQLite keyed by
sha256 (``~/.cache/lookalike/baselines.sqlite``; ``$LOOKALIKE_BASELINE_CACHE`` or ``cache_path`` move it):
ppdeep is pure Python (~1.7 MB/s), so the 1.2 GB of the Debian families cost minutes once and nothing on
every rerun.

Pairwise distances: ``tlsh.diff`` is C and costs ~0.7 us a call from Python here, so 600 x 1,500 pairs
take about half a second inline. ``ppdeep.compare`` is pure Python (milliseconds for a comparable pair),
but a pair scores 0 unless the block sizes are compatible and the compared strings share a 7-character
substring; :func:`ssdeep_distances` finds the pairs that can score through an inverted index of 7-grams
and calls ``ppdeep.compare`` only on those (in worker processes when there are many), which gives the
same matrix as calling it on every pair.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ppdeep
import tlsh
from tqdm import tqdm

from embedder.dataspec import process_pool
from embedder.progress import progress_bar

FILE_BASELINES: tuple[str, ...] = ("tlsh", "ssdeep", "bytehist")
IMAGE_BASELINES: tuple[str, ...] = ("pixels",)
ALL_BASELINES: tuple[str, ...] = FILE_BASELINES + IMAGE_BASELINES
#: What TLSH returns for input it cannot hash (fewer than 50 bytes, or too little variety).
TNULL = "TNULL"
#: Distance of a TNULL hash to anything: above every real TLSH distance, so those items rank last.
NULL_DISTANCE = 1_000_000.0
#: Cache entries carry a version so a change of algorithm never reads old values.
_CACHE_KINDS = {"tlsh": "tlsh/1", "ssdeep": "ssdeep/1", "bytehist": "bytehist/1"}
_SSDEEP_WINDOW = 7  # ssdeep scores 0 unless two compared strings share a substring this long


def default_cache_path() -> Path:
    env = os.environ.get("LOOKALIKE_BASELINE_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lookalike" / "baselines.sqlite"


class FeatureCache:
    """sha256 -> baseline feature, in SQLite (WAL, so a test and a CLI run can share one file)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS feature (sha256 TEXT NOT NULL, kind TEXT NOT NULL, "
            "value BLOB NOT NULL, PRIMARY KEY (sha256, kind))"
        )
        self._db.commit()

    def get_many(self, kind: str, keys: Iterable[str]) -> dict[str, bytes]:
        ckind = _CACHE_KINDS[kind]
        out: dict[str, bytes] = {}
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT sha256, value FROM feature WHERE kind = ? AND sha256 IN ({marks})", [ckind, *chunk]
            )
            out.update((k, bytes(v)) for k, v in rows)
        return out

    def put_many(self, kind: str, items: Iterable[tuple[str, bytes]]) -> None:
        ckind = _CACHE_KINDS[kind]
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO feature (sha256, kind, value) VALUES (?, ?, ?)",
                ((k, ckind, v) for k, v in items),
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------- per-file features


def tlsh_hash(data: bytes) -> str:
    """TLSH of ``data``, or :data:`TNULL` (py-tlsh says ``TNULL``, older versions an empty string)."""
    h = tlsh.hash(data)
    return h if h and h != TNULL else TNULL


def ssdeep_hash(data: bytes) -> str:
    return ppdeep.hash(data)


def byte_counts(data: bytes) -> np.ndarray:
    """256-bin byte counts as uint64."""
    return np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.uint64)


def _encode(kind: str, data: bytes) -> bytes:
    if kind == "tlsh":
        return tlsh_hash(data).encode()
    if kind == "ssdeep":
        return ssdeep_hash(data).encode()
    if kind == "bytehist":
        return byte_counts(data).astype("<u8").tobytes()
    raise ValueError(f"unknown file baseline {kind!r}")


def _decode(kind: str, value: bytes) -> str | np.ndarray:
    if kind == "bytehist":
        return np.frombuffer(value, dtype="<u8").astype(np.float64)
    return value.decode()


def _compute_file(path: str, key: str, kinds: tuple[str, ...]) -> tuple[str, dict[str, bytes] | str]:
    """Worker: read once, check the bytes are still the ones ``key`` names, compute every kind."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return key, f"{path}: unreadable ({exc.strerror or exc})"
    if hashlib.sha256(data).hexdigest() != key:
        return key, f"{path}: changed since it was loaded (sha256 differs)"
    return key, {kind: _encode(kind, data) for kind in kinds}


@dataclass
class FeatureStats:
    """How a :func:`file_features` call got its values; ``computed == 0`` on a warm cache."""

    cached: int = 0
    computed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class BaselineError(RuntimeError):
    """A baseline could not be computed for every item (a file vanished or changed)."""


def file_features(
    paths: Sequence[str],
    keys: Sequence[str],
    kinds: Sequence[str],
    *,
    cache: FeatureCache,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, list[str | np.ndarray]], FeatureStats]:
    """Per-file features ``{kind: [value per item]}`` for files whose sha256 are ``keys``.

    Values come from the cache where present; the rest are computed in worker processes (largest files
    first, so one big file does not finish last alone) and written to the cache as they arrive, so an
    interrupted run keeps its work.
    """
    if len(paths) != len(keys):
        raise ValueError("paths and keys differ in length")
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in FILE_BASELINES]
    if bad:
        raise ValueError(f"not file baselines: {bad}; choose from {', '.join(FILE_BASELINES)}")
    t0 = time.perf_counter()
    stats = FeatureStats()
    have = {kind: cache.get_many(kind, keys) for kind in kinds}
    path_of = dict(zip(keys, paths, strict=True))
    todo: dict[str, tuple[str, ...]] = {}
    for key in path_of:
        missing = tuple(k for k in kinds if key not in have[k])
        if missing:
            todo[key] = missing
    stats.cached = len(path_of) - len(todo)
    if todo:
        order = sorted(todo, key=lambda k: -_size(path_of[k]))
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(order)))
        bar = progress_bar(enabled=progress, total=len(order), desc="baseline hashes", unit="file")
        pending: list[tuple[str, dict[str, bytes]]] = []
        last_flush = [time.perf_counter()]

        def accept(key: str, result: dict[str, bytes] | str) -> None:
            if isinstance(result, str):
                stats.errors.append(result)
            else:
                pending.append((key, result))
                stats.computed += 1
            bar.update(1)
            # Big files come first and take a minute each: flush by time as well as by count.
            if len(pending) >= 64 or time.perf_counter() - last_flush[0] > 15:
                _flush(cache, pending, have)
                last_flush[0] = time.perf_counter()

        if n_workers == 1:
            for key in order:
                accept(*_compute_file(path_of[key], key, todo[key]))
        else:
            with process_pool(n_workers) as pool:
                futures = [pool.submit(_compute_file, path_of[k], k, todo[k]) for k in order]
                for fut in as_completed(futures):
                    accept(*fut.result())
        _flush(cache, pending, have)
        bar.close()
    if stats.errors:
        raise BaselineError(f"{len(stats.errors)} file(s) failed: " + "; ".join(stats.errors[:5]))
    stats.seconds = time.perf_counter() - t0
    return {kind: [_decode(kind, have[kind][k]) for k in keys] for kind in kinds}, stats


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _flush(cache: FeatureCache, pending: list[tuple[str, dict[str, bytes]]], have: dict[str, dict]) -> None:
    by_kind: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for key, values in pending:
        for kind, value in values.items():
            by_kind[kind].append((key, value))
            have[kind][key] = value
    for kind, rows in by_kind.items():
        cache.put_many(kind, rows)
    pending.clear()


# ------------------------------------------------------------------------------- vectors for cosine


def sqrt_histograms(counts: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Byte counts -> sqrt of the frequencies, L2-normalised (float32 unit rows for cosine)."""
    c = np.asarray(np.stack(list(counts)) if not isinstance(counts, np.ndarray) else counts, dtype=np.float64)
    freq = c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)
    v = np.sqrt(freq)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def pixel_vectors(x: np.ndarray) -> np.ndarray:
    """uint8 ``(N, C, S, S)`` -> L2-normalised flattened pixels, not mean-centred.

    An all-black input has no direction; it becomes the zero vector, scoring 0 against everything.
    """
    v = x.reshape(len(x), -1).astype(np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------- pairwise distances


def tlsh_distances(hq: Sequence[str], hb: Sequence[str]) -> np.ndarray:
    """``(len(hq), len(hb))`` TLSH distances; a TNULL on either side gives :data:`NULL_DISTANCE`."""
    D = np.full((len(hq), len(hb)), NULL_DISTANCE, dtype=np.float32)
    b_ok = [(j, h) for j, h in enumerate(hb) if h != TNULL]
    cols = np.array([j for j, _ in b_ok], dtype=np.int64)
    diff = tlsh.diff
    for i, a in enumerate(hq):
        if a != TNULL and len(cols):
            D[i, cols] = [diff(a, b) for _, b in b_ok]
    return D


def _strip_sequences(s: str) -> str:
    """ppdeep's ``_strip_sequences``: runs of more than three equal characters are cut to three."""
    out = list(s[:3])
    for i in range(3, len(s)):
        if s[i] != s[i - 1] or s[i] != s[i - 2] or s[i] != s[i - 3]:
            out.append(s[i])
    return "".join(out)


def _ssdeep_keys(h: str) -> set[tuple[int, str]]:
    """(effective block size, 7-gram) of both strings of an ssdeep hash, as ppdeep compares them.

    ppdeep compares strings only at equal effective block sizes (s1 is at ``bs``, s2 at ``2 * bs``) and
    scores 0 unless the stripped strings share a 7-character substring, so two hashes with no key in
    common score exactly 0.
    """
    bs_text, s1, s2 = h.split(":")
    bs = int(bs_text)
    keys: set[tuple[int, str]] = set()
    for block, s in ((bs, _strip_sequences(s1)), (2 * bs, _strip_sequences(s2))):
        keys.update((block, s[i : i + _SSDEEP_WINDOW]) for i in range(len(s) - _SSDEEP_WINDOW + 1))
    return keys


def _ssdeep_short_key(h: str) -> tuple[int, str] | None:
    """ppdeep returns 100 for equal block sizes and equal stripped s1 even when s1 is under 7 chars."""
    bs_text, s1, _ = h.split(":")
    s1 = _strip_sequences(s1)
    return (int(bs_text), s1) if len(s1) < _SSDEEP_WINDOW else None


def _compare_pairs(pairs: list[tuple[str, str]]) -> list[int]:
    return [ppdeep.compare(a, b) for a, b in pairs]


def ssdeep_distances(
    hq: Sequence[str], hb: Sequence[str], *, workers: int | None = None, progress: bool = False
) -> tuple[np.ndarray, int]:
    """``(len(hq), len(hb))`` distances ``100 - ppdeep.compare`` and the number of compare calls made.

    Only pairs sharing a 7-gram key (see :func:`_ssdeep_keys`) are compared; the rest score 0, exactly as
    ppdeep would. Candidate pairs are compared in worker processes when there are many of them.
    """
    D = np.full((len(hq), len(hb)), 100.0, dtype=np.float32)
    posting: dict[tuple[int, str], list[int]] = defaultdict(list)
    short: dict[tuple[int, str], list[int]] = defaultdict(list)
    for j, h in enumerate(hb):
        for key in _ssdeep_keys(h):
            posting[key].append(j)
        sk = _ssdeep_short_key(h)
        if sk is not None:
            short[sk].append(j)
    cand_i: list[int] = []
    cand_j: list[int] = []
    for i, h in enumerate(hq):
        js: set[int] = set()
        for key in _ssdeep_keys(h):
            js.update(posting.get(key, ()))
        sk = _ssdeep_short_key(h)
        if sk is not None:
            js.update(short.get(sk, ()))
        cand_i.extend([i] * len(js))
        cand_j.extend(sorted(js))
    pairs = [(hq[i], hb[j]) for i, j in zip(cand_i, cand_j, strict=True)]
    n_workers = max(1, workers or os.cpu_count() or 1)
    if n_workers == 1 or len(pairs) < 2000:
        scores = _compare_pairs(pairs)
    else:
        size = max(200, len(pairs) // (n_workers * 8))
        chunks = [pairs[s : s + size] for s in range(0, len(pairs), size)]
        scores = []
        with process_pool(n_workers) as pool:
            it = pool.map(_compare_pairs, chunks)
            bar = tqdm(it, total=len(chunks), desc="ssdeep compare", leave=False, disable=not progress)
            for part in bar:
                scores.extend(part)
    if pairs:
        D[np.array(cand_i), np.array(cand_j)] = 100.0 - np.array(scores, dtype=np.float32)
    return D, len(pairs)
