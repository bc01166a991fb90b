"""The training loop and `lookalike train` on small real data: ELF files of four Debian families from
/usr/bin (the ``family_files`` fixture) and, when installed, a Fashion-MNIST subset. No mocks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedder.bundle import load_bundle, state_dict_equal
from embedder.dataspec import LabelledData, load_data
from embedder.embed import Embedder
from lookalike.cli import app
from training.loop import (
    TrainConfig,
    embed_eval,
    save_trained_bundle,
    stratified_sample,
    train,
    train_mode_accuracy,
)
from training.splits import make_split

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")

# Small and fast: 32x32 inputs, narrow widths; the loop is the thing under test, not the accuracy.
EXEC = dict(modality="executable", size=32, widths=(8, 16, 32), embed_dim=32, batch_size=16, eval_subset=64)


@pytest.fixture(scope="module")
def exec_manifest(family_files, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "families.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for family, files in family_files.items():
            w.writerows((p, family) for p in files)
    return path


@pytest.fixture(scope="module")
def exec_data(exec_manifest) -> LabelledData:
    spec = TrainConfig(**EXEC).resolved().input_spec()
    return load_data(str(exec_manifest), spec, workers=2, progress=False)


@pytest.fixture(scope="module")
def exec_run(exec_data):
    cfg = TrainConfig(**EXEC, epochs=2, seed=0)
    return train(exec_data, make_split(exec_data, "seen"), cfg, progress=False)


@pytest.fixture(scope="module")
def fashion_small() -> LabelledData:
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    spec = TrainConfig(modality="image").resolved().input_spec()
    return load_data(f"idx:{FASHION}", spec, limit_per_class=40, progress=False)


# --------------------------------------------------------------------------------------------- loop


def test_same_seed_gives_identical_weights(exec_data, exec_run):
    again = train(
        exec_data, make_split(exec_data, "seen"), TrainConfig(**EXEC, epochs=2, seed=0), progress=False
    )
    assert state_dict_equal(exec_run.model, again.model)  # bit for bit, BN buffers included
    assert np.array_equal(exec_run.calibration, again.calibration)
    assert exec_run.history[-1]["loss"] == again.history[-1]["loss"]


def test_different_seeds_give_different_weights(exec_data, exec_run):
    other = train(
        exec_data, make_split(exec_data, "seen"), TrainConfig(**EXEC, epochs=2, seed=1), progress=False
    )
    assert not state_dict_equal(exec_run.model, other.model)


def test_history_records_both_bn_modes_each_epoch(exec_run):
    assert [row["epoch"] for row in exec_run.history] == [1, 2]
    for row in exec_run.history:
        for key in ("loss", "train_mode_acc", "eval_mode_acc", "gap", "heldout_acc", "lr"):
            assert row[key] is not None, key
        assert 0.0 <= row["train_mode_acc"] <= 1.0 and 0.0 <= row["eval_mode_acc"] <= 1.0
        assert row["gap"] == pytest.approx(row["train_mode_acc"] - row["eval_mode_acc"])
        assert row["retrieval"]["P@1"] is not None and row["retrieval"]["leave_one_out"] is False
    final = exec_run.metrics
    assert final["steps"] == exec_run.history[-1]["steps"]
    assert final["retrieval"]["queries"] == final["n_test"]


def test_train_mode_measurement_leaves_running_statistics_alone(exec_data, exec_run):
    model = exec_run.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = exec_run.calibration_arrays(exec_data)
    train_mode_accuracy(model, x, y, batch_size=16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_gap_is_zero_without_running_statistics(exec_data):
    """GroupNorm behaves the same in train and eval mode: the gap must be exactly 0 (a control)."""
    cfg = TrainConfig(**{**EXEC, "norm": "group"}, epochs=1)
    r = train(exec_data, make_split(exec_data, "seen"), cfg, progress=False)
    assert r.history[0]["train_mode_acc"] == r.history[0]["eval_mode_acc"]


def test_max_steps_and_cumulative_reset(exec_data):
    cfg = TrainConfig(**{**EXEC, "norm": "cumulative", "reset_each_epoch": True}, max_steps=7)
    r = train(exec_data, make_split(exec_data, "none"), cfg, progress=False)
    assert r.metrics["steps"] == 7
    assert r.history[-1]["heldout_acc"] is None and r.history[-1]["retrieval"] is None
    # reset at the start of the last epoch: the statistics count that epoch's batches only
    per_epoch = r.history[0]["steps"]
    bn = next(m for m in r.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 7 - per_epoch * (len(r.history) - 1)


def test_balanced_sampler_and_unseen_split(exec_data):
    split = make_split(exec_data, "unseen")
    cfg = TrainConfig(**{**EXEC, "sampler": "balanced", "k_per_class": 2}, epochs=1)
    r = train(exec_data, split, cfg, progress=False)
    trained = sorted({exec_data.labels[i] for i in exec_data.y[split.train]})
    assert r.labels == trained  # the classifier knows the trained families only
    ret = r.metrics["retrieval"]
    assert ret["leave_one_out"] is True and ret["queries"] == len(split.test)
    assert r.metrics["heldout_n"] == 0  # held-out families have no class to be classified into


def test_calibration_sample_is_stratified_and_seeded():
    y = np.repeat(np.arange(4), [500, 300, 150, 50])
    a = stratified_sample(y, 100, np.random.default_rng(0))
    b = stratified_sample(y, 100, np.random.default_rng(0))
    assert np.array_equal(a, b) and len(np.unique(a)) == 100
    assert np.bincount(y[a]).tolist() == [50, 30, 15, 5]
    tiny = stratified_sample(np.array([0] * 98 + [1, 2]), 10, np.random.default_rng(0))
    assert set(np.unique(np.array([0] * 98 + [1, 2])[tiny])) == {0, 1, 2}  # every class kept


def test_bundle_round_trip_reproduces_embeddings(exec_data, exec_run, tmp_path):
    split = make_split(exec_data, "seen")
    bundle_id = save_trained_bundle(tmp_path / "b", exec_run, exec_data, split)
    b = load_bundle(tmp_path / "b")
    assert b.id == bundle_id
    cal_x, cal_y = exec_run.calibration_arrays(exec_data)
    assert np.array_equal(b.calibration_x, cal_x) and np.array_equal(b.calibration_y, cal_y)
    assert b.labels == exec_run.labels
    assert b.data_fingerprint == exec_data.subset(split.train).fingerprint()
    assert b.provenance["train_config"]["seed"] == 0
    ours = embed_eval(exec_run.model, cal_x)
    theirs = Embedder(b).embed_arrays(b.calibration_x)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)
    assert b.metrics is not None and len(b.metrics["history"]) == 2


def test_refuses_data_prepared_for_another_input_spec(exec_data):
    from training.loop import TrainingError

    assert TrainConfig(**EXEC).resolved().representation == "nataraj"  # InputSpec's default
    with pytest.raises(TrainingError, match="input spec"):
        train(exec_data, make_split(exec_data, "seen"), TrainConfig(**{**EXEC, "size": 64}, epochs=1))
    # same shape, other representation: nataraj arrays must not train a model labelled bigram
    with pytest.raises(TrainingError, match="bigram"):
        cfg = TrainConfig(**{**EXEC, "representation": "bigram"}, epochs=1)
        train(exec_data, make_split(exec_data, "seen"), cfg)


@needs_fashion
def test_tiny_fashion_run_beats_chance(fashion_small):
    cfg = TrainConfig(modality="image", epochs=2, batch_size=32, widths=(16, 32, 64), eval_subset=256)
    r = train(fashion_small, make_split(fashion_small, "seen"), cfg, progress=False)
    assert r.metrics["n_train"] == 400 and r.metrics["n_test"] == 400
    assert r.metrics["heldout_acc"] > 0.4  # chance is 0.1
    assert r.metrics["retrieval"]["P@1"] > 0.4


# ---------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def _train_cli(*args: object):
    return runner.invoke(app, ["train", *map(str, args)])


def test_cli_refuses_existing_out_before_loading(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    # The data spec does not exist either: the --out check must come first.
    r = _train_cli("--data", tmp_path / "nope", "--modality", "image", "--norm", "moving", "--out", out)
    assert r.exit_code == 2
    assert "already exists" in r.output and "--overwrite" in r.output


def test_cli_reports_bad_spec(tmp_path):
    r = _train_cli(
        "--data", tmp_path / "nope", "--modality", "image", "--norm", "moving", "--out", tmp_path / "m"
    )
    assert r.exit_code == 2 and "error" in r.output and "nope" in r.output
    assert not (tmp_path / "m").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,kind\n/usr/bin/ls,x\n")
    r = _train_cli("--data", bad, "--modality", "executable", "--norm", "moving", "--out", tmp_path / "m")
    assert r.exit_code == 2 and "header" in r.output


def test_cli_rejects_bad_usage(tmp_path):
    base = ["--data", tmp_path, "--modality", "image", "--out", tmp_path / "m"]
    assert _train_cli(*base, "--norm", "batch").exit_code == 2
    assert _train_cli(*base, "--norm", "moving", "--epochs", "2", "--max-steps", "5").exit_code == 2
    assert _train_cli(*base, "--norm", "moving", "--reset-each-epoch").exit_code == 2
    assert (
        _train_cli(*base[:2], "--modality", "audio", "--norm", "moving", "--out", tmp_path / "m").exit_code
        == 2
    )


def test_cli_never_mixes_modalities(exec_manifest, tmp_path):
    """ELF files read as images: none is usable, a clear error, no bundle."""
    r = _train_cli(
        "--data", exec_manifest, "--modality", "image", "--norm", "moving", "--out", tmp_path / "m"
    )
    assert r.exit_code == 2 and "no usable image inputs" in r.output
    assert not (tmp_path / "m").exists()


def test_cli_writes_a_loadable_bundle_with_report(exec_manifest, tmp_path):
    out = tmp_path / "exec"
    args = ["--data", exec_manifest, "--modality", "executable", "--norm", "moving", "--size", "32"]
    args += ["--epochs", "2", "--batch-size", "16", "--embed-dim", "32", "--no-progress", "--out", out]
    r = _train_cli(*args)
    assert r.exit_code == 0, r.output
    b = load_bundle(out)
    assert b.id in r.output and "eval-mode" in r.output
    assert b.input_spec.modality == "executable" and b.input_spec.size == 32
    assert b.input_spec.representation == "bigram"  # the CLI's default for executables
    assert b.model_config.head == "flatten"  # bigram positions are byte pairs: kept, not averaged
    assert b.model_config.out_dim == 32 + 128 and b.model.generic_basis.abs().sum() > 0  # fitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "seconds_wall" in metrics["final"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = _train_cli(*args[:-2], "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert load_bundle(out).id == b.id  # same seed, same data: the same model
