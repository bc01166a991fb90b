"""BatchNorm folding: a module transform that merges each ConvNorm's BN into its conv for inference.

In eval mode a BN layer is a per-channel affine map of its input, ``y = (x - mu) * g / sqrt(var + eps)
+ b``, so it can be folded into the convolution before it:

    scale = g / sqrt(var + eps)
    W'    = W * scale          (per output channel)
    bias' = (bias_conv - mu) * scale + b

The folded network computes the same function with one op fewer per unit and no BN bookkeeping.  Like
timm's ``freeze_batch_norm_2d``, :func:`fold_batchnorm` walks the model and swaps layers; unlike it, it
works on a deep copy and never changes the model it is given.

Folding bakes the *running* statistics into the weights, so it is only meaningful for a model that
passed the BN health gate (:mod:`embedder.bn_gate`); it does not check that itself, the service folds
after the gate.  The folded copy is an inference artefact: it cannot be trained (there is no BN left)
and must not be saved as a bundle (its state dict has conv biases and no BN buffers); keep the bundle's
original model for that.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from embedder.model import ConvNorm


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """A new conv equal to ``bn(conv(x))`` in eval mode; computed in float64, stored in conv's dtype."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = torch.zeros_like(mean)
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(w * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_((bias - mean) * scale + shift)
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every ConvNorm's BatchNorm folded into its conv.

    Units whose norm is not a BatchNorm with running statistics (``none``: already Identity, ``group``:
    GroupNorm depends on the input) are left as they are.  The copy is frozen (eval mode, no gradients)
    and marked ``folded = True``.  The input model is not modified.
    """
    folded = copy.deepcopy(model).eval()
    for unit in folded.modules():
        if (
            isinstance(unit, ConvNorm)
            and isinstance(unit.norm, nn.modules.batchnorm._BatchNorm)
            and unit.norm.track_running_stats
        ):
            unit.conv = fold_conv_bn(unit.conv, unit.norm)
            unit.norm = nn.Identity()
    for p in folded.parameters():
        p.requires_grad_(False)
    folded.folded = True  # type: ignore[assignment]
    return folded
