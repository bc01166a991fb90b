"""The BN health gate and the `check` / `recalibrate` commands, on small real trainings."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from embedder.bn_gate import (
    CONVERGED,
    NO_RUNNING_STATS,
    UNCONVERGED,
    GateThresholds,
    check_model,
    gate_passes,
)
from embedder.bundle import WEIGHTS, load_bundle, save_bundle, state_dict_equal
from embedder.inputs import InputSpec
from embedder.model import EmbedNet, ModelConfig, build_model
from embedder.norm import NormConfig, bn_layers
from embedder.precise_bn import recompute_bn_stats
from lookalike.cli import app
from tests.bn_models import striped_images

SIZE = 16
LABELS = ["horizontal", "vertical", "diagonal"]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def config(kind: str = "moving", momentum: float = 0.1) -> ModelConfig:
    return ModelConfig(
        input_size=SIZE,
        widths=(8, 16),
        blocks=(1, 1),
        embed_dim=16,
        num_classes=3,
        norm=NormConfig(kind=kind, momentum=momentum),
    )


def train(cfg: ModelConfig, x: np.ndarray, y: np.ndarray, steps: int = 60, seed: int = 0) -> EmbedNet:
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(x), 32, replace=False))
        _, logits = model.forward_train(xt[idx])
        loss = F.cross_entropy(logits, yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    return striped_images(240, SIZE)


@pytest.fixture(scope="module")
def calibrated(sample) -> EmbedNet:
    """A trained model whose statistics were made precise on its own sample: the gate must pass it."""
    x, y = sample
    model = train(config(), x, y)
    recompute_bn_stats(model, x)
    return model


def corrupted(model: EmbedNet, layer: str, how: str) -> EmbedNet:
    bad = copy.deepcopy(model)
    bn = dict(bn_layers(bad))[layer]
    with torch.no_grad():
        if how == "var*10":
            bn.running_var.mul_(10)
        elif how == "reset":
            bn.reset_running_stats()
        elif how == "nan":
            bn.running_var[0] = float("nan")
    return bad


def layer_names_in(reasons: list[str]) -> set[str]:
    return {r.split(":", 1)[0] for r in reasons if r.split(":", 1)[0].endswith(".norm")}


# ----------------------------------------------------------------------------------------- the gate


def test_well_calibrated_model_is_converged_and_left_untouched(calibrated, sample) -> None:
    x, y = sample
    before = copy.deepcopy(calibrated)
    report = check_model(calibrated, x, y, batch_size=32)
    assert report.verdict == CONVERGED, report.reasons
    assert gate_passes(report) and report.reasons == []
    assert len(report.layers) == 6
    assert max(lr.mean_shift_p95 for lr in report.layers) < 1e-3
    f = report.functional
    assert f is not None and f.cosine_mean > 0.9999 and f.top1_agreement == 1.0
    assert f.eval_accuracy is not None and f.eval_accuracy > 0.9  # the classes were learnt
    assert f.train_accuracy is not None and abs(f.eval_accuracy - f.train_accuracy) <= 0.05
    assert state_dict_equal(calibrated, before) and not calibrated.training
    json.dumps(report.to_dict(), allow_nan=False)


def test_statistics_at_init_are_unconverged_naming_every_layer(sample) -> None:
    x, y = sample
    model = build_model(config()).eval()  # never trained: 0/1 statistics, no batches tracked
    report = check_model(model, x, y)
    assert report.verdict == UNCONVERGED and not gate_passes(report)
    names = {name for name, _ in bn_layers(model)}
    at_init = [r for r in report.reasons if "initial values" in r]
    assert layer_names_in(at_init) == names
    assert all(lr.at_init and lr.failed == ["at_init"] for lr in report.layers)
    assert "num_batches_tracked 0" in at_init[0]


@pytest.mark.parametrize(
    ("layer", "how", "criterion"),
    [
        ("stages.0.b.norm", "var*10", "log_var_ratio"),
        ("stages.1.a.norm", "reset", "at_init"),
        ("stem.norm", "nan", "log_var_ratio"),
    ],
)
def test_hand_corrupted_layer_is_named(calibrated, sample, layer: str, how: str, criterion: str) -> None:
    x, y = sample
    report = check_model(corrupted(calibrated, layer, how), x, y, batch_size=32)
    assert report.verdict == UNCONVERGED
    # Earlier layers are repaired before a later one is measured, so only the corrupted layer fails.
    assert layer_names_in(report.reasons) == {layer}
    failed = {lr.name: lr.failed for lr in report.layers if lr.failed}
    assert list(failed) == [layer] and criterion in failed[layer]
    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # NaN statistics do not leak into the JSON
    if how == "var*10":
        lr = next(lr for lr in report.layers if lr.name == layer)
        assert lr.log_var_ratio_p95 == pytest.approx(math.log(10), rel=1e-3)
        assert lr.var_ratio_median == pytest.approx(10, rel=1e-3)


@pytest.mark.parametrize("kind", ["none", "group"])
def test_no_running_statistics_passes(kind: str, sample) -> None:
    x, y = sample
    report = check_model(build_model(config(kind)), x[:10], y[:10])  # no BN: no sample size needed
    assert report.verdict == NO_RUNNING_STATS and gate_passes(report)
    assert report.layers == [] and report.norm["kind"] == kind


def test_thresholds_decide_and_reports_are_bound_to_a_model(calibrated, sample) -> None:
    x, y = sample
    bad = corrupted(calibrated, "stages.0.b.norm", "var*10")
    loose = GateThresholds(
        log_var_ratio_p95=3.0, min_cosine=0.0, min_top1_agreement=0.0, max_accuracy_drop=1.0
    )
    assert check_model(bad, x, y, thresholds=loose).verdict == CONVERGED
    report = check_model(calibrated, x, y, model_id="abc").to_dict()
    assert gate_passes(report, model_id="abc") and not gate_passes(report, model_id="other")


def test_undertrained_moving_model_fails_functionally(sample) -> None:
    """The failure the gate exists for, in miniature: momentum 0.01, 30 steps (74% of the 0/1 start
    values still in the running statistics)."""
    x, y = sample
    model = train(config(momentum=0.01), x, y, steps=30)
    report = check_model(model, x, y, batch_size=32)
    assert report.verdict == UNCONVERGED
    assert report.layers[0].num_batches_tracked == 30
    assert any("mean cosine" in r or "accuracy" in r or "agreement" in r for r in report.reasons)
    repaired = copy.deepcopy(model)
    recompute_bn_stats(repaired, x)
    assert check_model(repaired, x, y, batch_size=32).verdict == CONVERGED


# ------------------------------------------------------------------------------------------ the CLI


def make_bundle(path: Path, model: EmbedNet, x: np.ndarray, y: np.ndarray) -> Path:
    save_bundle(path, model, InputSpec.for_modality("image", size=SIZE), LABELS, x, y)
    return path


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def test_recalibrate_repairs_a_corrupted_bundle_without_touching_it(calibrated, sample, tmp_path) -> None:
    x, y = sample
    old = make_bundle(tmp_path / "old", corrupted(calibrated, "stages.0.b.norm", "var*10"), x, y)
    old_id = load_bundle(old).id
    before = tree_hash(old)

    r = runner.invoke(app, ["check", str(old), "--json", "--batch-size", "32"])
    assert r.exit_code == 1, r.output
    d = json.loads(r.output)
    assert d["verdict"] == UNCONVERGED and d["bundle"]["id"] == old_id
    assert [lr["name"] for lr in d["layers"] if lr["failed"]] == ["stages.0.b.norm"]
    text = runner.invoke(app, ["check", str(old)])
    assert text.exit_code == 1 and "stages.0.b.norm" in text.output and "unconverged" in text.output

    r = runner.invoke(app, ["recalibrate", str(old), "--out", str(tmp_path / "new"), "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    new = load_bundle(tmp_path / "new")
    assert new.id != old_id and f"{old_id} -> {new.id}" in r.output
    assert new.provenance["recalibrated_from"] == old_id
    recal = new.provenance["recalibration"]
    assert recal == {"source": "calibration sample", "samples": 240, "estimator": "precise_bn"}
    assert new.bn_report is not None and new.bn_report["verdict"] == CONVERGED
    assert new.bn_report["bundle"]["id"] == new.id
    assert tree_hash(old) == before, "recalibrate modified its input"

    assert runner.invoke(app, ["check", str(tmp_path / "new")]).exit_code == 0
    assert runner.invoke(app, ["check", str(old)]).exit_code == 1
    assert tree_hash(old) == before, "check modified the bundle"
    # Only --write-report writes, and the report is not part of the bundle id.
    assert runner.invoke(app, ["check", str(old), "--write-report"]).exit_code == 1
    rewritten = load_bundle(old)
    assert rewritten.id == old_id and rewritten.bn_report is not None
    assert rewritten.bn_report["verdict"] == UNCONVERGED and rewritten.bn_report["bundle"]["id"] == old_id


def test_recalibrate_refits_the_generic_part(sample, tmp_path) -> None:
    x, y = sample
    cfg = dataclasses.replace(config(), head="flatten", generic_dim=4)
    model = train(cfg, x, y)
    model.fit_generic_basis(torch.from_numpy(x))
    old = make_bundle(tmp_path / "old", corrupted(model, "stages.0.b.norm", "var*10"), x, y)
    r = runner.invoke(app, ["recalibrate", str(old), "--out", str(tmp_path / "new"), "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    new = load_bundle(tmp_path / "new")
    # The new basis is the principal directions of the recalibrated features over the carried sample.
    expected = copy.deepcopy(new.model)
    expected.fit_generic_basis(torch.from_numpy(new.calibration_x))
    assert torch.equal(new.model.generic_basis, expected.generic_basis)
    assert not torch.equal(new.model.generic_basis, load_bundle(old).model.generic_basis)


def test_recalibrate_refuses_to_write_over_its_input(calibrated, sample, tmp_path) -> None:
    x, y = sample
    old = make_bundle(tmp_path / "b", calibrated, x, y)
    before = tree_hash(old)
    for out in (old, tmp_path, old / "inner"):
        r = runner.invoke(app, ["recalibrate", str(old), "--out", str(out), "--overwrite"])
        assert r.exit_code == 2 and "overwrite the input" in r.output
    assert tree_hash(old) == before


def test_check_exits_2_on_unusable_input(calibrated, sample, tmp_path) -> None:
    x, y = sample
    r = runner.invoke(app, ["check", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a bundle directory" in r.output

    broken = make_bundle(tmp_path / "broken", calibrated, x, y)
    weights = broken / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    r = runner.invoke(app, ["check", str(broken), "--json"])
    assert r.exit_code == 2 and json.loads(r.output)["error"] == "unusable_input"
    assert "sha256 does not match" in json.loads(r.output)["message"]

    tiny = make_bundle(tmp_path / "tiny", calibrated, x[:20], y[:20])
    r = runner.invoke(app, ["check", str(tiny)])
    assert r.exit_code == 2 and "at least 64 samples; got 20" in r.output

    r = runner.invoke(app, ["check", str(tiny), "--data", str(tmp_path / "no-such-data")])
    assert r.exit_code == 2 and "no-such-data" in r.output


def test_check_and_recalibrate_with_a_data_spec(calibrated, sample, tmp_path) -> None:
    """--data SPEC: a directory of labelled images, labels matched to the bundle's by name."""
    x, y = sample
    data = tmp_path / "data"
    for i, (img, label) in enumerate(zip(*striped_images(90, SIZE, seed=5), strict=True)):
        d = data / LABELS[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(d / f"{i}.png")
    bundle = make_bundle(tmp_path / "b", corrupted(calibrated, "stages.1.a.norm", "reset"), x, y)
    r = runner.invoke(app, ["check", str(bundle), "--data", str(data), "--json"])
    assert r.exit_code == 1, r.output
    d = json.loads(r.output)
    assert d["source"] == str(data) and d["n_samples"] == 90 and d["functional"]["labelled"] == 90
    out = tmp_path / "n"
    r = runner.invoke(app, ["recalibrate", str(bundle), "--data", str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    new = load_bundle(tmp_path / "n")
    assert new.provenance["recalibration"]["source"] == str(data)
    assert len(new.calibration_x) == 90  # the sample the statistics came from
    r = runner.invoke(app, ["check", str(bundle), "--data", str(tmp_path / "nope")])
    assert r.exit_code == 2
