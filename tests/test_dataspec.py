"""Data specs on real files: ELF binaries from /usr/bin, Fashion-MNIST, IDX files written in the format."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedder.dataspec import FASHION_CLASSES, DataSpec, SpecError, list_files, load_data, parse_spec
from embedder.inputs import InputSpec, prepare_array, prepare_file, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
EXE = InputSpec.for_modality("executable", size=32)
IMG = InputSpec.for_modality("image")


@pytest.fixture(scope="module")
def elfs() -> list[Path]:
    """Seven small ELF files from /usr/bin with pairwise different bytes (hard links are common)."""
    out: list[Path] = []
    seen: set[str] = set()
    for p in sorted(Path("/usr/bin").iterdir()):
        if p.is_symlink() or not p.is_file() or not 8_000 < p.stat().st_size < 200_000:
            continue
        data = p.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if data[:4] == b"\x7fELF" and digest not in seen:
            seen.add(digest)
            out.append(p)
        if len(out) == 7:
            return out
    pytest.skip("fewer than 7 small ELF files in /usr/bin")


def _class_dirs(root: Path, classes: dict[str, list[Path]]) -> Path:
    for name, files in classes.items():
        (root / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / name / f.name)
    return root


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (20, 24), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_idx(directory: Path, part: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write an MNIST-format pair the way the original files are laid out (big-endian header, gzip)."""
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    img_header = struct.pack(">BBBBIII", 0, 0, 0x08, 3, *images.shape)
    lab_header = struct.pack(">BBBBI", 0, 0, 0x08, 1, len(labels))
    (directory / (stems[part][0] + ".gz")).write_bytes(gzip.compress(img_header + images.tobytes()))
    (directory / (stems[part][1] + ".gz")).write_bytes(gzip.compress(lab_header + labels.tobytes()))


# ----------------------------------------------------------------------------------- parsing errors


def test_parse_spec_kinds(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("path,label\n")
    assert parse_spec(str(tmp_path)) == DataSpec("dir", tmp_path)
    assert parse_spec(str(csv_file)) == DataSpec("csv", csv_file)
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        _write_idx(
            tmp_path, part, rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4, dtype=np.uint8)
        )
    assert parse_spec(f"idx:{tmp_path}") == DataSpec("idx", tmp_path, None)
    assert parse_spec(f"idx:{tmp_path}:test") == DataSpec("idx", tmp_path, "test")
    assert parse_spec(f"idx:{tmp_path}:train").split == "train"


def test_missing_paths_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such directory"):
        parse_spec(str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(str(tmp_path / "nope.csv"))
    with pytest.raises(SpecError, match="not a directory"):
        parse_spec(f"idx:{tmp_path / 'nope'}")
    with pytest.raises(SpecError, match="t10k-images-idx3-ubyte"):
        parse_spec(f"idx:{tmp_path}:test")  # a directory without the IDX files
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SpecError, match=r"neither a class directory nor a \.csv"):
        parse_spec(str(tmp_path / "notes.txt"))


def test_manifest_without_header(tmp_path: Path, elfs: list[Path]) -> None:
    m = tmp_path / "m.csv"
    m.write_text(f"{elfs[0]},a\n")
    with pytest.raises(SpecError, match="line 1 must be a header"):
        parse_spec(str(m))


def test_bad_manifest_row_names_its_line(tmp_path: Path, elfs: list[Path]) -> None:
    m = tmp_path / "m.csv"
    m.write_text(f"path,label,size\n{elfs[0]},a,1\n\n{elfs[1]},,2\n")
    with pytest.raises(SpecError, match=r"line 4: empty path or label"):
        list_files(parse_spec(str(m)))
    m.write_text(f"path,label\n{elfs[0]},a\n{elfs[1]}\n")
    with pytest.raises(SpecError, match=r"line 3: 1 column"):
        load_data(str(m), EXE, progress=False)


def test_empty_class_dir(tmp_path: Path, elfs: list[Path]) -> None:
    _class_dirs(tmp_path, {"a": elfs[:2]})
    (tmp_path / "b").mkdir()
    with pytest.raises(SpecError, match="class directory 'b' holds no files"):
        load_data(str(tmp_path), EXE, progress=False)


