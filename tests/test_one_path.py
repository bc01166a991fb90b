"""Training and serving share one preprocessing function: the same bytes give the same tensor, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from embedder.dataspec import load_data
from embedder.embed import Embedder
from embedder.inputs import InputSpec, prepare
from service.parser_pool import ParserPool
from tests.conftest import image_bytes


@pytest.mark.parametrize("representation", ["nataraj", "bigram"])
def test_executables_training_and_serving_paths_agree(small_elfs, pe_path, tmp_path, representation):
    spec = InputSpec(modality="executable", representation=representation, size=64)
    (tmp_path / "elf").mkdir()
    (tmp_path / "pe").mkdir()
    for p in small_elfs[:6]:
        shutil.copy(p, tmp_path / "elf" / p.name)
    shutil.copy(pe_path, tmp_path / "pe" / pe_path.name)

    # Training: files read and preprocessed in worker processes by the data loader.
    data = load_data(str(tmp_path), spec, workers=2, progress=False)
    assert len(data) == 7
    # Serving: uploads parsed in the isolated parser pool.
    pool = ParserPool(workers=1, timeout_s=60)
    try:
        for name, x in zip(data.names, data.x, strict=True):
            raw = Path(name).read_bytes()
            served = pool.prepare_sync(raw, spec)
            assert served.array.dtype == x.dtype and np.array_equal(served.array, x), name
            assert np.array_equal(prepare(raw, spec).array, x)
    finally:
        pool.close()


def test_images_training_and_serving_paths_agree(tmp_path):
    spec = InputSpec.for_modality("image")
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.png").write_bytes(
                image_bytes("PNG", size=(50, 40), seed=i + 10 * ord(label))
            )
    data = load_data(str(tmp_path), spec, workers=2, progress=False)
    assert len(data) == 6
    for name, x in zip(data.names, data.x, strict=True):
        raw = Path(name).read_bytes()
        assert np.array_equal(prepare(raw, spec).array, x)


def test_embedder_uses_the_same_arrays(tmp_path, small_elfs):
    """Serving's Embedder.prepare is the same function; its embedding of those arrays is the model's."""
    import torch

    from embedder.bundle import save_bundle
    from embedder.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2)).eval()
    spec = InputSpec()
    arrays = np.stack([prepare(p.read_bytes(), spec).array for p in small_elfs[:4]])
    save_bundle(tmp_path / "b", model, spec, ["a", "b"], arrays, np.array([0, 1, 0, 1]))
    emb = Embedder.from_bundle(tmp_path / "b")
    for p, x in zip(small_elfs[:4], arrays, strict=True):
        prepared, vector = emb.embed_file(p)
        assert np.array_equal(prepared.array, x)
        with torch.no_grad():
            expected = model(torch.from_numpy(x[None].copy()))[0].numpy()
        np.testing.assert_allclose(vector, expected, atol=1e-6)
