"""Precise BatchNorm statistics: the population mean and variance each BN layer sees in inference.

During training the running statistics are an average over batches computed while the weights moved
(and, with a small momentum, still partly their 0/1 start values).  Here the weights are fixed and every
BN layer's input is measured over a whole sample, which is what inference with stored statistics needs.

Two choices set this module apart from fvcore's ``update_bn_stats``:

* **The population estimator, not the mean of per-batch variances** (:class:`_PopulationEstimator`).
* **Layer by layer, in execution order.**  fvcore runs every BN layer in train mode, so a later layer's
  input is computed from earlier layers normalised with *batch* statistics: the distribution training
  saw, not the one inference sees.  Inference normalises every layer with its stored statistics, so the
  statistics a layer should store are those of its input when every earlier layer already uses its own
  precise statistics.  That is what this module computes: layer ``k`` is measured after layers
  ``0..k-1`` were given their precise statistics, with the whole model in eval mode.  The difference to
  fvcore's scheme is small for large i.i.d. batches and grows with small or class-sorted batches (batch
  statistics add noise and bias to every later layer's input): on a trained Fashion-MNIST model the
  worst layer's p95 log variance ratio between the two was 0.01 with shuffled batches of 128, 0.12 with
  batches of 8 and 0.32 with class-sorted batches of 128 (docs/bn-gate.md).  The layer-wise result does
  not depend on batching at all.  For up to ``ONE_PASS_MAX`` inputs (a bundle keeps at most 1024)
  this takes one forward pass of the whole sample as a single batch, each BN layer's pre-hook storing
  the statistics of its input before the layer normalises; larger samples take one pass per BN layer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from embedder.errors import InputError
from embedder.norm import bn_layers

MIN_SAMPLES = 64
"""Smallest sample :func:`precise_statistics` accepts by default.

Inputs, not positions, are the unit: the H*W positions of one input are correlated (at the last stage of
the default model an input contributes only 8x8 positions, all from the same file).  The rule comes from
the estimate's own noise, measured by recalibrating a trained model on one sample and checking it on
another (docs/bn-gate.md): with 64 inputs the worst layer's p95 mean shift and log variance ratio were
0.08 and 0.14, below a third of the gate's thresholds (0.5); with 16 they reached 0.16 and 0.36 and the
classifier agreement failed on noise alone.  The widest layer's channel count is not a better rule: each
channel is estimated on its own, so more channels do not make any estimate noisier.
"""

ONE_PASS_MAX = 2048
"""Samples up to this size are measured in one forward pass of the whole sample (bundles keep at most
1024 inputs); larger ones take one pass per BN layer, batch by batch, to bound memory."""

StatsDict = dict[str, tuple[torch.Tensor, torch.Tensor]]


class NotEnoughData(InputError):
    """The sample is too small to estimate population statistics; the message says how many it needs."""

    code = "not_enough_data"

    def __init__(self, have: int, need: int, what: str = "BatchNorm population statistics") -> None:
        super().__init__(
            f"{what} need at least {need} samples; got {have}. Pass a larger sample (e.g. --data SPEC)."
        )
        self.have, self.need = have, need


class _Captured(Exception):
    """Raised from a pre-hook to stop a forward pass once the measured layer's input has been seen."""


class _PopulationEstimator:
    """Size-weighted population mean and variance of one layer's input over all N*H*W positions.

    Why this estimator: it is the sample mean and variance of the whole sample as if it were one batch,
    so it does not depend on how the sample is cut into batches.  The alternative, the mean of per-batch
    variances (BatchNorm paper, Sec. 3.1; fvcore's ``_MeanOfBatchVarianceEstimator``), leaves out the
    spread of the batch means around the population mean, so it underestimates the variance by about
    ``var / B`` for i.i.d. batches of B items, and by far more when batches are not i.i.d. (class-sorted
    calibration samples, a short last batch).

    Sums are kept in float64 around a per-channel shift (the first batch's mean), so ``sum(x^2) -
    n * mean^2`` does not cancel catastrophically for channels whose mean is large against their spread.
    The variance carries Bessel's correction ``n / (n - 1)`` because that is what PyTorch stores in
    ``running_var`` (it normalises by the biased variance in training but averages the unbiased one).
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # In slices of the batch: float64 copies of a whole one-pass sample would cost ~0.5 GB.
        for part in x.detach().split(128):
            self._update(part)

    def _update(self, x: torch.Tensor) -> None:
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1).to(torch.float64)
        if self.shift is None:
            self.shift = flat.mean(dim=1)
            self.s1 = torch.zeros(c, dtype=torch.float64)
            self.s2 = torch.zeros(c, dtype=torch.float64)
        d = flat - self.shift[:, None]
        self.s1 += d.sum(dim=1)
        self.s2 += d.square().sum(dim=1)
        self.n += flat.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shift is None or self.s1 is None or self.s2 is None or self.n < 2:
            raise RuntimeError("the estimator saw fewer than 2 values per channel")
        mean = self.shift + self.s1 / self.n
        var = (self.s2 - self.s1.square() / self.n) / (self.n - 1)
        return mean, var.clamp_min(0.0)


def _execution_order(model: nn.Module, names: Sequence[str], probe: torch.Tensor) -> list[str]:
    """BN layer names in the order a forward pass reaches them (module order need not be that order)."""
    seen: list[str] = []
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, _a, name=name: seen.append(name)) for name in names
    ]
    try:
        model(probe)
    finally:
        for h in hooks:
            h.remove()
    order = list(dict.fromkeys(seen))
    unused = [n for n in names if n not in order]
    if unused:
        raise ValueError(f"BatchNorm layers never reached by a forward pass: {', '.join(unused)}")
    return order


def to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor sharing ``x``'s memory when it can (a read-only array, e.g. from IDX bytes, is copied)."""
    if isinstance(x, torch.Tensor):
        return x
    if not x.flags.writeable or not x.flags.c_contiguous:
        x = np.array(x, copy=True, order="C")
    return torch.from_numpy(x)


