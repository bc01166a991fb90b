"""Data specs: which files make a data set, and loading them into memory once.

A SPEC (the ``--data`` argument of train, check, index and eval) is one of

* ``DIR`` -- one sub-directory per class, every regular file below it (recursively) is an item;
* ``FILE.csv`` -- a manifest with a ``path,label`` header (extra columns such as ``sha256,size`` are
  allowed); relative paths are resolved against the CSV's own directory, so a manifest travels with its
  files;
* ``idx:DIR`` / ``idx:DIR:train`` / ``idx:DIR:test`` -- an MNIST-format directory (Fashion-MNIST).

:func:`load_data` preprocesses every file exactly once, in worker processes, through
:func:`embedder.inputs.prepare_file` (IDX records through :func:`embedder.inputs.prepare_array`), and
returns ``uint8`` arrays in memory. Training then iterates in-memory tensors: decoding and LIEF parsing
cost far more than a training step of the small CNN, and paying them every epoch would leave the CPU
waiting on files. Files that cannot be used are skipped and counted per reason instead of failing the
run: a real directory of executables always holds a few scripts or truncated files.

Errors about the spec itself (missing path, bad manifest row, empty class directory, nothing usable)
are :class:`SpecError`, raised before any training starts.
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedder.errors import InputError, LookalikeError
from embedder.inputs import InputSpec, prepare_array, prepare_file, read_idx
from embedder.progress import progress_bar

SpecKind = Literal["dir", "csv", "idx"]
IdxSplit = Literal["train", "test"]

# Fashion-MNIST's class names by label index (Xiao et al. 2017, the dataset's README).
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# IDX file stems per natural split; ".gz" or plain files are both accepted.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UNREADABLE = "unreadable"
DUPLICATE = "duplicate"


class SpecError(LookalikeError, ValueError):
    """The data spec cannot give a data set: wrong path, malformed manifest, nothing usable."""

    code = "bad_data_spec"
    http_status = 400


@dataclass
class Skipped:
    """Files that could not be used, by reason code (``InputError.code``, "unreadable", "duplicate")."""

    counts: Counter[str] = field(default_factory=Counter)
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (path, code, message)

    def add(self, name: str, code: str, message: str) -> None:
        self.counts[code] += 1
        self.items.append((name, code, message))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line such as ``3 skipped: not_an_executable 2, duplicate 1`` (empty when none)."""
        if not self.counts:
            return ""
        parts = ", ".join(f"{code} {n}" for code, n in self.counts.most_common())
        return f"{self.total} skipped: {parts}"


@dataclass
class LabelledData:
    """A preprocessed data set held in memory; row ``i`` of every field describes the same item."""

    x: np.ndarray  # uint8 (N, C, S, S), already through embedder.inputs
    y: np.ndarray  # int64 (N,), indices into labels
    labels: list[str]  # sorted class names
    keys: list[str]  # sha256 of the file's bytes (IDX: of the record's raw pixel bytes)
    names: list[str]  # file paths; IDX records "train-images-idx3-ubyte.gz#123"
    skipped: Skipped = field(default_factory=Skipped)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: np.ndarray) -> LabelledData:
        """The items at ``idx``; labels keep their indices so ``y`` stays comparable across subsets."""
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledData(
            x=self.x[idx],
            y=self.y[idx],
            labels=list(self.labels),
            keys=[self.keys[i] for i in idx],
            names=[self.names[i] for i in idx],
            skipped=self.skipped,
        )

    def fingerprint(self) -> str:
        """sha256 over the sorted ``(key, label name)`` pairs, recorded in bundles.

        It names the data's content, not where it came from: the same files under another directory or
        in another order give the same fingerprint; one file more, less, changed or relabelled does not.
        """
        h = hashlib.sha256()
        for key, label in sorted(zip(self.keys, (self.labels[i] for i in self.y), strict=True)):
            h.update(f"{key}\t{label}\n".encode())
        return h.hexdigest()

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.y, minlength=len(self.labels))
        return {name: int(n) for name, n in zip(self.labels, counts, strict=True)}


@dataclass(frozen=True)
class DataSpec:
    kind: SpecKind
    path: Path
    split: IdxSplit | None = None  # idx only: None loads train and test, concatenated in that order

    def __str__(self) -> str:
        if self.kind != "idx":
            return str(self.path)
        return f"idx:{self.path}" + (f":{self.split}" if self.split else "")


