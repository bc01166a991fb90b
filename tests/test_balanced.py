"""Batch-statistics inference and the balanced-batch experiment, on a Fashion-MNIST subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedder.dataspec import load_data
from embedder.norm import bn_layers
from tests.conftest import FASHION
from training.balanced import (
    BalancedConfig,
    balanced_test_batches,
    batch_predictions,
    batch_probs,
    batch_statistics_model,
    run_balanced_experiment,
    standard_probs,
)
from training.loop import TrainConfig, train
from training.splits import make_split

pytestmark = [
    pytest.mark.fashion,
    pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of ten images gain nothing from a second thread, and lose a lot on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fashion():
    cfg = TrainConfig(modality="image").resolved()
    return load_data(f"idx:{FASHION}", cfg.input_spec(), progress=False, limit_per_class=20)


@pytest.fixture(scope="module")
def trained(fashion):
    """A model after a few balanced steps: running statistics have moved away from 0/1."""
    cfg = TrainConfig(modality="image", sampler="balanced", max_steps=15, eval_subset=64, threads=1)
    result = train(fashion, make_split(fashion, "seen"), cfg, progress=False)
    split = make_split(fashion, "seen")
    return result.model, fashion.x[split.test], result.label_map[fashion.y[split.test]]


def _one_per_class(y: np.ndarray, pick: int = 0) -> np.ndarray:
    return np.array([np.flatnonzero(y == c)[pick] for c in np.unique(y)])


def test_batch_statistics_differ_from_running_statistics(trained):
    model, x, y = trained
    batch = _one_per_class(y)
    running = standard_probs(model, x[batch])
    own = batch_probs(batch_statistics_model(model), x[batch])
    assert np.abs(running - own).max() > 1e-3


def test_batch_statistics_ignore_order_within_the_batch(trained):
    model, x, y = trained
    bs = batch_statistics_model(model)
    batch = _one_per_class(y)
    perm = np.random.default_rng(1).permutation(len(batch))
    a = batch_probs(bs, x[batch])
    b = batch_probs(bs, x[batch[perm]])
    np.testing.assert_allclose(a[perm], b, atol=1e-5)


def test_batch_statistics_depend_on_the_batch_mates(trained):
    model, x, y = trained
    bs = batch_statistics_model(model)
    first, second = _one_per_class(y, 0), _one_per_class(y, 1)
    mixed = second.copy()
    mixed[0] = first[0]  # same image at slot 0, nine different batch-mates
    a = batch_probs(bs, x[first])[0]
    b = batch_probs(bs, x[mixed])[0]
    assert np.abs(a - b).max() > 1e-4


def test_batch_statistics_never_touch_the_model(trained):
    model, x, y = trained
    before = {name: bn.running_mean.clone() for name, bn in bn_layers(model)}
    bs = batch_statistics_model(model)
    batch_predictions(bs, x, balanced_test_batches(y, seed=0))
    for name, bn in bn_layers(model):
        assert torch.equal(bn.running_mean, before[name])
    assert not model.training


def test_balanced_test_batches_hold_one_item_per_class_and_cover_the_set(fashion):
    y = fashion.y[make_split(fashion, "seen").test]
    batches = balanced_test_batches(y, seed=3)
    assert all(sorted(y[b].tolist()) == list(range(10)) for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(y)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, balanced_test_batches(y, 4), strict=True))


@pytest.mark.slow
def test_experiment_runs_end_to_end_on_a_subset(fashion):
    cfg = BalancedConfig(max_steps=6, passes=2, probe_mates=3, threads=1)
    report = run_balanced_experiment(cfg, data=fashion, progress=False)
    got = [(r.training, r.inference) for r in report.rows]
    assert got == [
        ("random", "standard"),
        ("balanced", "standard"),
        ("balanced", "balanced"),
        ("balanced", "balanced-shuffled"),
        ("random", "balanced"),
        ("balanced", "random-batches"),
        ("random", "random-batches"),
    ]
    assert all(0.0 <= r.error <= 1.0 for r in report.rows)
    assert report.row("balanced", "balanced-shuffled").passes == 2
    assert report.config["random_batch_size"] == 10  # same batch size as balanced: only composition differs
    probe = report.probe
    assert probe is not None and len(probe.rows) == 20  # 10 slots + 10 positions
    assert probe.position_max_logit_diff < 1e-4
    assert sum(probe.mates_counts.values()) == 3
    assert [r.where for r in probe.rows if r.case == "position"] == list(range(10))
    assert probe.takes_missing_class()[1] == 9  # every slot but the image's own class unbalances
    text = report.to_markdown()
    assert "balanced / balanced-shuffled" in text and "relative error reduction" in text