def as_batches(x: np.ndarray | torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split a sample into consecutive batches (views of ``x`` where numpy allows it)."""
    t = to_tensor(x)
    return [t[i : i + batch_size] for i in range(0, len(t), batch_size)]


@torch.no_grad()
def precise_statistics(
    model: nn.Module, batches: Iterable[torch.Tensor], *, min_samples: int = MIN_SAMPLES
) -> StatsDict:
    """Population ``(mean, var)`` of every BN layer's input, measured layer by layer with fixed weights.

    ``batches`` are model inputs (uint8 or already scaled floats); they are held in memory because every
    layer needs its own pass.  The result maps the layer's qualified name (as :func:`bn_layers` gives it)
    to float64 ``(mean, unbiased var)``; it does not depend on how the sample is batched.  The model is
    not modified (a deep copy in eval mode is measured).  Raises :class:`NotEnoughData` when the sample
    has fewer than ``min_samples`` inputs, and :class:`ValueError` when a BN layer is never reached.
    """
    batches = [b for b in batches if len(b)]
    names = [name for name, _ in bn_layers(model)]
    if not names:
        return {}
    n = sum(len(b) for b in batches)
    if n < min_samples:
        raise NotEnoughData(n, min_samples)

    work = copy.deepcopy(model).eval()
    modules = dict(bn_layers(work))
    if n <= ONE_PASS_MAX:
        return _one_pass(work, modules, torch.cat(batches))
    stats: StatsDict = {}
    for name in _execution_order(work, names, batches[0][:2]):
        bn = modules[name]
        est = _PopulationEstimator()

        def capture(_m: nn.Module, args: tuple[torch.Tensor, ...], est: _PopulationEstimator = est) -> None:
            est.update(args[0])
            raise _Captured

        hook = bn.register_forward_pre_hook(capture)
        try:
            for b in batches:
                with contextlib.suppress(_Captured):
                    work(b)
        finally:
            hook.remove()
        mean, var = est.result()
        stats[name] = (mean, var)
        # Later layers are measured with this one normalising by its precise statistics, as in inference.
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return stats


def _one_pass(work: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> StatsDict:
    """The layer-by-layer result in a single forward pass of the whole sample as one batch.

    A pre-hook on each BN layer measures the layer's input over the whole sample and stores it as the
    layer's statistics *before* the layer normalises, so every later layer already sees inputs normalised
    by precise statistics: exactly what one pass per layer computes, at the cost of one pass.
    """
    stats: StatsDict = {}

    def measure(module: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
        est = _PopulationEstimator()
        est.update(args[0])
        mean, var = est.result()
        stats[name] = (mean, var)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: measure(mod, args, name))
        for name, m in modules.items()
    ]
    try:
        work(x)
    finally:
        for h in hooks:
            h.remove()
    unused = sorted(set(modules) - set(stats))
    if unused:
        raise ValueError(f"BatchNorm layers never reached by a forward pass: {', '.join(unused)}")
    return stats


def apply_statistics(model: nn.Module, stats: StatsDict, *, num_batches: int) -> None:
    """Write ``stats`` into the running buffers of ``model``'s BN layers (in place).

    ``num_batches_tracked`` is set to ``num_batches``, the number of training-size batches the sample
    spans: a ``cumulative`` layer that keeps training then weighs the precise estimate as that many
    batches, and the statistics no longer read as untouched (``num_batches_tracked == 0``).
    """
    modules = dict(bn_layers(model))
    missing = sorted(set(modules) - set(stats))
    if missing:
        raise ValueError(f"no statistics for BatchNorm layers: {', '.join(missing)}")
    with torch.no_grad():
        for name, bn in modules.items():
            mean, var = stats[name]
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(max(1, num_batches))


def recompute_bn_stats(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    *,
    min_samples: int = MIN_SAMPLES,
) -> None:
    """Replace ``model``'s BN running statistics by precise population statistics of sample ``x``.

    ``x`` is a ``(N, C, S, S)`` model input (uint8 as stored in bundles).  ``batch_size`` bounds memory
    and sets ``num_batches_tracked`` to ``ceil(N / batch_size)``; the statistics themselves do not depend
    on it.  Modifies ``model`` in place; its train/eval mode is kept.
    """
    stats = precise_statistics(model, as_batches(x, batch_size), min_samples=min_samples)
    if stats:
        apply_statistics(model, stats, num_batches=math.ceil(len(x) / batch_size))
