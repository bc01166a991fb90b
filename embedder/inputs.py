"""Bytes in, model input out: the single preprocessing path shared by training, indexing and serving.

Everything that becomes a model input goes through :func:`prepare` (bytes of a file or upload) or
:func:`prepare_array` (decoded pixel arrays such as IDX/MNIST records). Both end in a ``uint8`` array of
shape ``(C, S, S)``; scaling to floats happens inside the model, so a stored calibration sample and a live
upload are bit-for-bit the same kind of thing.

Executables become 1-channel images in one of two representations:

* ``nataraj`` -- the raw bytes laid out row by row at a width chosen by file size (Nataraj et al. 2011),
  zero padded and area-resized to ``S x S``;
* ``bigram`` -- the 256x256 log-frequency of consecutive byte pairs, average-pooled to ``S x S``.

Format detection uses LIEF with its logging silenced, and only the header-level parsers (no symbols,
relocations or resources): the model needs the bytes, the detection only needs to know the file is a real
PE / ELF / Mach-O and not a text file with a lucky first byte.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lief
import numpy as np
from PIL import Image, UnidentifiedImageError

from embedder.errors import CorruptImage, DecompressionBomb, EmptyInput, InputTooLarge, NotAnExecutable

# LIEF logs parse warnings straight to stderr from C++; a user's terminal (and the service log) must not
# fill with them for every odd file.
lief.logging.disable()

Modality = Literal["executable", "image"]
Representation = Literal["nataraj", "bigram", "pixels"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP"})

# (upper bound in bytes, exclusive; row width) from the Nataraj layout.
_NATARAJ_WIDTHS = (
    (10 * 1024, 32),
    (30 * 1024, 64),
    (60 * 1024, 128),
    (100 * 1024, 256),
    (200 * 1024, 384),
    (500 * 1024, 512),
    (1000 * 1024, 768),
)


@dataclass(frozen=True)
class InputSpec:
    """How raw input becomes a model input; recorded in every bundle's ``config.json``."""

    modality: Modality = "executable"
    representation: Representation = "nataraj"
    size: int = 64
    channels: int = 1
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.modality not in ("executable", "image"):
            raise ValueError(f"modality must be 'executable' or 'image', not {self.modality!r}")
        allowed = ("nataraj", "bigram") if self.modality == "executable" else ("pixels",)
        if self.representation not in allowed:
            raise ValueError(f"representation for {self.modality} must be one of {allowed}")
        if self.modality == "executable" and self.channels != 1:
            raise ValueError("executables are 1-channel inputs")
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 (grayscale) or 3 (RGB)")
        if not 8 <= self.size <= 512:
            raise ValueError("size must be between 8 and 512")

    @classmethod
    def for_modality(cls, modality: Modality, **overrides: Any) -> InputSpec:
        """The defaults for a modality: 64x64 nataraj for executables, 28x28 grayscale for images."""
        base: dict[str, Any] = (
            {"representation": "nataraj", "size": 64}
            if modality == "executable"
            else {"representation": "pixels", "size": 28}
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(modality=modality, **base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ExecutableInfo:
    format: str  # "ELF", "PE", "MachO" or "raw"
    arch: str
    sections: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prepared:
    """A model input plus what was learnt about it on the way."""

    array: np.ndarray  # uint8, (C, S, S)
    sha256: str
    format: str  # ELF / PE / MachO / raw for executables, PNG / JPEG / ... / IDX for images
    size_bytes: int
    info: ExecutableInfo | None = field(default=None)


# --------------------------------------------------------------------------------------------- limits


def check_size(n: int, spec: InputSpec) -> None:
    if n == 0:
        raise EmptyInput("empty input: 0 bytes")
    if n > spec.max_bytes:
        raise InputTooLarge(f"input is {n} bytes, over the limit of {spec.max_bytes} bytes")


def read_file(path: str | os.PathLike[str], spec: InputSpec) -> bytes:
    """Read a file after checking its size, so an oversized file is refused without being read."""
    path = Path(path)
    n = path.stat().st_size
    check_size(n, spec)
    with path.open("rb") as f:
        data = f.read(spec.max_bytes + 1)  # the file may have grown since stat
    check_size(len(data), spec)
    return data


# --------------------------------------------------------------------------------------- executables


def _elf_info(data: bytes) -> ExecutableInfo:
    # LIEF accepts an ELF cut short after its identification bytes and reports an empty binary, so the
    # header and the tables it points to are checked against the real length here.
    if len(data) < 16 or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise NotAnExecutable("truncated or invalid ELF identification")
    is64, endian = data[4] == 2, "<" if data[5] == 1 else ">"
    header_len = 64 if is64 else 52
    if len(data) < header_len:
        raise NotAnExecutable(f"truncated ELF header: {len(data)} of {header_len} bytes")
    if is64:
        phoff, shoff = struct.unpack_from(endian + "QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(endian + "HHHH", data, 54)
    else:
        phoff, shoff = struct.unpack_from(endian + "II", data, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(endian + "HHHH", data, 42)
    if phnum == 0 and shnum == 0:
        raise NotAnExecutable("ELF header declares neither program nor section headers")
    if phnum and phoff + phentsize * phnum > len(data):
        raise NotAnExecutable(f"truncated ELF: program headers end past the file's {len(data)} bytes")
    if shnum and shoff and shoff + shentsize * shnum > len(data):
        raise NotAnExecutable(f"truncated ELF: section headers end past the file's {len(data)} bytes")
    config = lief.ELF.ParserConfig()
    for flag in (
        "parse_relocations",
        "parse_dyn_symbols",
        "parse_symtab_symbols",
        "parse_symbol_versions",
        "parse_notes",
        "parse_overlay",
    ):
        setattr(config, flag, False)
    binary = lief.ELF.parse(data, config)
    if binary is None:
        raise NotAnExecutable("LIEF could not parse the ELF headers")
    arch = str(binary.header.machine_type).rsplit(".", 1)[-1]
    return ExecutableInfo("ELF", arch, tuple(s.name for s in binary.sections if s.name))


def _pe_info(data: bytes) -> ExecutableInfo:
    config = lief.PE.ParserConfig()
    for flag in ("parse_exports", "parse_imports", "parse_reloc", "parse_rsrc", "parse_signature"):
        setattr(config, flag, False)
    if hasattr(config, "parse_exceptions"):
        config.parse_exceptions = False
    binary = lief.PE.parse(data, config)
    if binary is None:
        raise NotAnExecutable("MZ file without a valid PE header (truncated or not a PE)")
    arch = str(binary.header.machine).rsplit(".", 1)[-1]
    return ExecutableInfo("PE", arch, tuple(s.name for s in binary.sections))


def _check_macho_length(data: bytes) -> None:
    # Like ELF, LIEF accepts a Mach-O cut short anywhere after its 16th byte (an "empty" binary with no
    # sections), so the fat table, the header and its load commands are checked against the real length.
    n = len(data)
    if data[:4] == b"\xca\xfe\xba\xbe":  # universal ("fat") file: big-endian table of slices
        if n < 8:
            raise NotAnExecutable(f"truncated Mach-O universal header: {n} bytes")
        (count,) = struct.unpack_from(">I", data, 4)
        if count == 0 or 8 + 20 * count > n:
            raise NotAnExecutable(f"truncated or empty Mach-O universal table ({count} slices, {n} bytes)")
        for i in range(count):
            offset, size = struct.unpack_from(">II", data, 8 + 20 * i + 8)
            if offset + size > n:
                raise NotAnExecutable(f"truncated Mach-O: slice {i} ends past the file's {n} bytes")
        return
    endian = "<" if data[:4] in (b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe") else ">"
    header_len = 32 if data[:4] in (b"\xcf\xfa\xed\xfe", b"\xfe\xed\xfa\xcf") else 28
    if n < header_len:
        raise NotAnExecutable(f"truncated Mach-O header: {n} of {header_len} bytes")
    ncmds, sizeofcmds = struct.unpack_from(endian + "II", data, 16)
    if ncmds == 0:
        raise NotAnExecutable("Mach-O header declares no load commands")
    if header_len + sizeofcmds > n:
        raise NotAnExecutable(f"truncated Mach-O: load commands end past the file's {n} bytes")


def _macho_info(data: bytes) -> ExecutableInfo:
    _check_macho_length(data)
    fat = lief.MachO.parse(list(data), config=lief.MachO.ParserConfig.quick)
    if fat is None or fat.size == 0:
        # 0xCAFEBABE is also the magic of Java class files; LIEF tells the two apart.
        raise NotAnExecutable("Mach-O magic without a parsable Mach-O header")
    binary = fat.at(0)
    arch = str(binary.header.cpu_type).rsplit(".", 1)[-1]
    return ExecutableInfo("MachO", arch, tuple(s.name for s in binary.sections))


_MACHO_MAGICS = {
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
}


def detect_executable(data: bytes) -> ExecutableInfo:
    """Identify a PE, ELF or Mach-O file; raise :class:`NotAnExecutable` for anything else."""
    try:
        if data[:4] == b"\x7fELF":
            return _elf_info(data)
        if data[:2] == b"MZ":
            return _pe_info(data)
        if data[:4] in _MACHO_MAGICS:
            return _macho_info(data)
    except NotAnExecutable:
        raise
    except Exception as exc:  # LIEF raises assorted errors on hostile input; all mean "not usable"
        raise NotAnExecutable(f"executable headers could not be parsed: {exc}") from exc
    raise NotAnExecutable("not a PE, ELF or Mach-O executable (unrecognised magic bytes)")


def nataraj_width(n_bytes: int) -> int:
    for bound, width in _NATARAJ_WIDTHS:
        if n_bytes < bound:
            return width
    return 1024


def _area_resize(plane: np.ndarray, size: int) -> np.ndarray:
    """Area (box-filter) resize of a 2-D array to ``size x size``; uint8 in, uint8 out."""
    mode = "L" if plane.dtype == np.uint8 else "F"
    img = Image.fromarray(plane, mode=mode) if mode == "F" else Image.fromarray(plane)
    out = np.array(img.resize((size, size), Image.Resampling.BOX))  # a writable copy for torch
    if mode == "F":
        return out.astype(np.float32)
    return out


def nataraj_array(data: bytes, size: int) -> np.ndarray:
    width = nataraj_width(len(data))
    rows = math.ceil(len(data) / width)
    plane = np.zeros(rows * width, dtype=np.uint8)
    plane[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return _area_resize(plane.reshape(rows, width), size)


def bigram_array(data: bytes, size: int) -> np.ndarray:
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size < 2:
        return np.zeros((size, size), dtype=np.uint8)
    counts = np.zeros(65536, dtype=np.int64)
    # Chunked so a 64 MiB file needs a few MB of scratch, not bincount's 8 bytes per pair.
    step = 1 << 22
    for start in range(0, a.size - 1, step):
        chunk = a[start : start + step + 1]
        counts += np.bincount((chunk[:-1].astype(np.uint16) << 8) | chunk[1:], minlength=65536)
    freq = np.log1p(counts.astype(np.float32)).reshape(256, 256)
    if 256 % size == 0:
        f = 256 // size
        pooled = freq.reshape(size, f, size, f).mean(axis=(1, 3))
    else:
        pooled = _area_resize(freq, size)
    peak = float(pooled.max())
    scaled = pooled / peak * 255.0 if peak > 0 else pooled
    return np.rint(scaled).astype(np.uint8)


def executable_array(data: bytes, representation: Representation, size: int) -> np.ndarray:
    """Bytes -> ``(1, S, S)`` uint8 by the named representation."""
    if representation == "nataraj":
        plane = nataraj_array(data, size)
    elif representation == "bigram":
        plane = bigram_array(data, size)
    else:
        raise ValueError(f"unknown executable representation {representation!r}")
    return plane[None, :, :]


# -------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode PNG / JPEG / GIF / BMP / WebP bytes; typed errors for bombs and corrupt files."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is stricter than Pillow's warning threshold; the check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in IMAGE_FORMATS:
                raise CorruptImage(f"unsupported image format {img.format}; use PNG, JPEG, GIF, BMP or WebP")
            w, h = img.size
            if w * h > max_pixels:
                raise DecompressionBomb(f"image declares {w}x{h} = {w * h} pixels, over {max_pixels}")
            img.load()
    except (CorruptImage, DecompressionBomb):
        raise
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise CorruptImage("not a recognised image (PNG, JPEG, GIF, BMP or WebP)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise CorruptImage(f"corrupt or truncated image: {exc}") from exc
    return img


def image_array(img: Image.Image | np.ndarray, size: int, channels: int) -> np.ndarray:
    """A decoded image (or a 2-D/3-D uint8 array) -> ``(C, S, S)`` uint8, grayscale or RGB."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img.astype(np.uint8, copy=False)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-with-transparency notices on convert
        img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        shrinking = img.size[0] >= size and img.size[1] >= size
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        img = img.resize((size, size), resample)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :].copy() if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptImage(f"{path}: not an IDX file (bad magic)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise CorruptImage(f"{path}: truncated IDX header")
    shape = struct.unpack_from(">" + "I" * ndim, raw, 4)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != need:
        raise CorruptImage(f"{path}: IDX body is {len(body)} bytes, header says {need}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


# ------------------------------------------------------------------------------------- the one path


def prepare(data: bytes, spec: InputSpec, *, allow_raw: bool = False) -> Prepared:
    """Turn the bytes of one file into a model input, or raise a typed :class:`InputError`.

    ``allow_raw`` lets an executable model embed bytes that are not a recognised executable (the caller
    asked for it explicitly); images never fall back.
    """
    check_size(len(data), spec)
    digest = hashlib.sha256(data).hexdigest()
    if spec.modality == "executable":
        try:
            info = detect_executable(data)
        except NotAnExecutable:
            if not allow_raw:
                raise
            info = ExecutableInfo("raw", "unknown")
        array = executable_array(data, spec.representation, spec.size)
        return Prepared(array, digest, info.format, len(data), info)
    img = decode_image(data, max_pixels=spec.max_pixels)
    return Prepared(image_array(img, spec.size, spec.channels), digest, str(img.format), len(data))


def prepare_file(path: str | os.PathLike[str], spec: InputSpec, *, allow_raw: bool = False) -> Prepared:
    return prepare(read_file(path, spec), spec, allow_raw=allow_raw)


def prepare_array(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Decoded pixels (an IDX record, a numpy image) -> model input, through the same image path."""
    if spec.modality != "image":
        raise ValueError("pixel arrays are image inputs; this spec is for executables")
    return image_array(pixels, spec.size, spec.channels)
