"""The Debian family manifest, on this machine's own files and dpkg database."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from embedder.dataspec import list_files, parse_spec
from training import cli_dataset
from training.debian import build_manifest, debian_source_package, find_executables, write_manifest

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs dpkg (a Debian system)")

COREUTILS = [
    "ls",
    "cat",
    "cp",
    "mv",
    "rm",
    "mkdir",
    "chmod",
    "date",
    "touch",
    "echo",
    "head",
    "tail",
    "sort",
    "wc",
]
BZIP2_SAME = ["bunzip2", "bzcat", "bzip2"]  # one program installed under three names


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _bin(name: str) -> Path:
    p = Path("/usr/bin") / name
    if not p.is_file():
        pytest.skip(f"/usr/bin/{name} is not installed")
    return p


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Symlinks into /usr/bin (dpkg knows their targets), plus things the manifest must not keep."""
    d = tmp_path_factory.mktemp("root")
    same = [_bin(n) for n in BZIP2_SAME]
    if len({_sha(p) for p in same}) != 1:
        pytest.skip("bunzip2, bzcat and bzip2 are not byte-identical here")
    for name in [*COREUTILS, *BZIP2_SAME, "bzip2recover", "dpkg"]:
        (d / f"link-{name}").symlink_to(_bin(name))
    (d / "again-ls").symlink_to("/usr/bin/ls")  # a second link to the same file: found once
    shutil.copy("/usr/bin/ls", d / "copied-ls")  # same bytes as ls, but dpkg does not know this path
    (d / "notes.txt").write_text("not an executable\n")
    (d / "sbin").symlink_to("/usr/sbin", target_is_directory=True)  # a symlinked directory: not followed
    os.mkfifo(d / "pipe")  # opening a FIFO would block the walk
    return d


def test_find_executables(root: Path) -> None:
    found = list(find_executables([root]))
    expected = {Path(os.path.realpath(_bin(n))) for n in [*COREUTILS, *BZIP2_SAME, "bzip2recover", "dpkg"]}
    assert set(found) == expected | {root / "copied-ls"}
    assert len(found) == len(set(found))  # ls reached by two links is listed once
    assert not any(str(p).startswith("/usr/sbin") for p in found)


def test_find_executables_sees_pe_files(tmp_path: Path) -> None:
    pe = (
        next(iter(sorted(Path("/usr/share/nsis").rglob("*.exe"))), None)
        if Path("/usr/share/nsis").is_dir()
        else None
    )
    if pe is None:
        pytest.skip("nsis is not installed")
    shutil.copy(pe, tmp_path / "stub.exe")
    (tmp_path / "fake.exe").write_bytes(b"PK\x03\x04 not a PE")
    assert list(find_executables([tmp_path])) == [tmp_path / "stub.exe"]


def test_source_packages() -> None:
    libc = Path(os.path.realpath("/usr/lib/x86_64-linux-gnu/libc.so.6"))
    asked = [_bin("ls"), _bin("dpkg"), Path("/tmp/not-a-package-file")]
    if libc.is_file():
        asked.append(libc)  # dpkg records it as /lib/x86_64-linux-gnu/libc.so.6 (usrmerge)
    labels = debian_source_package(asked)
    assert labels[Path("/usr/bin/ls")] == "coreutils"
    assert labels[Path("/usr/bin/dpkg")] == "dpkg"
    assert Path("/tmp/not-a-package-file") not in labels
    if libc.is_file():
        assert labels[libc] == "glibc"


def test_pe_files_have_families() -> None:
    dlls = sorted(Path("/usr/lib/gcc/x86_64-w64-mingw32").rglob("*.dll"))[:2]
    if not dlls:
        pytest.skip("gcc-mingw-w64-x86-64-win32-runtime is not installed")
    labels = debian_source_package(dlls)
    assert set(labels.values()) == {"gcc-mingw-w64"}


def test_build_manifest_drops_duplicates_and_small_families(root: Path) -> None:
    manifest = build_manifest([root], min_family=2, progress=False, workers=2)
    by_family: dict[str, list[str]] = {}
    for row in manifest.rows:
        by_family.setdefault(row.label, []).append(row.path.name)
    assert sorted(by_family) == ["bzip2", "coreutils"]
    assert sorted(by_family["coreutils"]) == sorted(COREUTILS)
    assert by_family["bzip2"] == ["bunzip2", "bzip2recover"]  # first of the identical three in sorted order
    assert manifest.found == len(COREUTILS) + len(BZIP2_SAME) + 3
    assert manifest.dropped["unknown_to_dpkg"] == 1  # copied-ls
    assert manifest.dropped["duplicate"] == 2
    assert manifest.dropped["small_family"] == 1 and manifest.small_families == 1  # dpkg, one file
    assert len({r.sha256 for r in manifest.rows}) == len(manifest.rows)
    for row in manifest.rows[:3]:
        assert row.sha256 == _sha(row.path) and row.size == row.path.stat().st_size
    assert manifest.families()[0][:2] == ("coreutils", len(COREUTILS))
    inline = build_manifest([root], min_family=2, progress=False, workers=1)
    assert inline.rows == manifest.rows


def test_manifest_is_a_data_spec(root: Path, tmp_path: Path) -> None:
    manifest = build_manifest([root], min_family=2, progress=False, workers=1)
    out = tmp_path / "sub" / "manifest.csv"
    write_manifest(manifest, out)
    assert out.read_text().splitlines()[0] == "path,label,sha256,size"
    files = list_files(parse_spec(str(out)))
    assert [(p, label) for p, label in files] == [(r.path, r.label) for r in manifest.rows]


def test_cli_prints_families_and_summary(root: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    cli_dataset.register(app)
    out = tmp_path / "m.csv"
    args = ["dataset", "debian", "--root", str(root), "--out", str(out), "--min-family", "2", "--no-progress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    coreutils_row = next(line for line in lines if "coreutils" in line)
    assert f" {len(COREUTILS)} " in coreutils_row
    assert next(line for line in lines if "exact duplicates" in line).split()[-2] == "2"
    assert next(line for line in lines if "kept, in 2 families" in line).split()[-2] == str(
        len(COREUTILS) + 2
    )
    assert len(out.read_text().splitlines()) == 1 + len(COREUTILS) + 2
    missing = CliRunner().invoke(
        app, ["dataset", "debian", "--root", str(tmp_path / "nope"), "--out", str(out)]
    )
    assert missing.exit_code == 2 and "no such root" in missing.output
