"""FAISS side of the vector store: index kinds, building and training, search parameters, snapshot files.

FAISS labels are SQLite item ids. IVF indexes store arbitrary ids themselves and are used bare; every other
kind is wrapped in ``IndexIDMap2``. (IDMap2 over IVF is wrong after ``remove_ids``: IDMap2 compacts its id
map while IVF keeps the old positions as labels, so searches return -1 or other items' ids.)

Index kinds (``index_kind`` at collection creation):

- ``flat`` -> ``Flat``: exact search; removes deleted vectors.
- ``hnsw`` -> ``HNSW32``: approximate; FAISS HNSW cannot remove vectors, so a deleted item is tombstoned:
  it stays in the graph (still useful as a routing node) and every search excludes it with an ID selector.
  `Collection.rebuild()` compacts the tombstones away.
- ``ivf`` -> ``IVF1024,Flat``: approximate; removes deleted vectors. IVF needs training. Until the collection
  holds ``39 * nlist`` live vectors (39 points per centroid is FAISS's own minimum; 39,936 for ``ivf``) the
  collection is served by an exact flat index built from the SQLite vectors. The catch-up that first sees
  enough vectors rebuilds the index: k-means on the first ``min(n, 64 * nlist)`` live vectors in id order,
  then all vectors added. The trained IVF then stays, even if deletes shrink the collection again.
- Any other FAISS factory string (``IVF256,Flat``, ``HNSW16``, ``IVF64,SQ8``, ...) is accepted as is,
  except pre-transforms and refinement (``PCA..,``, ``OPQ..,``, ``..,RFlat``), whose search parameters do
  not carry an ID selector through.

Snapshot file (``index.snap``), one file so the index and its position are replaced together::

    b"LKSNAP01" | FAISS index bytes (faiss.write_index) | header JSON | u32 LE len(header) | b"LKSNPEND"

The header records the collection uuid, model id, dim, metric, factory, whether the exact fallback is in
use, the SQLite position (last item id, last deletion sequence), ntotal, and the CRC32 and length of the
index bytes. A snapshot is written to a temp file in the same directory, fsynced, renamed over the old one
with os.replace, and the directory fsynced: readers see the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from service.store_errors import InvalidInput

KIND_FACTORIES = {"flat": "Flat", "hnsw": "HNSW32", "ivf": "IVF1024,Flat"}
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
SNAPSHOT_FILE = "index.snap"
_MIN_PER_CENTROID = 39  # below this FAISS k-means warns that the clustering is unreliable
_TRAIN_PER_CENTROID = 64  # training sample cap: more points barely improve centroids but cost k-means time
_MAGIC = b"LKSNAP01"
_END = b"LKSNPEND"
_TRAILER = struct.Struct("<I8s")
_SNAPSHOT_FORMAT = 1
_IO_CHUNK = 1 << 20


class SnapshotInvalid(Exception):
    """Internal: the snapshot cannot be used (missing, corrupt, or made for other data). Never escapes the
    store: the collection rebuilds its index from SQLite instead."""


class SnapshotMissing(SnapshotInvalid):
    pass


def resolve_factory(index_kind: str, dim: int, metric: str) -> str:
    """Turn an index kind or raw factory string into a validated FAISS factory string."""
    if metric not in METRICS:
        raise InvalidInput(f"metric must be one of {sorted(METRICS)}, not {metric!r}")
    factory = KIND_FACTORIES.get(index_kind.strip().lower(), index_kind.strip())
    if re.match(r"idmap", factory, re.IGNORECASE):
        raise InvalidInput(
            f"give the factory string without IDMap ({factory!r}): the store maps item ids itself"
        )
    try:
        inner = faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise InvalidInput(
            f"index kind {index_kind!r} is neither one of {sorted(KIND_FACTORIES)} nor a FAISS factory "
            f"string for dim {dim} ({first})"
        ) from e
    if isinstance(inner, faiss.IndexPreTransform | faiss.IndexRefine):
        raise InvalidInput(
            f"factory string {factory!r} uses a pre-transform or refinement, which ID-filtered search "
            f"does not support; use e.g. 'IVF1024,Flat', 'HNSW32' or 'IVF256,SQ8'"
        )
    return factory


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """What the store needs to know about a factory string, found by building an empty index once."""

    factory: str
    dim: int
    metric: str
    needs_training: bool
    removable: bool  # supports remove_ids; otherwise deletes are tombstoned
    nlist: int  # IVF lists, 0 if not IVF
    is_hnsw: bool
    min_train: int  # live vectors needed before the index is trained (exact flat fallback until then)

    @classmethod
    def probe(cls, factory: str, dim: int, metric: str) -> IndexSpec:
        inner = faiss.index_factory(dim, factory, METRICS[metric])
        ivf = faiss.try_extract_index_ivf(inner)
        nlist = int(ivf.nlist) if ivf is not None else 0
        try:
            inner.remove_ids(faiss.IDSelectorBatch(np.empty(0, dtype=np.int64)))
            removable = True
        except RuntimeError:
            removable = False
        needs_training = not inner.is_trained
        # Product/residual quantisers learn 256 centroids per sub-quantiser, whatever the IVF size.
        per_codebook = 256 if re.search(r"PQ|RQ|LSQ", factory, re.IGNORECASE) else 1
        min_train = _MIN_PER_CENTROID * max(nlist, per_codebook) if needs_training else 0
        return cls(
            factory=factory,
            dim=dim,
            metric=metric,
            needs_training=needs_training,
            removable=removable,
            nlist=nlist,
            is_hnsw=isinstance(faiss.downcast_index(inner), faiss.IndexHNSW),
            min_train=min_train,
        )

    def train_size(self, n: int) -> int:
        return min(n, max(self.min_train, _TRAIN_PER_CENTROID * self.nlist))


def new_index(spec: IndexSpec, *, exact_fallback: bool) -> faiss.Index:
    """An empty index for this spec: bare IVF (native ids), otherwise IDMap2 over the factory string."""
    if spec.nlist and not exact_fallback:
        return faiss.index_factory(spec.dim, spec.factory, METRICS[spec.metric])
    factory = "Flat" if exact_fallback else spec.factory
    return faiss.IndexIDMap2(faiss.index_factory(spec.dim, factory, METRICS[spec.metric]))


def build_index(spec: IndexSpec, ids: np.ndarray, xb: np.ndarray) -> tuple[faiss.Index, bool]:
    """Build the index for these live vectors (ids ascending). Returns (index, exact_fallback)."""
    exact_fallback = spec.needs_training and len(ids) < spec.min_train
    index = new_index(spec, exact_fallback=exact_fallback)
    if not exact_fallback and spec.needs_training:
        index.train(xb[: spec.train_size(len(ids))])
    if len(ids):
        index.add_with_ids(xb, ids)
    return index, exact_fallback


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in the index (unsorted), to check a loaded snapshot against SQLite."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [np.empty(0, dtype=np.int64)]
    for list_no in range(invlists.nlist):
        n = invlists.list_size(list_no)
        if n:
            ptr = invlists.get_ids(list_no)
            parts.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64))  # astype copies before release
            invlists.release_ids(list_no, ptr)
    return np.concatenate(parts)


def search_params(
    spec: IndexSpec,
    *,
    exact_fallback: bool,
    sel: faiss.IDSelector | None,
    k: int,
    nprobe: int,
    ef_search: int,
) -> faiss.SearchParameters | None:
    """Per-call search parameters. A fresh object each call: IndexIDMap2.search temporarily swaps the
    selector inside the parameters it is given, so sharing one object across threads would race."""
    kwargs = {} if sel is None else {"sel": sel}
    if exact_fallback or not (spec.nlist or spec.is_hnsw):
        return faiss.SearchParameters(**kwargs) if kwargs else None
    if spec.nlist:
        return faiss.SearchParametersIVF(nprobe=min(nprobe, spec.nlist), **kwargs)
    # HNSW only returns up to efSearch candidates, so efSearch must be at least k.
    return faiss.SearchParametersHNSW(efSearch=max(ef_search, k), **kwargs)


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    collection_uuid: str
    model_id: str
    dim: int
    metric: str
    factory: str
    exact_fallback: bool
    last_item_id: int
    last_delete_seq: int
    ntotal: int
    nbytes: int = 0
    crc32: int = 0
    written_at: str = ""
    format: int = _SNAPSHOT_FORMAT


def remove_stale_temp_files(path: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp files of snapshot writes that crashed. Only old ones: a young one may be another
    process's write in progress."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(path: Path, index: faiss.Index, header: SnapshotHeader) -> None:
    """Atomically replace ``path`` with this index and header (see the module docstring for the layout)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            crc = 0
            nbytes = 0

            def write(b: bytes) -> int:
                nonlocal crc, nbytes
                crc = zlib.crc32(b, crc)
                nbytes += len(b)
                f.write(b)
                return len(b)

            writer = faiss.PyCallbackIOWriter(write)
            faiss.write_index(index, writer)
            del writer  # flushes the callback writer's buffer
            head = json.dumps(asdict(header) | {"nbytes": nbytes, "crc32": crc}).encode()
            f.write(head)
            f.write(_TRAILER.pack(len(head), _END))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_snapshot(path: Path) -> tuple[faiss.Index, SnapshotHeader]:
    """Read and check a snapshot. Raises SnapshotMissing / SnapshotInvalid, never returns a damaged index.

    The checksum is verified before FAISS parses a byte, so garbage never reaches the deserialiser (which
    may allocate whatever a corrupt size field says). The same open file is read twice, so a concurrent
    os.replace by another process cannot mix two files.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after two passes
    except FileNotFoundError:
        raise SnapshotMissing(f"{path} does not exist") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < len(_MAGIC) + _TRAILER.size or f.read(len(_MAGIC)) != _MAGIC:
            raise SnapshotInvalid("not a lookalike snapshot (bad magic or truncated)")
        f.seek(size - _TRAILER.size)
        hlen, end = _TRAILER.unpack(f.read(_TRAILER.size))
        nbytes = size - len(_MAGIC) - _TRAILER.size - hlen
        if end != _END or nbytes <= 0:
            raise SnapshotInvalid("truncated or damaged trailer")
        f.seek(len(_MAGIC) + nbytes)
        try:
            header = SnapshotHeader(**json.loads(f.read(hlen)))
        except (ValueError, TypeError) as e:
            raise SnapshotInvalid(f"unreadable header ({e})") from e
        if header.format != _SNAPSHOT_FORMAT or header.nbytes != nbytes:
            raise SnapshotInvalid("header does not describe this file")
        f.seek(len(_MAGIC))
        crc, left = 0, nbytes
        while left:
            chunk = f.read(min(_IO_CHUNK, left))
            if not chunk:
                raise SnapshotInvalid("truncated index bytes")
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        if crc != header.crc32:
            raise SnapshotInvalid("checksum mismatch: the index bytes are damaged")
        f.seek(len(_MAGIC))
        left = nbytes

        def read(n: int) -> bytes:
            nonlocal left
            b = f.read(min(n, left))
            left -= len(b)
            return b

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read))
        except RuntimeError as e:
            raise SnapshotInvalid(f"FAISS cannot read the index ({str(e).strip()[:200]})") from e
    if index.ntotal != header.ntotal or index.d != header.dim:
        raise SnapshotInvalid("index type, size or dimension differs from its header")
    return index, header


def matches_spec(index: faiss.Index, spec: IndexSpec, *, exact_fallback: bool) -> bool:
    """True when a loaded index has the type, dimension and metric this collection would build."""
    # Round-trip the empty index through serialisation: read_index gives concrete classes (IndexFlatIP)
    # where index_factory gives general ones (IndexFlat with an IP metric).
    want = faiss.deserialize_index(faiss.serialize_index(new_index(spec, exact_fallback=exact_fallback)))
    if type(index) is not type(want) or index.d != spec.dim or index.metric_type != want.metric_type:
        return False
    if isinstance(want, faiss.IndexIDMap2):
        return type(faiss.downcast_index(index.index)) is type(faiss.downcast_index(want.index))
    return True
