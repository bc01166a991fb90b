"""`lookalike eval retrieval` on a tiny trained model: every method answers the same queries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from embedder.dataspec import load_data
from tests.conftest import FASHION, run_cli
from training.evaluate import evaluate_retrieval
from training.loop import TrainConfig, save_trained_bundle, train
from training.splits import make_split

MAX_BYTES = 400_000  # ppdeep is pure Python: small files keep the test fast


@pytest.fixture(scope="module")
def exec_manifest(family_files, tmp_path_factory) -> Path:
    """Up to 14 small ELF files of each of four Debian families, as a path,label manifest."""
    rows = []
    for family, files in family_files.items():
        small = [p for p in files if p.stat().st_size < MAX_BYTES][:14]
        rows += [(p, family) for p in small]
    path = tmp_path_factory.mktemp("eval") / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def _train_bundle(data_spec: str, cfg: TrainConfig, out: Path, split: str, **load) -> Path:
    cfg = cfg.resolved()
    data = load_data(data_spec, cfg.input_spec(), progress=False, workers=2, **load)
    sp = make_split(data, split)
    result = train(data, sp, cfg, progress=False)
    save_trained_bundle(out, result, data, sp)
    return out


@pytest.fixture(scope="module")
def exec_bundle_seen(exec_manifest, tmp_path_factory) -> Path:
    cfg = TrainConfig(modality="executable", size=32, max_steps=6, batch_size=16, eval_subset=64, threads=1)
    return _train_bundle(str(exec_manifest), cfg, tmp_path_factory.mktemp("m") / "exec", "seen")


@pytest.mark.slow
def test_cli_reports_every_method_on_the_same_queries(exec_manifest, exec_bundle_seen, tmp_path):
    out_md = tmp_path / "eval.md"
    r = run_cli(
        "eval",
        "retrieval",
        "--model",
        exec_bundle_seen,
        "--data",
        exec_manifest,
        "--split",
        "seen",
        "--json",
        "--no-progress",
        "--cache",
        tmp_path / "cache.sqlite",
        "--out",
        out_md,
    )
    report = json.loads(r.stdout)
    methods = {m["method"]: m for m in report["methods"]}
    assert set(methods) == {"model", "tlsh", "ssdeep", "bytehist"}
    counts = {m["metrics"]["queries"] + m["metrics"]["queries_without_relevant"] for m in methods.values()}
    assert counts == {report["queries"]} and report["queries"] > 0
    assert {m["metrics"]["index"] for m in methods.values()} == {report["index"]}
    for m in methods.values():
        for key in ("P@1", "macro_P@1", "P@10", "mAP", "MRR@10"):
            assert 0.0 <= m["metrics"][key] <= 1.0
    assert "train side" in report["trained_on"]  # trained on exactly the seen split's train files
    assert any("TNULL" in n for n in methods["tlsh"]["notes"])
    text = out_md.read_text()
    assert "| model |" in text and "| ssdeep |" in text and "eval retrieval" in text


@pytest.mark.slow
def test_unseen_split_is_leave_one_out_over_held_out_families(exec_manifest, exec_bundle_seen, tmp_path):
    report = evaluate_retrieval(
        exec_bundle_seen,
        str(exec_manifest),
        "unseen",
        ["bytehist", "pixels"],
        workers=1,
        progress=False,
        cache_path=tmp_path / "c.sqlite",
    )
    assert report.leave_one_out and report.held_out  # systemd is a held-out family by the hash rule
    assert report.queries == report.index
    assert [m.method for m in report.methods] == ["model", "bytehist", "pixels"]
    assert {m.metrics["queries"] for m in report.methods} == {report.queries}
    # The seen-trained model saw the held-out families: the report must say so, not hide it.
    assert "other data" in report.trained_on or "ALL" in report.trained_on


@pytest.mark.slow
@pytest.mark.fashion
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_images_get_raw_pixels_and_refuse_file_baselines(tmp_path):
    spec = f"idx:{FASHION}"
    cfg = TrainConfig(modality="image", max_steps=8, batch_size=32, eval_subset=64, threads=1)
    bundle = _train_bundle(spec, cfg, tmp_path / "img", "seen", limit_per_class=12)
    data = load_data(spec, cfg.resolved().input_spec(), progress=False, limit_per_class=12)
    report = evaluate_retrieval(bundle, spec, "seen", ["pixels", "tlsh"], progress=False, data=data)
    assert [m.method for m in report.methods] == ["model", "pixels"]
    assert (report.queries, report.index) == (120, 120)  # natural split: t10k queries, train index
    assert any("'tlsh' does not apply" in n for n in report.notes)
    pixels = report.method("pixels").metrics
    # Raw-pixel 1-NN on Fashion-MNIST is far above chance (0.1) even with 12 images per class.
    assert pixels["P@1"] > 0.4
    assert np.isclose(report.method("model").metrics["queries"], pixels["queries"])