# ---------------------------------------------------------------------------------------- parsing


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def parse_spec(text: str) -> DataSpec:
    """Parse ``DIR``, ``FILE.csv``, ``idx:DIR``, ``idx:DIR:train`` or ``idx:DIR:test``.

    Checks what is cheap to check (the path exists and has the right shape, a manifest has its header)
    so a typo fails at once; the contents are validated by :func:`list_files` and :func:`load_data`.
    """
    text = text.strip()
    if not text:
        raise SpecError("empty data spec: give a class directory, a CSV manifest or idx:DIR")
    if text.startswith("idx:"):
        rest, split = text[4:], None
        for name in ("train", "test"):
            if rest.endswith(":" + name):
                rest, split = rest[: -len(name) - 1], name
        directory = Path(rest).expanduser()
        if not directory.is_dir():
            raise SpecError(f"idx spec {text!r}: {directory} is not a directory")
        for part in (split,) if split else ("train", "test"):
            for stem in IDX_FILES[part]:
                if _idx_file(directory, stem) is None:
                    raise SpecError(f"idx spec {text!r}: {directory} has no {stem}(.gz)")
        return DataSpec("idx", directory, split)
    path = Path(text).expanduser()
    if path.is_dir():
        return DataSpec("dir", path)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise SpecError(f"manifest {path} does not exist")
        _manifest_columns(path)
        return DataSpec("csv", path)
    if path.exists():
        raise SpecError(f"{path} is neither a class directory nor a .csv manifest")
    raise SpecError(f"data spec {text!r}: no such directory or .csv manifest")


def _manifest_columns(path: Path) -> tuple[int, int]:
    """Column indices of ``path`` and ``label`` in the manifest's header."""
    with path.open(newline="", encoding="utf-8-sig") as f:  # tolerate a BOM (spreadsheets)
        header = next(csv.reader(f), None)
    if not header:
        raise SpecError(f"manifest {path}: empty file; the first line must be the header 'path,label'")
    names = [h.strip().lower() for h in header]
    if "path" not in names or "label" not in names:
        raise SpecError(
            f"manifest {path}: line 1 must be a header naming the columns 'path' and 'label' "
            f"(got {','.join(header)!r})"
        )
    return names.index("path"), names.index("label")


# ---------------------------------------------------------------------------------------- listing


