"""Precise BN statistics: the population estimator, layer by layer, against direct computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedder.bundle import state_dict_equal
from embedder.model import EmbedNet, ModelConfig, build_model
from embedder.norm import NormConfig, bn_layers
from embedder.precise_bn import MIN_SAMPLES, NotEnoughData, precise_statistics, recompute_bn_stats
from tests.bn_models import striped_images

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(kind: str = "moving", seed: int = 0) -> EmbedNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        input_size=16, widths=(8, 16), blocks=(1, 1), embed_dim=16, num_classes=3, norm=NormConfig(kind=kind)
    )
    model = build_model(cfg)
    with torch.no_grad():  # trained-looking affine parameters
        for _, bn in bn_layers(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def layer_inputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every BN layer's input over the whole sample in ONE eval-mode pass, as (C, N*H*W) float64."""
    out: dict[str, np.ndarray] = {}
    hooks = [
        bn.register_forward_pre_hook(
            lambda _m, a, name=name: out.__setitem__(
                name, a[0].detach().double().transpose(0, 1).reshape(a[0].shape[1], -1).numpy()
            )
        )
        for name, bn in bn_layers(model)
    ]
    with torch.no_grad():
        model.eval()(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    return out


def test_stored_statistics_are_the_population_statistics_inference_sees() -> None:
    """After recalibration every BN input, in one eval pass over the whole sample, has exactly the stored
    mean and unbiased variance: the defining property of layer-by-layer precise statistics (a fvcore-style
    pass with batch-normalised earlier layers does not have it)."""
    x, _ = striped_images(300)
    model = small_model()
    recompute_bn_stats(model, x, batch_size=37)  # 37 does not divide 300: uneven last batch
    inputs = layer_inputs(model, x)
    assert len(inputs) == 6
    for name, bn in bn_layers(model):
        a = inputs[name]
        tol = {"atol": 1e-5, "rtol": 1e-5, "err_msg": name}
        np.testing.assert_allclose(bn.running_mean.numpy(), a.mean(1), **tol)
        np.testing.assert_allclose(bn.running_var.numpy(), a.var(1, ddof=1), **tol)
        assert int(bn.num_batches_tracked) == 9  # ceil(300 / 37)


def test_first_layer_equals_numpy_on_the_conv_output() -> None:
    """The stem's statistics against a computation that shares no code with the estimator."""
    x, _ = striped_images(200)
    model = small_model()
    stats = precise_statistics(model, [torch.from_numpy(x[i : i + 64]) for i in range(0, 200, 64)])
    conv = model.stem.conv
    scaled = torch.from_numpy(x).double() / 127.5 - 1.0
    h = F.conv2d(scaled, conv.weight.detach().double(), None, conv.stride, 1)
    a = h.transpose(0, 1).reshape(h.shape[1], -1).numpy()
    mean, var = stats["stem.norm"]
    assert mean.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), a.mean(1), atol=1e-6)
    np.testing.assert_allclose(var.numpy(), a.var(1, ddof=1), rtol=1e-6)


def test_population_variance_is_not_the_mean_of_batch_variances() -> None:
    """Class-sorted batches: each batch is one class, so averaging per-batch variances drops the
    between-class spread.  The precise statistics do not depend on how the sample is batched."""
    x, y = striped_images(192)
    order = np.argsort(y, kind="stable")
    xs = x[order]
    model = small_model()
    by_class = precise_statistics(model, [torch.from_numpy(xs[i : i + 64]) for i in range(0, 192, 64)])
    one_batch = precise_statistics(model, [torch.from_numpy(xs)])
    for name in by_class:
        for a, b in zip(by_class[name], one_batch[name], strict=True):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)

    conv = model.stem.conv
    batch_vars = []
    for i in range(0, 192, 64):
        h = conv(torch.from_numpy(xs[i : i + 64]).float() / 127.5 - 1.0).detach().double()
        batch_vars.append(h.transpose(0, 1).reshape(h.shape[1], -1).var(1))
    mean_of_batch_var = torch.stack(batch_vars).mean(0)
    pop_var = by_class["stem.norm"][1]
    # The brightness differs by class, so the between-batch part is a large share of the variance.
    assert torch.all(mean_of_batch_var < pop_var)
    assert float((pop_var / mean_of_batch_var).median()) > 1.1


def test_too_small_sample_is_refused_with_the_needed_count() -> None:
    x, _ = striped_images(20)
    model = small_model()
    before = copy.deepcopy(model)
    with pytest.raises(NotEnoughData, match=rf"at least {MIN_SAMPLES} samples; got 20") as info:
        recompute_bn_stats(model, x)
    assert info.value.need == MIN_SAMPLES and info.value.have == 20
    assert state_dict_equal(model, before)
    with pytest.raises(NotEnoughData, match="at least 500 samples; got 300"):
        precise_statistics(model, [torch.from_numpy(striped_images(300)[0])], min_samples=500)


def test_inputs_are_left_alone_and_modes_kept() -> None:
    x, _ = striped_images(128)
    model = small_model().train()
    before = copy.deepcopy(model)
    precise_statistics(model, [torch.from_numpy(x)])
    assert state_dict_equal(model, before) and model.training
    recompute_bn_stats(model, x)
    assert model.training  # mode kept; only the running buffers changed
    assert all(not torch.all(bn.running_var == 1) for _, bn in bn_layers(model))


def test_models_without_running_statistics_give_nothing() -> None:
    x, _ = striped_images(8)  # too few for BN, but there is no BN: nothing to refuse
    for kind in ("none", "group"):
        model = small_model(kind)
        assert precise_statistics(model, [torch.from_numpy(x)]) == {}


def test_one_pass_equals_one_pass_per_layer(monkeypatch):
    """The single whole-sample pass is an optimisation: it must give the per-layer result exactly."""
    import embedder.precise_bn as precise_bn
    from embedder.model import ModelConfig, build_model

    torch.manual_seed(3)
    model = build_model(ModelConfig(input_size=32)).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8))
    x = np.random.default_rng(3).integers(0, 256, (150, 1, 32, 32), dtype=np.uint8)
    one = precise_bn.precise_statistics(model, precise_bn.as_batches(x, 64))
    monkeypatch.setattr(precise_bn, "ONE_PASS_MAX", 0)
    per_layer = precise_bn.precise_statistics(model, precise_bn.as_batches(x, 64))
    assert one.keys() == per_layer.keys() and len(one) == 9
    for name in one:
        torch.testing.assert_close(one[name][0], per_layer[name][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(one[name][1], per_layer[name][1], rtol=1e-9, atol=1e-9)
