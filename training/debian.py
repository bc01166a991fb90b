"""A labelled data set of executables from the machine itself: ELF/PE files by Debian source package.

Every installed file belongs to a binary package, and binary packages built from one source package
(``coreutils``, ``glibc``, ``llvm-toolchain-19``) share code, compiler and build flags: that source
package is the executable's "family", the same role a malware family plays elsewhere. The labels come
from dpkg's database, so they are ground truth rather than guesses from file names.

Steps: walk the roots (no symlinked directories, each real file once, 4 bytes read for the magic), ask
dpkg which package owns each file (batched, with usrmerge aliases), confirm each file is a parsable
executable with :func:`embedder.inputs.detect_executable` while hashing it in worker processes, drop
exact duplicates (sha256) and families smaller than ``min_family``. What was dropped, and why, is
counted so the summary can say where the files went.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embedder.dataspec import process_pool
from embedder.errors import InputError, LookalikeError
from embedder.inputs import DEFAULT_MAX_BYTES, detect_executable
from embedder.progress import progress_bar

# ELF from the usual places, plus the Windows PE stubs and plugins of Debian's `nsis` package where it is
# installed (the MinGW runtime DLLs are under /usr/lib already). Missing roots are skipped.
DEFAULT_ROOTS = (
    Path("/usr/bin"),
    Path("/usr/sbin"),
    Path("/usr/lib"),
    Path("/usr/libexec"),
    Path("/usr/share/nsis"),
)
MAGICS = (b"\x7fELF", b"MZ")
# Top-level directories that usrmerge turned into symlinks into /usr: dpkg may record a file under
# either name (a package built before the merge says /lib/x86_64-linux-gnu/..., the disk says /usr/lib).
USRMERGE_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Keep each dpkg-query command line far below ARG_MAX.
_ARGS_CHARS = 100_000


class DebianError(LookalikeError):
    """dpkg is missing or failed: the labels cannot be had on this machine."""

    code = "dpkg_unavailable"


@dataclass(frozen=True)
class ManifestRow:
    path: Path
    label: str  # Debian source package
    sha256: str
    size: int


@dataclass
class Manifest:
    """The kept rows plus what was dropped: keys of ``dropped`` are ``unknown_to_dpkg``,
    ``not_an_executable``, ``too_large``, ``unreadable``, ``duplicate`` and ``small_family``."""

    rows: list[ManifestRow]
    found: int
    dropped: Counter[str] = field(default_factory=Counter)
    small_families: int = 0
    seconds: float = 0.0

    def families(self) -> list[tuple[str, int, int]]:
        """``(family, files, bytes)`` sorted by files (descending), then name."""
        files: Counter[str] = Counter()
        size: Counter[str] = Counter()
        for row in self.rows:
            files[row.label] += 1
            size[row.label] += row.size
        return sorted(((f, files[f], size[f]) for f in files), key=lambda t: (-t[1], t[0]))


# ---------------------------------------------------------------------------------------- finding


def _has_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(MAGICS)


def find_executables(roots: Iterable[Path]) -> Iterator[Path]:
    """Real paths of the regular files under ``roots`` that start with an ELF or MZ magic.

    Symlinked directories are not followed (``/usr/lib`` has cycles and aliases); a symlink to a file
    counts as the file it points to, and each real path is yielded once however many links reach it.
    A root that is itself a symlink (``/lib``) is resolved. Unreadable entries are skipped silently:
    they cannot become training data anyway. Only 4 bytes of each file are read here.
    """
    seen: set[str] = set()
    for root in roots:
        start = os.path.realpath(root)
        if os.path.isfile(start):
            if start not in seen and _has_magic(start):
                seen.add(start)
                yield Path(start)
            continue
        stack = [start]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            subdirs = []
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                        continue
                    if entry.is_symlink():
                        real = os.path.realpath(entry.path)
                        if not os.path.isfile(real):
                            continue
                    elif entry.is_file(follow_symlinks=False):
                        real = entry.path
                    else:
                        continue  # sockets, FIFOs, devices: opening a FIFO would block
                except OSError:
                    continue
                if real in seen:
                    continue
                seen.add(real)
                if _has_magic(real):
                    yield Path(real)
            stack.extend(reversed(subdirs))  # depth-first in name order


# ---------------------------------------------------------------------------------------- labelling


def _aliases(path: str) -> list[str]:
    """``path`` and its other name across the usrmerge symlinks (``/usr/lib/x`` <-> ``/lib/x``)."""
    out = [path]
    for d in USRMERGE_DIRS:
        if path.startswith(f"/usr/{d}/"):
            out.append(path[len("/usr") :])
        elif path.startswith(f"/{d}/"):
            out.append("/usr" + path)
    return out


def _glob_escape(path: str) -> str:
    # dpkg -S treats *, ?, [ and \ as a glob pattern; escaped, the path matches only itself.
    return "".join("\\" + c if c in "*?[]\\" else c for c in path)


def _dpkg(args: list[str]) -> str:
    try:
        proc = subprocess.run(["dpkg-query", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise DebianError("dpkg-query not found: Debian package labels need a Debian-based system") from exc
    # `dpkg-query -S` exits 1 when some paths are unknown; that is an answer, not a failure.
    if proc.returncode not in (0, 1):
        raise DebianError(f"dpkg-query {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc.stdout


def _owners(paths: list[str]) -> dict[str, str]:
    """dpkg's owning binary package for each path it knows, in as few calls as the command line allows."""
    owners: dict[str, str] = {}
    batch: list[str] = []
    size = 0

    def flush() -> None:
        for line in _dpkg(["-S", *batch]).splitlines():
            # "pkg1, pkg2:amd64: /path"; diversions print "diversion by pkg from: /path" and are skipped.
            if line.startswith(("diversion by ", "local diversion ")):
                continue
            packages, sep, path = line.partition(": ")
            if sep and path.startswith("/"):
                first = packages.split(", ")[0].split(":")[0].strip()
                owners.setdefault(path, first)

    for p in paths:
        arg = _glob_escape(p)
        if size + len(arg) > _ARGS_CHARS and batch:
            flush()
            batch, size = [], 0
        batch.append(arg)
        size += len(arg) + 1
    if batch:
        flush()
    return owners


