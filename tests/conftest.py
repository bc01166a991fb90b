"""Shared fixtures: real executables and images from this machine, made or found, never mocked."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see lookalike/cli.py

import csv
import hashlib
import io
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.launch import LOOKALIKE

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


@pytest.fixture(scope="session")
def elf_path() -> Path:
    return Path("/usr/bin/ls")


@pytest.fixture(scope="session")
def pe_path() -> Path:
    """A real Windows PE: setuptools' launcher in our own venv, else NSIS or MinGW files from Debian."""
    site = Path(sysconfig.get_paths()["purelib"])
    found = _first_existing(
        [
            site / "setuptools" / "cli-64.exe",
            site / "pip" / "_vendor" / "distlib" / "t64.exe",
            *sorted(Path("/usr/share/nsis").rglob("*.exe"))[:1],
            *sorted(Path("/usr/lib/gcc/x86_64-w64-mingw32").rglob("*.dll"))[:1],
        ]
    )
    if found is None:
        pytest.skip("no PE file on this machine (install nsis or gcc-mingw-w64-x86-64-win32-runtime)")
    return found


@pytest.fixture(scope="session")
def small_elfs() -> list[Path]:
    """A dozen distinct small ELF executables from /usr/bin."""
    out = []
    for p in sorted(Path("/usr/bin").iterdir()):
        if p.is_file() and not p.is_symlink() and 10_000 < p.stat().st_size < 400_000:
            with p.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(p)
        if len(out) == 12:
            break
    return out


def image_bytes(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    return image_bytes("PNG")


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    return image_bytes("JPEG")


def png_bomb_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's signature)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------- real processes: CLI and server


E2E_FAMILIES = ("coreutils", "util-linux", "systemd", "openjdk-17")


def run_cli(*args: object, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(LOOKALIKE), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"lookalike {args} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def family_files() -> dict[str, list[Path]]:
    """Up to 24 distinct small ELF files from /usr/bin for each of four Debian source packages."""
    return debian_family_files(E2E_FAMILIES, 24)


def debian_family_files(families: tuple[str, ...], cap: int) -> dict[str, list[Path]]:
    """Up to ``cap`` distinct ELF files under 3 MB from /usr/bin for each family (skip if one has < 8)."""
    from training.debian import debian_source_package, find_executables

    paths = [p for p in find_executables([Path("/usr/bin")]) if p.stat().st_size < 3_000_000]
    labels = debian_source_package(paths)
    out: dict[str, list[Path]] = {f: [] for f in families}
    seen: set[str] = set()
    for p in sorted(paths):
        family = labels.get(p)
        if family in out and len(out[family]) < cap:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                out[family].append(p)
    missing = [f for f, files in out.items() if len(files) < 8]
    if missing:
        pytest.skip(f"this machine lacks the families {missing}")
    return out


@pytest.fixture(scope="session")
def family_split(family_files, tmp_path_factory) -> tuple[Path, Path, list[tuple[Path, str]]]:
    """(train manifest, index manifest, held-out queries): 4 queries per family are never trained on."""
    root = tmp_path_factory.mktemp("families")
    train, queries = [], []
    for family, files in family_files.items():
        queries += [(p, family) for p in files[:4]]
        train += [(p, family) for p in files[4:]]
    manifest = root / "train.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(train)
    return manifest, manifest, queries


@pytest.fixture(scope="session")
def exec_bundle(family_split, tmp_path_factory) -> Path:
    """A small executable model trained by the real CLI on the e2e families (about a minute)."""
    manifest, _, _ = family_split
    out = tmp_path_factory.mktemp("models") / "exec"
    # cumulative statistics averaged over the last epoch only: over all epochs of a run this short they
    # would lag the weights, and the gate would rightly refuse the model.
    run_cli(
        *(
            "train",
            "--data",
            manifest,
            "--modality",
            "executable",
            "--norm",
            "cumulative",
            "--reset-each-epoch",
        ),
        *("--split", "none", "--epochs", "12", "--batch-size", "16", "--seed", "0", "--out", out),
    )
    return out


def write_config(
    path: Path, store: Path, bundles: dict[str, Path], keys: tuple[str, ...] = ("e2e-key-123",)
) -> Path:
    lines = [f'store = "{store}"', f"api_keys = {list(keys)!r}".replace("'", '"'), "max_upload_mb = 8"]
    for name, bundle in bundles.items():
        lines += [f"[collections.{name}]", f'model = "{bundle}"']
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
