"""The batch indexing job: resumable after SIGKILL with identical ids and vectors, dedup, refusals."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import random_gated_bundle
from embedder.bundle import save_bundle
from embedder.inputs import InputSpec
from embedder.model import ModelConfig, build_model
from service.launch import LOOKALIKE
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return random_gated_bundle(tmp_path_factory.mktemp("model") / "b")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """120 distinct small ELF files from /usr/bin, plus a text file and one file listed twice."""
    files: list[Path] = []
    seen: set[bytes] = set()
    for p in sorted(Path("/usr/bin").iterdir()):
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 400_000:
            data = p.read_bytes()
            digest = hashlib.sha256(data).digest()
            if data[:4] == b"\x7fELF" and digest not in seen:
                seen.add(digest)
                files.append(p)
    files = files[:120]
    assert len(files) == 120
    out = tmp_path_factory.mktemp("data") / "manifest.csv"
    text = out.parent / "notes.txt"
    text.write_text("not an executable\n")
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, p in enumerate(files):
            w.writerow([p, f"family{i % 3}"])
        w.writerow([text, "family0"])
        w.writerow([files[0], "family0"])  # the same bytes twice: one item
    return out


def _rows(store: Path) -> list[tuple]:
    db = store / "exe" / "items.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(
            "SELECT id, sha256, name, label, model_id, vector FROM items ORDER BY id"
        ).fetchall()


def _count(store: Path) -> int:
    db = store / "exe" / "items.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _index_args(store: Path, bundle: Path, manifest: Path) -> list[str]:
    return [
        str(LOOKALIKE), "index", "--store", str(store), "--collection", "exe", "--model", str(bundle),
        "--data", str(manifest), "--chunk-size", "2", "--workers", "1", "--no-progress",
    ]  # fmt: skip


def test_sigkill_then_rerun_equals_an_uninterrupted_run(bundle, manifest, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(_index_args(reference, bundle, manifest), check=True, capture_output=True, timeout=600)
    expected = _rows(reference)
    assert len(expected) == 120  # the text file is rejected, the repeated file is one item

    proc = subprocess.Popen(
        _index_args(resumed, bundle, manifest), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while _count(resumed) < 20 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed; the test needs a slower run"
    workers = _children(proc.pid)
    assert workers, "the job should preprocess in worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Its worker processes die with it instead of lingering as orphans.
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    partial = _count(resumed)
    assert 20 <= partial < 120

    rerun = subprocess.run(
        _index_args(resumed, bundle, manifest), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    assert _rows(resumed) == expected  # same ids, hashes, labels, model and vector bytes
    assert "duplicate" in rerun.stderr


@pytest.fixture(scope="module")
def indexed(bundle, manifest, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("indexed")
    store, rejects = root / "store", root / "rejects.tsv"
    first = run_cli(*_index_args(store, bundle, manifest)[1:], "--rejects", rejects)
    return store, rejects, first


def test_summary_rejects_and_dedup(bundle, manifest, indexed):
    store, rejects, first = indexed
    assert "indexed" in first.stderr and "not_an_executable" in first.stderr
    lines = rejects.read_text().splitlines()
    assert (
        lines[0] == "path\tcode\tmessage" and len(lines) == 2 and "notes.txt\tnot_an_executable" in lines[1]
    )
    before = _rows(store)
    again = run_cli(*_index_args(store, bundle, manifest)[1:])
    outcomes = again.stderr.split("outcome")[-1].split("time:")[0]
    assert "indexed" not in outcomes and "duplicate" in outcomes
    assert _rows(store) == before and len(before) == 120


def test_refuses_another_model_and_unconverged_models(bundle, manifest, tmp_path):
    store = tmp_path / "store"
    run_cli(*_index_args(store, bundle, manifest)[1:])
    other = random_gated_bundle(tmp_path / "other", seed=1)
    r = run_cli(*_index_args(store, other, manifest)[1:], check=False)
    assert r.returncode == 2 and "model" in r.stderr.lower()

    torch.manual_seed(0)
    fresh = build_model(ModelConfig(num_classes=2))  # running statistics still at their initial 0 / 1
    x = np.random.default_rng(0).integers(0, 256, (128, 1, 64, 64), dtype=np.uint8)
    save_bundle(tmp_path / "fresh", fresh.eval(), InputSpec(), ["a", "b"], x, np.arange(128) % 2)
    r = run_cli(*_index_args(tmp_path / "store2", tmp_path / "fresh", manifest)[1:], check=False)
    assert r.returncode == 1 and "BN health gate" in r.stderr
    assert not (tmp_path / "store2" / "exe").exists() or _count(tmp_path / "store2") == 0


def test_search_cli_finds_the_file_itself(manifest, indexed):
    store, _, _ = indexed
    query = next(Path(r["path"]) for r in csv.DictReader(manifest.open()))
    out = json.loads(
        run_cli("search", "--store", store, "--collection", "exe", query, "--k", "3", "--json").stdout
    )
    assert len(out["results"]) == 3 and out["results"][0]["name"] == query.name
    assert out["results"][0]["score"] > 0.999
