"""Each normalisation variant keeps exactly the running statistics the DESIGN table documents."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embedder.norm import NormConfig, bn_layers, conv_bias, norm_layer, on_epoch_start


def _batches(n: int, c: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Batches from shifting distributions, so averaging schemes give visibly different answers.
    return [torch.randn(8, c, 5, 5, generator=g) * (1 + i) + 3 * i for i in range(n)]


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def test_cumulative_is_the_plain_mean_of_batch_statistics():
    bn = norm_layer(NormConfig(kind="cumulative"), 4).train()
    batches = _batches(7)
    for x in batches:
        bn(x)
    means, variances = zip(*(_batch_stats(x) for x in batches), strict=True)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 7


@pytest.mark.parametrize("m", [0.01, 0.1, 0.5])
def test_moving_follows_the_ema_formula(m):
    bn = norm_layer(NormConfig(kind="moving", momentum=m), 4).train()
    mean, var = torch.zeros(4), torch.ones(4)
    for x in _batches(6):
        bn(x)
        bm, bv = _batch_stats(x)
        mean, var = (1 - m) * mean + m * bm, (1 - m) * var + m * bv
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)


def test_keras_099_is_momentum_001_and_lags_far_behind():
    slow = norm_layer(NormConfig(kind="moving", momentum=0.01), 4).train()
    batches = _batches(10)
    for x in batches:
        slow(x)
    overall = torch.cat(batches).mean().item()  # about 13.5
    # Ten batches into an EMA with m=0.01 the running mean still holds ~90% of its initial zero.
    assert slow.running_mean.mean().item() < 0.15 * overall


@pytest.mark.parametrize("kind", ["none", "group"])
def test_batch_independent_variants_keep_no_statistics(kind):
    layer = norm_layer(NormConfig(kind=kind), 8)
    assert not any(True for _ in layer.buffers())
    assert list(bn_layers(nn.Sequential(layer))) == []
    layer.train()
    x = torch.randn(6, 8, 4, 4)
    alone = layer(x[:1])
    with_others = layer(x)[:1]
    torch.testing.assert_close(alone, with_others)  # no batch statistics, even in train mode


def test_group_norm_uses_a_divisor_of_the_channels():
    layer = norm_layer(NormConfig(kind="group", groups=8), 12)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 6


def test_reset_each_epoch_resets_cumulative_statistics():
    cfg = NormConfig(kind="cumulative", reset_each_epoch=True)
    model = nn.Sequential(norm_layer(cfg, 4)).train()
    for x in _batches(3):
        model(x)
    on_epoch_start(model, cfg)
    bn = model[0]
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(4))
    last = _batches(5)[-1]
    model(last)  # the first batch after a reset replaces the statistics entirely
    torch.testing.assert_close(bn.running_mean, _batch_stats(last)[0])


def test_config_errors_and_conv_bias():
    with pytest.raises(ValueError, match="unknown normalisation"):
        NormConfig(kind="batch")
    with pytest.raises(ValueError, match="cumulative"):
        NormConfig(kind="moving", reset_each_epoch=True)
    with pytest.raises(ValueError, match="momentum"):
        NormConfig(kind="moving", momentum=0)
    assert conv_bias(NormConfig(kind="none")) and not conv_bias(NormConfig(kind="moving"))
    assert NormConfig.from_dict(NormConfig(kind="group", groups=4).to_dict()) == NormConfig(
        kind="group", groups=4
    )