def test_no_usable_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello\n")
    (tmp_path / "a" / "y.sh").write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(SpecError, match=r"no usable executable inputs \(2 skipped: not_an_executable 2\)"):
        load_data(str(tmp_path), EXE, workers=1, progress=False)


# ------------------------------------------------------------------------------------------ loading


def test_dir_spec_loads_and_skips(tmp_path: Path, elfs: list[Path]) -> None:
    _class_dirs(tmp_path, {"alpha": elfs[:3], "beta": elfs[3:5]})
    (tmp_path / "alpha" / "README").write_text("not an executable\n")
    data = load_data(str(tmp_path), EXE, workers=1, progress=False)
    assert data.x.shape == (5, 1, 32, 32) and data.x.dtype == np.uint8
    assert data.y.dtype == np.int64
    assert data.labels == ["alpha", "beta"]
    assert [data.labels[i] for i in data.y] == ["alpha"] * 3 + ["beta"] * 2
    assert dict(data.skipped.counts) == {"not_an_executable": 1}
    assert data.skipped.items[0][0].endswith("README")
    for i, name in enumerate(data.names):
        prepared = prepare_file(name, EXE)  # the one preprocessing path, bit for bit
        assert data.keys[i] == prepared.sha256 == hashlib.sha256(Path(name).read_bytes()).hexdigest()
        np.testing.assert_array_equal(data.x[i], prepared.array)


def test_worker_processes_match_inline(tmp_path: Path, elfs: list[Path]) -> None:
    _class_dirs(tmp_path, {"a": elfs[:4], "b": elfs[4:]})
    inline = load_data(str(tmp_path), EXE, workers=1, progress=False)
    pooled = load_data(str(tmp_path), EXE, workers=2, progress=False)
    np.testing.assert_array_equal(inline.x, pooled.x)
    assert inline.keys == pooled.keys and inline.names == pooled.names
    assert inline.fingerprint() == pooled.fingerprint()


def test_duplicates_keep_the_first(tmp_path: Path, elfs: list[Path]) -> None:
    _class_dirs(tmp_path, {"a": elfs[:2], "b": [elfs[0], elfs[2]]})
    data = load_data(str(tmp_path), EXE, workers=1, progress=False)
    assert len(data.keys) == 3 and len(set(data.keys)) == 3
    assert data.skipped.counts["duplicate"] == 1
    dup_name = data.skipped.items[0][0]
    assert Path(dup_name).parent.name == "b"  # the copy under "a" comes first and stays
    assert data.class_counts() == {"a": 2, "b": 1}


def test_csv_manifest_relative_paths_and_fingerprint(tmp_path: Path, elfs: list[Path]) -> None:
    root = _class_dirs(tmp_path / "files", {"x": elfs[:2], "y": elfs[2:4]})
    by_dir = load_data(str(root), EXE, workers=1, progress=False)
    rows = [f"{label},ignored,files/{label}/{p.name}" for p, label in list_files(parse_spec(str(root)))]
    m = tmp_path / "m.csv"
    # Column order is free and extra columns are allowed; rows in reverse order.
    m.write_text("label,sha256,path\n" + "\n".join(reversed(rows)) + "\n")
    by_csv = load_data(str(m), EXE, workers=1, progress=False)
    assert by_csv.labels == ["x", "y"] and sorted(by_csv.keys) == sorted(by_dir.keys)
    assert by_csv.names[0] == str(tmp_path / "files" / "y" / elfs[3].name)
    # Same content and labels, another order and location: same fingerprint; relabelled: another one.
    assert by_csv.fingerprint() == by_dir.fingerprint()
    relabelled = by_dir.subset(np.arange(len(by_dir.keys)))
    relabelled.y = relabelled.y[::-1].copy()
    assert relabelled.fingerprint() != by_dir.fingerprint()


def test_missing_manifest_file_is_skipped_as_unreadable(tmp_path: Path, elfs: list[Path]) -> None:
    m = tmp_path / "m.csv"
    m.write_text(f"path,label\n{elfs[0]},a\ngone.bin,a\n")
    data = load_data(str(m), EXE, workers=1, progress=False)
    assert len(data.keys) == 1 and dict(data.skipped.counts) == {"unreadable": 1}


