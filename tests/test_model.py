"""The CNN: unit embeddings, and in eval mode an item's embedding never depends on its batch-mates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from embedder.embed import Embedder, freeze
from embedder.model import ModelConfig, build_model
from embedder.norm import NORM_KINDS, NormConfig


def _warm_model(kind: str, seed: int = 0, size: int = 32):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(input_size=size, norm=NormConfig(kind=kind), num_classes=3))
    model.train()
    with torch.no_grad():  # give BN layers non-trivial running statistics
        for _ in range(3):
            model(torch.randint(0, 256, (16, 1, size, size), dtype=torch.uint8))
    return model


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_eval_embedding_is_independent_of_batch_mates(kind):
    model = freeze(_warm_model(kind))
    x = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        alone = model(x[:1])
        in_batch = model(x)[:1]
    assert (alone - in_batch).abs().max().item() <= 1e-5


def test_train_mode_batchnorm_does_depend_on_batch_mates():
    # The control for the test above: the property is not trivially true.
    model = _warm_model("moving").train()
    x = torch.randint(0, 256, (64, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert (model(x[:2]) - model(x)[:2]).abs().max().item() > 1e-3


def test_embeddings_are_unit_vectors_and_logits_have_classes():
    model = _warm_model("cumulative").eval()
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        emb, logits = model.forward_train(x)
    assert emb.shape == (5, 128) and logits.shape == (5, 3)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))


def test_uint8_and_prescaled_float_inputs_agree():
    model = _warm_model("group").eval()
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float() / 127.5 - 1))


def test_configurable_widths_depth_channels():
    cfg = ModelConfig(
        in_channels=3, input_size=28, widths=(16, 32), blocks=(2, 1), stem_stride=1, embed_dim=64
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    assert out.shape == (2, 64)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RuntimeError, match="no classifier"):
        model.logits(out)


@pytest.mark.parametrize(("size", "stem_stride", "final"), [(64, 2, 8), (28, 2, 4), (32, 1, 8)])
def test_flatten_head_sees_where_features_fire(size, stem_stride, final):
    cfg = ModelConfig(input_size=size, stem_stride=stem_stride, head="flatten", num_classes=2)
    assert cfg.final_size == final and ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.proj.in_features == 128 * final * final
    # The same pattern at two places of a bigram image means two different byte pairs: the flatten head
    # tells them apart; global average pooling (the control) is nearly blind to the move.
    x = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    x[0, 0, :8, :8] = 255
    x[1, 0, -8:, -8:] = 255
    avg = build_model(ModelConfig(input_size=size, stem_stride=stem_stride, num_classes=2)).eval()
    with torch.no_grad():
        cos_flat = (model(x[:1]) * model(x[1:])).sum().item()
        cos_avg = (avg(x[:1]) * avg(x[1:])).sum().item()
    assert cos_flat < cos_avg and cos_avg > 0.95


def test_old_bundle_configs_default_to_average_pooling():
    d = ModelConfig().to_dict()
    del d["head"]  # written before the head was configurable
    assert ModelConfig.from_dict(d).head == "avg"
    with pytest.raises(ValueError, match="head must be one of"):
        ModelConfig(head="max")


def test_generic_part_is_the_principal_directions_of_the_features():
    torch.manual_seed(0)
    cfg = ModelConfig(
        input_size=32, head="flatten", generic_dim=6, num_classes=3, norm=NormConfig(kind="none")
    )
    model = build_model(cfg).eval()
    x = torch.randint(0, 256, (50, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        assert before.shape == (50, cfg.out_dim) and not before[:, 128:].any()  # unfitted: trained part only
        model.fit_generic_basis(x)
        after = model(x)
        h = model.head_input(x).double()
    torch.testing.assert_close(after.norm(dim=1), torch.ones(50))
    basis = model.generic_basis.double()
    torch.testing.assert_close(basis @ basis.t(), torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    # The first direction is numpy's leading right singular vector of the centred features (up to sign).
    v0 = np.linalg.svd((h - h.mean(0)).numpy(), full_matrices=False)[2][0]
    assert abs(float(np.dot(v0, basis[0].numpy()))) > 0.999
    # The classifier reads the trained part only, whether it is given the full embedding or not.
    with torch.no_grad():
        torch.testing.assert_close(model.logits(after), model.logits(before), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.logits(after), model.forward_train(x)[1], atol=1e-5, rtol=0)
    refit = copy.deepcopy(model)
    refit.fit_generic_basis(x)
    assert torch.equal(refit.generic_basis, model.generic_basis)  # same features, same basis and signs


def test_embedder_freezes_the_model(tmp_path):
    from embedder.bundle import save_bundle
    from embedder.inputs import InputSpec

    model = _warm_model("moving", size=64)
    cal = torch.randint(0, 256, (8, 1, 64, 64), dtype=torch.uint8).numpy()
    save_bundle(tmp_path / "b", model, InputSpec(), ["a", "b", "c"], cal, cal[:, 0, 0, 0] % 3)
    emb = Embedder.from_bundle(tmp_path / "b")
    assert not emb.model.training and not any(p.requires_grad for p in emb.model.parameters())
