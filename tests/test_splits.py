"""The evaluation protocol's splits, checked against the DESIGN formulas recomputed another way."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedder.dataspec import LabelledData, load_data
from embedder.inputs import InputSpec
from training.splits import SplitError, idx_parts, is_seen_test, is_unseen_family, make_split

FASHION = Path("/usr/share/datasets/fashion-mnist")
EXE = InputSpec.for_modality("executable", size=16)


def seen_test_ref(sha256_hex: str) -> bool:
    """DESIGN: test when int(sha256[:8], 16) % 10 < 3 -- here from the raw digest bytes."""
    return int.from_bytes(bytes.fromhex(sha256_hex)[:4], "big") % 10 in (0, 1, 2)


def unseen_ref(family: str) -> bool:
    """DESIGN: held out when int(sha256(family)[:8], 16) % 4 == 0, i.e. the 4th digest byte's low bits."""
    return hashlib.sha256(family.encode("utf-8")).digest()[3] & 0b11 == 0


@pytest.fixture(scope="module")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> LabelledData:
    """About 60 distinct /usr/bin executables in 12 classes, so both rules have something to split."""
    root = tmp_path_factory.mktemp("classes")
    files, seen = [], set()
    for p in sorted(Path("/usr/bin").iterdir()):
        if p.is_symlink() or not p.is_file() or not 5_000 < p.stat().st_size < 300_000:
            continue
        data = p.read_bytes()
        if data[:4] == b"\x7fELF" and (h := hashlib.sha256(data).hexdigest()) not in seen:
            seen.add(h)
            files.append(p)
        if len(files) == 60:
            break
    # Family names picked so that at least one is held out and at least one is not.
    names = [f"family-{i}" for i in range(40)]
    held = [n for n in names if unseen_ref(n)][:3]
    kept = [n for n in names if not unseen_ref(n)][:9]
    for i, f in enumerate(files):
        d = root / (held + kept)[i % 12]
        d.mkdir(exist_ok=True)
        shutil.copy(f, d / f.name)
    return load_data(str(root), EXE, workers=1, progress=False)


def test_seen_rule_on_real_hashes(real_data: LabelledData) -> None:
    assert len(real_data.keys) >= 40
    for key in real_data.keys:
        assert is_seen_test(key) == seen_test_ref(key)
    # And the boundary cases of the formula itself.
    assert is_seen_test("00000000" + "f" * 56)  # 0 % 10 = 0 -> test
    assert is_seen_test("00000002" + "0" * 56)
    assert not is_seen_test("00000003" + "0" * 56)
    assert not is_seen_test("00000009" + "0" * 56)
    assert is_seen_test("0000000a" + "0" * 56)  # 10 % 10 = 0


def test_seen_rule_is_70_30() -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20_000)]
    frac = np.mean([is_seen_test(k) for k in keys])
    assert 0.29 < frac < 0.31


def test_unseen_rule() -> None:
    families = [f"pkg{i}" for i in range(8_000)] + ["coreutils", "glibc", "dpkg", "perl"]
    assert all(is_unseen_family(f) == unseen_ref(f) for f in families)
    frac = np.mean([is_unseen_family(f) for f in families])
    assert 0.235 < frac < 0.265


def test_make_split_seen(real_data: LabelledData) -> None:
    split = make_split(real_data, "seen")
    expected_test = [i for i, k in enumerate(real_data.keys) if seen_test_ref(k)]
    assert split.kind == "seen" and split.test.tolist() == expected_test
    assert sorted(split.train.tolist() + split.test.tolist()) == list(range(len(real_data.keys)))
    assert split.train.dtype == np.int64


def test_make_split_unseen(real_data: LabelledData) -> None:
    split = make_split(real_data, "unseen")
    held = {f for f in real_data.labels if unseen_ref(f)}
    assert set(split.held_out) == held and len(held) == 3
    test_families = {real_data.labels[i] for i in real_data.y[split.test]}
    train_families = {real_data.labels[i] for i in real_data.y[split.train]}
    assert test_families == held and not (train_families & held)
    assert len(split.train) + len(split.test) == len(real_data.keys)


def test_make_split_none_and_errors(real_data: LabelledData) -> None:
    split = make_split(real_data, "none")
    assert len(split.train) == len(real_data.keys) and len(split.test) == 0
    only_kept = real_data.subset(make_split(real_data, "unseen").train)
    with pytest.raises(SplitError, match="holds out 0"):
        make_split(only_kept, "unseen")
    with pytest.raises(SplitError, match="unknown split"):
        make_split(real_data, "random")


def test_idx_parts_recognises_only_idx_names() -> None:
    names = ["train-images-idx3-ubyte.gz#0", "t10k-images-idx3-ubyte.gz#5", "train-images-idx3-ubyte#7"]
    assert idx_parts(names).tolist() == [False, True, False]
    assert idx_parts([*names, "/usr/bin/ls"]) is None


@pytest.mark.fashion
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_seen_split_is_the_natural_one() -> None:
    image = InputSpec.for_modality("image")
    both = load_data(f"idx:{FASHION}", image, progress=False, limit_per_class=3)
    split = make_split(both, "seen")
    assert all(both.names[i].startswith("train-") for i in split.train)
    assert all(both.names[i].startswith("t10k-") for i in split.test)
    assert len(split.train) == len(split.test) == 30
    # One part only: the sha256 rule applies, as for files.
    test_only = load_data(f"idx:{FASHION}:test", image, progress=False, limit_per_class=20)
    split = make_split(test_only, "seen")
    assert split.test.tolist() == [i for i, k in enumerate(test_only.keys) if seen_test_ref(k)]
