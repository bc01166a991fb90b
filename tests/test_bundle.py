"""Bundles: exact round trips, and every kind of damage refused with the file named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from embedder.bundle import CALIBRATION, CONFIG, WEIGHTS, load_bundle, save_bundle, state_dict_equal
from embedder.embed import Embedder
from embedder.errors import BundleError
from embedder.inputs import InputSpec
from embedder.model import ModelConfig, build_model
from embedder.norm import NormConfig


@pytest.fixture()
def bundle_dir(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(norm=NormConfig(kind="moving"), num_classes=3))
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (16, 1, 64, 64), dtype=torch.uint8))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 1, 64, 64), dtype=np.uint8)
    y = np.arange(12) % 3
    path = tmp_path / "bundle"
    bid = save_bundle(path, model.eval(), InputSpec(), ["a", "b", "c"], x, y, data_fingerprint="fp")
    return path, bid, model, x


def test_round_trip_gives_identical_embeddings(bundle_dir):
    path, bid, model, x = bundle_dir
    b = load_bundle(path)
    assert b.id == bid and b.labels == ["a", "b", "c"] and b.data_fingerprint == "fp"
    assert state_dict_equal(b.model, model)
    assert np.array_equal(b.calibration_x, x)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    assert np.array_equal(Embedder(b).embed_arrays(x), expected)
    assert load_bundle(path).id == bid  # the id is a pure function of the files


def test_generic_part_travels_with_the_bundle(tmp_path):
    """The fitted principal directions are a buffer: saved, hashed into the id, restored exactly."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        input_size=32, head="flatten", generic_dim=8, norm=NormConfig(kind="none"), num_classes=3
    )
    model = build_model(cfg).eval()
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 32, 32), dtype=np.uint8)
    y = np.arange(40) % 3
    bid_unfitted = save_bundle(tmp_path / "u", model, InputSpec(size=32), ["a", "b", "c"], x, y)
    model.fit_generic_basis(torch.from_numpy(x))
    bid = save_bundle(tmp_path / "f", model, InputSpec(size=32), ["a", "b", "c"], x, y)
    assert bid != bid_unfitted
    b = load_bundle(tmp_path / "f")
    assert torch.equal(b.model.generic_basis, model.generic_basis) and b.model_config.out_dim == cfg.out_dim
    emb = Embedder(b).embed_arrays(x)
    assert emb.shape == (40, 128 + 8)
    with torch.no_grad():
        assert np.array_equal(emb, model(torch.from_numpy(x)).numpy())


def test_bundles_from_before_the_configurable_head_still_load(bundle_dir):
    """Bundles written before `head` and `generic_dim` existed (e.g. a `make up` var/ from then)."""
    path, _bid, model, x = bundle_dir
    # The weights of a model without a generic part have exactly the tensors they had then...
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        assert "generic_basis" not in set(f.keys())
    # ...and the configuration lacks the two keys added since.
    config = json.loads((path / CONFIG).read_text())
    for key in ("head", "generic_dim"):
        del config["model"][key]
    (path / CONFIG).write_text(json.dumps(config))
    b = load_bundle(path)
    assert b.model_config.head == "avg" and b.model_config.out_dim == 128
    with torch.no_grad():
        assert np.array_equal(Embedder(b).embed_arrays(x), model.eval()(torch.from_numpy(x)).numpy())


def test_id_changes_with_the_weights(bundle_dir, tmp_path):
    _, bid, model, x = bundle_dir
    model.stem.norm.running_var.mul_(2)
    other = save_bundle(tmp_path / "other", model, InputSpec(), ["a", "b", "c"], x, np.arange(12) % 3)
    assert other != bid


def test_tampered_weights_refused(bundle_dir):
    path, *_ = bundle_dir
    raw = bytearray((path / WEIGHTS).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"weights\.safetensors.*sha256"):
        load_bundle(path)


def test_truncated_weights_refused(bundle_dir):
    path, *_ = bundle_dir
    raw = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(raw[: len(raw) // 3])
    with pytest.raises(BundleError, match=r"weights\.safetensors"):
        load_bundle(path)


def test_truncated_weights_with_matching_hash_still_refused(bundle_dir):
    # Even someone who updates config.json's hash gets a clear error from the safetensors reader.
    import hashlib

    path, *_ = bundle_dir
    raw = (path / WEIGHTS).read_bytes()[:1000]
    (path / WEIGHTS).write_bytes(raw)
    cfg = json.loads((path / CONFIG).read_text())
    cfg["files"][WEIGHTS] = hashlib.sha256(raw).hexdigest()
    (path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"weights\.safetensors: unreadable"):
        load_bundle(path)


def test_mismatched_architecture_refused(bundle_dir):
    path, *_ = bundle_dir
    cfg = json.loads((path / CONFIG).read_text())
    cfg["model"]["widths"] = [16, 32, 64]
    (path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="does not match the architecture"):
        load_bundle(path)


def test_corrupt_or_missing_files_refused(bundle_dir, tmp_path):
    path, *_ = bundle_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / CONFIG).write_text("{not json")
    with pytest.raises(BundleError, match=r"config\.json: not valid JSON"):
        load_bundle(broken)
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / CALIBRATION).unlink()
    with pytest.raises(BundleError, match=r"calibration\.npz: missing"):
        load_bundle(missing)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_pickled_calibration_is_never_loaded(bundle_dir):
    import hashlib

    path, *_ = bundle_dir
    np.savez(path / CALIBRATION, x=np.array([object()], dtype=object), y=np.zeros(1))
    cfg = json.loads((path / CONFIG).read_text())
    cfg["files"][CALIBRATION] = hashlib.sha256((path / CALIBRATION).read_bytes()).hexdigest()
    (path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"calibration\.npz: unreadable"):
        load_bundle(path)


def test_existing_directory_needs_overwrite(bundle_dir):
    path, _, model, x = bundle_dir
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(path, model, InputSpec(), ["a", "b", "c"], x, np.arange(12) % 3)
    save_bundle(path, model, InputSpec(), ["a", "b", "c"], x, np.arange(12) % 3, overwrite=True)
    assert load_bundle(path).labels == ["a", "b", "c"]
