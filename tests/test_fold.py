"""BN folding: same outputs as the unfolded eval model, and the original is never touched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from embedder.bundle import state_dict_equal
from embedder.fold import fold_batchnorm
from embedder.model import EmbedNet, ModelConfig, build_model
from embedder.norm import NormConfig, bn_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_looking(cfg: ModelConfig, seed: int = 0) -> EmbedNet:
    """Random BN statistics and affine parameters far from their 0/1 start, as after real training."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c) * 0.5)
            bn.running_var.copy_(torch.empty(c).uniform_(0.05, 4.0))
            bn.weight.copy_(torch.empty(c).uniform_(0.3, 2.0) * torch.sign(torch.randn(c)))
            bn.bias.copy_(torch.randn(c) * 0.3)
            bn.num_batches_tracked.fill_(500)
    return model.eval()


def inputs(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["moving", "cumulative"])
def test_folded_equals_unfolded_default_model(kind: str) -> None:
    model = trained_looking(ModelConfig(norm=NormConfig(kind=kind), num_classes=4))
    x = inputs(16, 64)
    folded = fold_batchnorm(model)
    with torch.no_grad():
        f_ref, f_fold = model.features(x), folded.features(x)
        e_ref, e_fold = model(x), folded(x)
        l_ref, l_fold = model.logits(e_ref), folded.logits(e_fold)
    scale = float(f_ref.abs().max())
    assert scale > 0.1  # the comparison is about real activations, not zeros
    assert float((f_ref - f_fold).abs().max()) <= 1e-4 * max(1.0, scale)
    assert float((e_ref - e_fold).abs().max()) <= 1e-4
    assert float((l_ref - l_fold).abs().max()) <= 1e-4 * model.cfg.classifier_scale
    # Every BN is gone and every unit's conv now has a bias.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert folded.stem.conv.bias is not None and getattr(folded, "folded", False)


def test_folded_shipped_executable_architecture_keeps_its_generic_part() -> None:
    """Patch stem, flatten head and a fitted generic part: folding changes none of the embedding."""
    cfg = ModelConfig(input_size=128, stem_stride=4, head="flatten", generic_dim=8, num_classes=4)
    model = trained_looking(cfg)
    x = inputs(24, 128)
    model.fit_generic_basis(x)
    assert model.generic_basis.abs().sum() > 0
    folded = fold_batchnorm(model)
    assert torch.equal(folded.generic_basis, model.generic_basis)
    with torch.no_grad():
        assert float((model(x) - folded(x)).abs().max()) <= 1e-4


def test_fold_never_touches_the_original() -> None:
    model = trained_looking(ModelConfig(input_size=32, widths=(8, 16), blocks=(1, 1)))
    model.train()
    before = copy.deepcopy(model)
    folded = fold_batchnorm(model)
    assert state_dict_equal(model, before)
    assert model.training and not folded.training
    assert sum(1 for _ in bn_layers(model)) == 6
    assert isinstance(model.stem.norm, nn.BatchNorm2d) and model.stem.conv.bias is None
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in folded.parameters())


@pytest.mark.parametrize("kind", ["none", "group"])
def test_models_without_batchnorm_fold_to_themselves(kind: str) -> None:
    cfg = ModelConfig(input_size=32, widths=(8, 16), blocks=(1, 1), norm=NormConfig(kind=kind))
    model = trained_looking(cfg)
    folded = fold_batchnorm(model)
    x = inputs(8, 32)
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))
    assert isinstance(folded.stem.norm, nn.GroupNorm if kind == "group" else nn.Identity)
