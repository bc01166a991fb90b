"""The one preprocessing path: real executables and images in, typed errors for everything else."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from embedder.errors import (
    CorruptImage,
    DecompressionBomb,
    EmptyInput,
    InputError,
    InputTooLarge,
    NotAnExecutable,
)
from embedder.inputs import (
    InputSpec,
    bigram_array,
    detect_executable,
    image_array,
    nataraj_array,
    nataraj_width,
    prepare,
    prepare_array,
    prepare_file,
    read_file,
    read_idx,
)
from tests.conftest import FASHION, image_bytes, png_bomb_bytes

EXE = InputSpec.for_modality("executable")
IMG = InputSpec.for_modality("image")


def test_elf_from_usr_bin(elf_path):
    p = prepare_file(elf_path, EXE)
    assert p.format == "ELF"
    assert p.info is not None and p.info.arch == "X86_64"
    assert ".text" in p.info.sections
    assert p.array.shape == (1, 64, 64) and p.array.dtype == np.uint8
    assert p.size_bytes == elf_path.stat().st_size
    again = prepare(elf_path.read_bytes(), EXE)
    assert np.array_equal(p.array, again.array) and p.sha256 == again.sha256


def test_real_pe(pe_path):
    p = prepare_file(pe_path, EXE)
    assert p.format == "PE"
    assert p.info.arch in {"AMD64", "I386", "ARM64", "ARMNT"}
    assert p.info.sections  # a real PE has named sections


MACHO = Path(__file__).parent / "data" / "hello-macho.o"  # llvm-mc output; source and command beside it


def _universal(thin: bytes) -> bytes:
    """Wrap a thin Mach-O in a one-slice universal ("fat") file, as lipo would (slice at 4096)."""
    cputype, cpusubtype = struct.unpack_from("<II", thin, 4)
    header = struct.pack(">IIIIIII", 0xCAFEBABE, 1, cputype, cpusubtype, 4096, len(thin), 12)
    return header + b"\x00" * (4096 - len(header)) + thin


def test_real_macho_object():
    p = prepare_file(MACHO, EXE)
    assert p.format == "MachO" and p.info.arch == "X86_64"
    assert p.info.sections == ("__text", "__cstring")
    fat = prepare(_universal(MACHO.read_bytes()), EXE)
    assert fat.format == "MachO" and fat.info.sections == p.info.sections


@pytest.mark.parametrize("cut", [3, 20, 31, 100, 200])
def test_truncated_macho_is_refused(cut):
    # LIEF alone accepts every one of these from byte 16 on, as an empty Mach-O.
    thin = MACHO.read_bytes()
    with pytest.raises(NotAnExecutable):
        prepare(thin[:cut], EXE)
    fat = _universal(thin)
    with pytest.raises(NotAnExecutable):
        prepare(fat[: 4096 + cut], EXE)


@pytest.mark.parametrize(
    ("n", "width"),
    [
        (1, 32),
        (10 * 1024 - 1, 32),
        (10 * 1024, 64),
        (59_999, 128),
        (150_000, 384),
        (999_999, 768),
        (2 << 20, 1024),
    ],
)
def test_nataraj_width_table(n, width):
    assert nataraj_width(n) == width


def test_nataraj_layout_is_the_bytes_row_by_row():
    data = bytes(range(256)) * 4  # 1024 bytes -> width 32, 32 rows: at S=32 the resize is the identity
    plane = nataraj_array(data, 32)
    assert np.array_equal(plane, np.frombuffer(data, np.uint8).reshape(32, 32))


def test_nataraj_zero_pads_the_last_row():
    data = b"\xff" * 40  # width 32: row 0 full, row 1 holds 8 bytes then zeros
    plane = nataraj_array(data, 32)  # 2 rows area-resized to 32: top half 255, bottom mixes 255 and 0
    assert plane[0].min() == 255
    assert plane[-1, :8].min() == 255 and plane[-1, 8:].max() == 0


def test_bigram_counts_pairs():
    plane = bigram_array(b"\x01\x02" * 50, 256)
    assert set(zip(*np.nonzero(plane), strict=True)) == {(1, 2), (2, 1)}
    assert plane.max() == 255


def test_bigram_representation_in_spec(elf_path):
    spec = InputSpec(modality="executable", representation="bigram", size=64)
    p = prepare_file(elf_path, spec)
    assert p.array.shape == (1, 64, 64) and p.array.max() == 255


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_images_decode_to_spec(fmt):
    data = image_bytes(fmt, size=(40, 30))
    gray = prepare(data, IMG)
    assert gray.array.shape == (1, 28, 28) and gray.format == fmt
    rgb = prepare(data, InputSpec(modality="image", representation="pixels", size=32, channels=3))
    assert rgb.array.shape == (3, 32, 32)


def test_png_pixels_survive_exactly():
    data = image_bytes("PNG", size=(28, 28), mode="L", seed=3)
    from io import BytesIO

    from PIL import Image

    original = np.asarray(Image.open(BytesIO(data)))
    assert np.array_equal(prepare(data, IMG).array[0], original)


def _write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_goes_through_the_image_path(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (5, 20, 20), dtype=np.uint8)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    back = read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert np.array_equal(back, arr)
    for record in back:
        assert np.array_equal(prepare_array(record, IMG), image_array(record, 28, 1))


def test_idx_truncated_is_refused(tmp_path):
    arr = np.zeros((3, 4, 4), np.uint8)
    _write_idx(tmp_path / "t.gz", arr)
    with gzip.open(tmp_path / "t.gz") as f:
        raw = f.read()
    with gzip.open(tmp_path / "t.gz", "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(CorruptImage, match="header says"):
        read_idx(tmp_path / "t.gz")


@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_idx():
    x = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    y = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert np.array_equal(prepare_array(x[0], IMG)[0], x[0])  # 28x28 gray: the path keeps pixels exact


# ------------------------------------------------------------------------------------------ bad input


def _bad_inputs(elf: bytes, pe: bytes, png: bytes) -> dict[str, tuple[bytes, InputSpec, type[InputError]]]:
    rng = np.random.default_rng(1)
    return {
        "empty": (b"", EXE, EmptyInput),
        "random bytes": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), EXE, NotAnExecutable),
        "truncated ELF header": (elf[:30], EXE, NotAnExecutable),
        "ELF cut before its program headers": (elf[:100], EXE, NotAnExecutable),
        "truncated PE": (pe[:200], EXE, NotAnExecutable),
        "MZ then garbage": (b"MZ" + b"\x00" * 500, EXE, NotAnExecutable),
        "text file": (b"#!/bin/sh\necho hello\n" * 20, EXE, NotAnExecutable),
        "ELF magic only": (b"\x7fELF", EXE, NotAnExecutable),
        "corrupt PNG": (png[:60] + b"\x00" * 40, IMG, CorruptImage),
        "text as image": (b"hello world", IMG, CorruptImage),
        "ELF as image": (elf, IMG, CorruptImage),
        "decompression bomb": (png_bomb_bytes(), IMG, DecompressionBomb),
        "empty image": (b"", IMG, EmptyInput),
    }


def test_every_bad_input_gets_its_typed_error(elf_path, pe_path, png_bytes, capfd):
    cases = _bad_inputs(elf_path.read_bytes(), pe_path.read_bytes(), png_bytes)
    for name, (data, spec, error) in cases.items():
        with pytest.raises(error) as info:
            prepare(data, spec)
        assert info.value.code == error.code, name
        assert str(info.value), f"{name}: the error must say why"
    # LIEF and Pillow must not print to the user's terminal while refusing all that.
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_raw_bytes_only_when_asked():
    data = os.urandom(5000)
    with pytest.raises(NotAnExecutable):
        prepare(data, EXE)
    p = prepare(data, EXE, allow_raw=True)
    assert p.format == "raw" and p.array.shape == (1, 64, 64)


def test_size_limit_refuses_before_reading(tmp_path):
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as f:
        f.truncate(65 * 1024 * 1024)  # sparse: costs nothing on disk
    with pytest.raises(InputTooLarge, match="over the limit"):
        read_file(huge, EXE)
    small = InputSpec(modality="executable", max_bytes=1000)
    with pytest.raises(InputTooLarge):
        prepare(b"\x7fELF" + b"\0" * 2000, small)


def test_detect_executable_reports_sections(elf_path):
    info = detect_executable(elf_path.read_bytes())
    assert info.format == "ELF" and ".dynamic" in info.sections


def test_spec_validation():
    with pytest.raises(ValueError):
        InputSpec(modality="executable", channels=3)
    with pytest.raises(ValueError):
        InputSpec(modality="image", representation="nataraj")
    spec = InputSpec.for_modality("image", size=32, channels=3)
    assert InputSpec.from_dict(spec.to_dict()) == spec