def test_executables_under_an_image_spec(tmp_path: Path, elfs: list[Path]) -> None:
    _class_dirs(tmp_path, {"a": elfs[:2]})
    (tmp_path / "a" / "pic.png").write_bytes(_png(1))
    data = load_data(str(tmp_path), IMG, workers=1, progress=False)
    assert data.names == [str(tmp_path / "a" / "pic.png")]
    assert data.x.shape == (1, 1, 28, 28)
    assert dict(data.skipped.counts) == {"corrupt_image": 2}
    (tmp_path / "a" / "pic.png").unlink()
    with pytest.raises(SpecError, match=r"no usable image inputs.*corrupt_image 2.*--modality"):
        load_data(str(tmp_path), IMG, workers=1, progress=False)


def test_limit_per_class_and_subset(tmp_path: Path, elfs: list[Path]) -> None:
    _class_dirs(tmp_path, {"a": elfs[:5], "b": elfs[5:7]})
    data = load_data(str(tmp_path), EXE, workers=1, progress=False, limit_per_class=2, seed=3)
    assert data.class_counts() == {"a": 2, "b": 2}
    again = load_data(str(tmp_path), EXE, workers=1, progress=False, limit_per_class=2, seed=3)
    assert again.names == data.names
    sub = data.subset(np.array([3, 0]))
    assert sub.names == [data.names[3], data.names[0]] and sub.labels == data.labels
    np.testing.assert_array_equal(sub.x[0], data.x[3])
    assert sub.y.tolist() == [data.y[3], data.y[0]]


# ---------------------------------------------------------------------------------------------- IDX


def test_idx_digits_resized_through_prepare_array(tmp_path: Path) -> None:
    digits = tmp_path / "digits"
    digits.mkdir()
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], dtype=np.uint8)
    _write_idx(digits, "train", images, labels)
    spec = InputSpec.for_modality("image", size=32)  # not the stored size: prepare_array resizes
    data = load_data(f"idx:{digits}:train", spec, progress=False)
    assert data.labels == ["1", "2", "3", "4", "5", "6", "8", "9"]
    assert [data.labels[i] for i in data.y] == [str(labels[int(n.rsplit("#", 1)[1])]) for n in data.names]
    assert len(data.keys) == 12 and data.x.shape == (12, 1, 32, 32)
    for i, name in enumerate(data.names):
        r = int(name.rsplit("#", 1)[1])
        np.testing.assert_array_equal(data.x[i], prepare_array(images[r], spec))
        assert data.keys[i] == hashlib.sha256(images[r].tobytes()).hexdigest()
    with pytest.raises(SpecError, match="IDX records are images"):
        load_data(f"idx:{digits}:train", EXE, progress=False)


@pytest.mark.fashion
@needs_fashion
def test_fashion_test_split_equals_prepare_array() -> None:
    data = load_data(f"idx:{FASHION}:test", IMG, progress=False, limit_per_class=15)
    raw_x = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    raw_y = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert data.x.shape == (150, 1, 28, 28) and data.labels == sorted(FASHION_CLASSES)
    assert set(data.class_counts().values()) == {15}
    records = [int(n.split("#")[1]) for n in data.names]
    assert all(n.startswith("t10k-images-idx3-ubyte.gz#") for n in data.names)
    expected = np.stack([prepare_array(raw_x[r], IMG) for r in records])
    np.testing.assert_array_equal(data.x, expected)
    np.testing.assert_array_equal(data.x[:, 0], raw_x[records])  # 28x28 grey: prepare_array is identity
    assert [data.labels[i] for i in data.y] == [FASHION_CLASSES[raw_y[r]] for r in records]


@pytest.mark.fashion
@needs_fashion
def test_fashion_both_parts_are_named() -> None:
    data = load_data(f"idx:{FASHION}", IMG, progress=False, limit_per_class=2)
    parts = [n.split("-")[0] for n in data.names]
    assert parts.count("train") == 20 and parts.count("t10k") == 20
    assert parts == sorted(parts, key=lambda p: p != "train")  # train first, then test