def _source_packages() -> dict[str, str]:
    """Binary package -> source package for every installed package (one dpkg-query call)."""
    out: dict[str, str] = {}
    for line in _dpkg(["-W", "-f", "${Package} ${source:Package}\n"]).splitlines():
        parts = line.split()
        if parts:
            out[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
    return out


def debian_source_package(paths: Iterable[Path]) -> dict[Path, str]:
    """Source package of every path dpkg knows; paths it does not know are left out of the result.

    Each path is asked under its own name and its usrmerge alias, all in batched ``dpkg-query -S``
    calls (dpkg reads its whole file database once per call, so one call per file would take minutes).
    """
    paths = list(paths)
    queries = [_aliases(str(p)) for p in paths]
    owners = _owners(sorted({q for qs in queries for q in qs}))
    sources = _source_packages()
    out: dict[Path, str] = {}
    for p, qs in zip(paths, queries, strict=True):
        binary = next((owners[q] for q in qs if q in owners), None)
        if binary is not None:
            out[p] = sources.get(binary, binary)
    return out


# ---------------------------------------------------------------------------------------- inspecting

_Inspected = tuple[str, str, int, str]  # (path, sha256 or "", size, drop reason or "")


def _inspect(path: str, max_bytes: int) -> _Inspected:
    """Hash one file and confirm it parses as an executable; runs in a worker process."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            return path, "", size, "too_large"
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return path, "", 0, "unreadable"
    try:
        detect_executable(data)
    except InputError as exc:
        return path, "", len(data), exc.code
    return path, hashlib.sha256(data).hexdigest(), len(data), ""


def _inspect_all(paths: list[str], max_bytes: int, workers: int, progress: bool) -> list[_Inspected]:
    if workers <= 1 or len(paths) < 16:
        it: Iterable[_Inspected] = (_inspect(p, max_bytes) for p in paths)
        return list(progress_bar(it, enabled=progress, total=len(paths), desc="hashing", unit="file"))
    with process_pool(workers) as pool:
        it = pool.map(_inspect, paths, [max_bytes] * len(paths), chunksize=4)
        return list(progress_bar(it, enabled=progress, total=len(paths), desc="hashing", unit="file"))


def build_manifest(
    roots: Iterable[Path] = DEFAULT_ROOTS,
    min_family: int = 8,
    progress: bool = True,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    workers: int | None = None,
) -> Manifest:
    """Label every ELF/PE file under ``roots`` by Debian source package; see the module docstring.

    Files over ``max_bytes`` are dropped (``too_large``) because training would refuse them with the
    same default limit. Of exact duplicates the first path in sorted order is kept, so the manifest does
    not depend on walk order. Rows are sorted by family, then path.
    """
    t0 = time.perf_counter()
    found = sorted(find_executables(roots))
    labels = debian_source_package(found)
    dropped: Counter[str] = Counter()
    dropped["unknown_to_dpkg"] = len(found) - len(labels)
    known = sorted(str(p) for p in labels)
    n_workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    rows: list[ManifestRow] = []
    kept_sha: set[str] = set()
    for path, sha, size, reason in _inspect_all(known, max_bytes, n_workers, progress):
        if reason:
            dropped[reason] += 1
        elif sha in kept_sha:
            dropped["duplicate"] += 1
        else:
            kept_sha.add(sha)
            rows.append(ManifestRow(Path(path), labels[Path(path)], sha, size))
    sizes = Counter(r.label for r in rows)
    small = {f for f, n in sizes.items() if n < min_family}
    dropped["small_family"] = sum(sizes[f] for f in small)
    rows = sorted((r for r in rows if r.label not in small), key=lambda r: (r.label, str(r.path)))
    return Manifest(rows, len(found), dropped, len(small), time.perf_counter() - t0)


def write_manifest(manifest: Manifest, out: Path) -> None:
    """Write ``path,label,sha256,size`` rows (a manifest SPEC for training), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "sha256", "size"])
        for r in manifest.rows:
            writer.writerow([str(r.path), r.label, r.sha256, r.size])
    tmp.replace(out)