def _class_dir_files(directory: Path) -> list[Path]:
    """Regular files below a class directory, sorted, skipping hidden files and directories."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if not name.startswith(".") and p.is_file():
                out.append(p)
    return out


def _list_dir(spec: DataSpec) -> list[tuple[Path, str]]:
    class_dirs = sorted(p for p in spec.path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SpecError(f"{spec.path}: no class sub-directories (expected one directory per class)")
    out: list[tuple[Path, str]] = []
    for d in class_dirs:
        files = _class_dir_files(d)
        if not files:
            raise SpecError(f"{spec.path}: class directory {d.name!r} holds no files")
        out.extend((p, d.name) for p in files)
    return out


def _list_csv(spec: DataSpec) -> list[tuple[Path, str]]:
    path_col, label_col = _manifest_columns(spec.path)
    base = spec.path.parent
    out: list[tuple[Path, str]] = []
    with spec.path.open(newline="", encoding="utf-8-sig") as f:  # tolerate a BOM (spreadsheets)
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue  # blank lines are harmless
            if len(row) <= max(path_col, label_col):
                raise SpecError(
                    f"manifest {spec.path}, line {line}: {len(row)} column(s), the header needs "
                    f"{max(path_col, label_col) + 1}: {','.join(row)!r}"
                )
            file, label = row[path_col].strip(), row[label_col].strip()
            if not file or not label:
                raise SpecError(f"manifest {spec.path}, line {line}: empty path or label: {','.join(row)!r}")
            p = Path(file).expanduser()
            out.append((p if p.is_absolute() else base / p, label))
    if not out:
        raise SpecError(f"manifest {spec.path}: a header but no rows")
    return out


def list_files(spec: DataSpec) -> list[tuple[Path, str]]:
    """``(path, label)`` for every item of a dir or csv spec, in a stable order.

    A manifest row whose file is missing is not an error here: it is skipped as "unreadable" when
    loading, like a file that vanished from a directory.
    """
    if spec.kind == "dir":
        return _list_dir(spec)
    if spec.kind == "csv":
        return _list_csv(spec)
    raise SpecError(f"{spec}: idx specs hold records, not files; use load_data")


# ---------------------------------------------------------------------------------------- loading


def _limit(labels: Sequence[str], k: int | None, seed: int) -> np.ndarray:
    """Indices keeping at most ``k`` items per label (a seeded random choice), in original order."""
    n = len(labels)
    if k is None:
        return np.arange(n)
    if k < 1:
        raise SpecError(f"limit_per_class must be at least 1, not {k}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    keep: list[int] = []
    for lab in sorted(by_label):
        idx = by_label[lab]
        keep.extend(idx if len(idx) <= k else rng.choice(idx, size=k, replace=False).tolist())
    return np.array(sorted(keep), dtype=np.int64)


_Result = tuple[np.ndarray | None, str, str]  # (array, sha256 or error code, message)

_worker_spec: InputSpec | None = None
_worker_raw = False


def _init_worker(spec: InputSpec, allow_raw: bool) -> None:
    global _worker_spec, _worker_raw
    _worker_spec, _worker_raw = spec, allow_raw


def _prepare_path(path: str) -> _Result:
    assert _worker_spec is not None
    try:
        prepared = prepare_file(path, _worker_spec, allow_raw=_worker_raw)
    except InputError as exc:
        return None, exc.code, str(exc)
    except OSError as exc:
        return None, UNREADABLE, f"{type(exc).__name__}: {exc.strerror or exc}"
    return prepared.array, prepared.sha256, ""


def _progress(it: Iterator[_Result], total: int, desc: str, enabled: bool) -> Iterator[_Result]:
    return iter(progress_bar(it, enabled=enabled, total=total, desc=desc, unit="file"))


def process_pool(
    workers: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
) -> ProcessPoolExecutor:
    """Worker processes for file preprocessing, started by fork.

    Fork, not spawn or forkserver: those re-import the caller's ``__main__`` in every worker, which
    fails for stdin and notebooks and re-runs scripts without a main guard; fork also skips re-importing
    LIEF. Forking a process that holds torch's thread pools is safe here because the workers only run
    numpy, Pillow and LIEF code, never torch.
    """
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("fork"),
        initializer=_die_with_parent,
        initargs=(initializer, initargs),
    )


def _die_with_parent(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """Make the worker exit when its parent dies, then run the caller's initializer.

    A forked worker holds both ends of the pool's task pipe, so when the parent is killed (SIGKILL, OOM)
    it never reads EOF and would wait forever; Linux can deliver it a signal instead.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def _prepare_files(
    paths: list[str], spec: InputSpec, allow_raw: bool, workers: int, progress: bool
) -> list[_Result]:
    """Preprocess files in ``workers`` processes (inline for one), results in input order."""
    if workers <= 1 or len(paths) <= 1:
        _init_worker(spec, allow_raw)
        return list(_progress(map(_prepare_path, paths), len(paths), "preprocessing", progress))
    chunksize = max(1, min(64, len(paths) // (workers * 8)))
    with process_pool(workers, _init_worker, (spec, allow_raw)) as pool:
        results = pool.map(_prepare_path, paths, chunksize=chunksize)
        return list(_progress(results, len(paths), "preprocessing", progress))


def _collect(
    names: list[str], labels: list[str], results: list[_Result], spec_text: str, input_spec: InputSpec
) -> LabelledData:
    """Drop failures and duplicates (first occurrence wins) and stack what is left."""
    skipped = Skipped()
    first_by_key: dict[str, str] = {}
    arrays: list[np.ndarray] = []
    keep_keys: list[str] = []
    keep_names: list[str] = []
    keep_labels: list[str] = []
    for name, label, (array, key, message) in zip(names, labels, results, strict=True):
        if array is None:
            skipped.add(name, key, message)
            continue
        if key in first_by_key:
            skipped.add(name, DUPLICATE, f"same bytes as {first_by_key[key]}")
            continue
        first_by_key[key] = name
        arrays.append(array)
        keep_keys.append(key)
        keep_names.append(name)
        keep_labels.append(label)
    if not arrays:
        why = skipped.summary() or "no files"
        raise SpecError(
            f"{spec_text}: no usable {input_spec.modality} inputs ({why}); "
            f"check --modality and that the files are {input_spec.modality}s"
        )
    classes = sorted(set(keep_labels))
    index = {c: i for i, c in enumerate(classes)}
    return LabelledData(
        x=np.stack(arrays).astype(np.uint8, copy=False),
        y=np.array([index[c] for c in keep_labels], dtype=np.int64),
        labels=classes,
        keys=keep_keys,
        names=keep_names,
        skipped=skipped,
    )


def idx_class_names(directory: Path) -> tuple[str, ...]:
    """Fashion-MNIST's names when the directory says so, else the digits ``"0"`` .. ``"9"``."""
    if "fashion" in str(directory).lower():
        return FASHION_CLASSES
    return tuple(str(i) for i in range(10))


def _load_idx(
    spec: DataSpec, input_spec: InputSpec, limit: int | None, seed: int, progress: bool
) -> LabelledData:
    """IDX records through prepare_array, inline: they are decoded pixels already, and at ~30 us a
    record the 70,000 of Fashion-MNIST take about two seconds, less than starting worker processes."""
    if input_spec.modality != "image":
        raise SpecError(f"{spec}: IDX records are images; use an image input spec (--modality image)")
    class_names = idx_class_names(spec.path)
    names: list[str] = []
    labels: list[str] = []
    results: list[_Result] = []
    for part in (spec.split,) if spec.split else ("train", "test"):
        img_stem, lab_stem = IDX_FILES[part]
        img_file, lab_file = _idx_file(spec.path, img_stem), _idx_file(spec.path, lab_stem)
        if img_file is None or lab_file is None:
            raise SpecError(f"{spec}: {spec.path} has no {img_stem}(.gz) / {lab_stem}(.gz)")
        try:
            images, targets = read_idx(img_file), read_idx(lab_file)
        except (InputError, OSError) as exc:
            raise SpecError(f"{spec}: {exc}") from exc
        if images.ndim not in (3, 4) or targets.ndim != 1 or len(images) != len(targets):
            raise SpecError(f"{spec}: {img_file.name} {images.shape} does not match {lab_file.name}")
        if targets.size and int(targets.max()) >= len(class_names):
            raise SpecError(f"{spec}: label {int(targets.max())} out of range for {len(class_names)} classes")
        part_labels = [class_names[int(t)] for t in targets]
        keep = _limit(part_labels, limit, seed)
        records = progress_bar(keep, enabled=progress, desc=f"preparing {part}", unit="rec")
        for i in records:
            record = images[i]
            results.append(
                (prepare_array(record, input_spec), hashlib.sha256(record.tobytes()).hexdigest(), "")
            )
            names.append(f"{img_file.name}#{i}")
            labels.append(part_labels[i])
    return _collect(names, labels, results, str(spec), input_spec)


def load_data(
    spec: DataSpec | str,
    input_spec: InputSpec,
    *,
    workers: int | None = None,
    progress: bool = True,
    limit_per_class: int | None = None,
    allow_raw: bool = False,
    seed: int = 0,
) -> LabelledData:
    """Read and preprocess a whole data set into memory, once.

    ``workers`` defaults to every CPU. ``limit_per_class`` keeps at most that many items per class,
    chosen by ``seed`` before anything is read (a skipped file is not replaced); for ``idx:DIR`` it
    applies to the train and test parts separately, so the natural split keeps both sides. Exact
    duplicates (same sha256) keep their first occurrence in spec order and count as "duplicate".
    Labels are the sorted class names of the items kept; for IDX data that is the class names sorted,
    so ``y`` is not the IDX label number (use ``labels[y]``, never the raw number).
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.kind == "idx":
        return _load_idx(spec, input_spec, limit_per_class, seed, progress)
    files = list_files(spec)
    keep = _limit([label for _, label in files], limit_per_class, seed)
    files = [files[i] for i in keep]
    paths = [str(p) for p, _ in files]
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    results = _prepare_files(paths, input_spec, allow_raw, n_workers, progress)
    return _collect(paths, [label for _, label in files], results, str(spec), input_spec)
