"""Baselines on real files: distances behave, TNULL ranks last and is counted, the cache avoids rework."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import ppdeep
import pytest

from training.baselines import (
    NULL_DISTANCE,
    TNULL,
    BaselineError,
    FeatureCache,
    default_cache_path,
    file_features,
    pixel_vectors,
    sqrt_histograms,
    ssdeep_distances,
    ssdeep_hash,
    tlsh_distances,
    tlsh_hash,
)
from training.evaluate import file_baseline_metrics
from training.metrics import rank_metrics_from_distances


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def elfs(small_elfs) -> list[Path]:
    if len(small_elfs) < 6:
        pytest.skip("fewer than 6 small ELF files in /usr/bin")
    return small_elfs[:6]


def test_identical_files_are_at_distance_zero(elfs):
    data = elfs[0].read_bytes()
    th, sh = tlsh_hash(data), ssdeep_hash(data)
    assert th != TNULL
    assert tlsh_distances([th], [th])[0, 0] == 0
    D, compared = ssdeep_distances([sh], [sh], workers=1)
    assert D[0, 0] == 0 and compared == 1  # ppdeep.compare said 100
    v = sqrt_histograms(np.bincount(np.frombuffer(data, np.uint8), minlength=256)[None])
    assert v @ v.T == pytest.approx(1.0, abs=1e-6)


def test_distances_order_a_near_copy_before_other_files(elfs):
    """A file with its tail cut off is nearer to the original than another program is."""
    data = elfs[0].read_bytes()
    near = data[: int(len(data) * 0.9)]
    other = [p.read_bytes() for p in elfs[1:4]]
    tq = [tlsh_hash(data)]
    tb = [tlsh_hash(near), *map(tlsh_hash, other)]
    D = tlsh_distances(tq, tb)
    assert D[0, 0] < D[0, 1:].min()
    Ds, _ = ssdeep_distances([ssdeep_hash(data)], [ssdeep_hash(near), *map(ssdeep_hash, other)], workers=1)
    assert Ds[0, 0] < 100 and Ds[0, 0] < Ds[0, 1:].min()


def test_ssdeep_candidate_filter_matches_ppdeep_on_every_pair(elfs):
    """The 7-gram filter must only skip pairs ppdeep scores 0: compare against brute force."""
    datas = [p.read_bytes() for p in elfs]
    datas += [datas[0][: len(datas[0]) // 2], datas[1][:-200], b"abc", b"hello world" * 3]
    hashes = [ssdeep_hash(d) for d in datas]
    D, compared = ssdeep_distances(hashes, hashes, workers=1)
    brute = np.array([[100 - ppdeep.compare(a, b) for b in hashes] for a in hashes], dtype=np.float32)
    np.testing.assert_array_equal(D, brute)
    assert compared < len(hashes) ** 2  # the filter skipped something


def test_tnull_items_rank_last_and_are_counted(elfs, tmp_path):
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x7fELF" + b"\0" * 20)  # under TLSH's 50-byte minimum
    assert tlsh_hash(tiny.read_bytes()) == TNULL
    q = tlsh_hash(elfs[0].read_bytes())
    index = [TNULL, tlsh_hash(elfs[1].read_bytes())]
    D = tlsh_distances([q, TNULL], index)
    assert D[0, 0] == NULL_DISTANCE and D[0, 1] < NULL_DISTANCE
    assert (D[1] == NULL_DISTANCE).all()  # a TNULL query ties with everything
    # The TNULL item is the query's only relevant one: it ranks behind the irrelevant one.
    m = rank_metrics_from_distances(D[:1], np.array([0]), np.array([0, 1]))
    assert m["P@1"] == 0.0 and m["MRR@10"] == 0.5
    r = file_baseline_metrics("tlsh", [q, TNULL], index, np.array([0, 1]), np.array([0, 1]))
    assert r.metrics["queries"] == 2
    assert "TNULL: 1 queries, 1 index items" in r.notes[0]
    assert r.metrics["P@1"] == 0.0  # neither query finds its one relevant item first


def test_cache_hit_on_rerun_computes_nothing(elfs, tmp_path):
    cache_file = tmp_path / "cache.sqlite"
    paths, keys = [str(p) for p in elfs], [_sha(p) for p in elfs]
    with FeatureCache(cache_file) as cache:
        first, s1 = file_features(paths, keys, ["tlsh", "ssdeep", "bytehist"], cache=cache, workers=2)
    assert (s1.computed, s1.cached) == (len(elfs), 0)
    with FeatureCache(cache_file) as cache:
        again, s2 = file_features(paths, keys, ["tlsh", "ssdeep", "bytehist"], cache=cache, workers=2)
    assert (s2.computed, s2.cached) == (0, len(elfs))
    assert first["tlsh"] == again["tlsh"] and first["ssdeep"] == again["ssdeep"]
    assert all(np.array_equal(a, b) for a, b in zip(first["bytehist"], again["bytehist"], strict=True))
    assert first["tlsh"][0] == tlsh_hash(elfs[0].read_bytes())
    assert first["bytehist"][0].sum() == elfs[0].stat().st_size
    rows = sqlite3.connect(cache_file).execute("SELECT COUNT(*) FROM feature").fetchone()[0]
    assert rows == 3 * len(elfs)


def test_changed_file_is_refused_not_cached(elfs, tmp_path):
    """A cache keyed by sha256 must never store a value computed from other bytes."""
    copy = tmp_path / "copy"
    copy.write_bytes(elfs[0].read_bytes())
    key = _sha(copy)
    copy.write_bytes(elfs[1].read_bytes())
    with FeatureCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(BaselineError, match="changed since"):
            file_features([str(copy)], [key], ["tlsh"], cache=cache, workers=1)
        assert cache.get_many("tlsh", [key]) == {}


def test_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_BASELINE_CACHE", str(tmp_path / "x.sqlite"))
    assert default_cache_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("LOOKALIKE_BASELINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "lookalike" / "baselines.sqlite"


def test_vectors_are_unit_rows():
    counts = np.array([[4, 0, 0, 0], [1, 1, 1, 1]], dtype=np.uint64)
    v = sqrt_histograms(counts)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(v[1], 0.5)  # sqrt(1/4), already unit
    x = np.zeros((2, 1, 4, 4), np.uint8)
    x[1] = 7
    p = pixel_vectors(x)
    assert np.linalg.norm(p[0]) == 0 and np.linalg.norm(p[1]) == pytest.approx(1.0)
