"""The normalisation variants behind ``--norm``: one table, one factory, nothing else knows the names.

| kind         | layer                 | running statistics                                            |
|--------------|-----------------------|---------------------------------------------------------------|
| ``none``     | identity (conv bias)  | none                                                          |
| ``moving``   | BatchNorm2d(m)        | EMA, PyTorch convention: new = (1 - m) * old + m * batch      |
| ``cumulative`` | BatchNorm2d(None)   | equal-weight mean of every batch since the last reset         |
| ``group``    | GroupNorm             | none: batch independent, the reference                        |

Keras' ``momentum=0.99`` is ``moving`` with ``m = 0.01`` here. ``cumulative`` uses PyTorch's
``momentum=None`` mode: running mean and (unbiased) variance are the plain average of the batch values
seen since ``reset_running_stats``. With ``reset_each_epoch`` the training loop resets them at every
epoch start, so the final statistics average the last epoch only: a whole epoch of batches, all computed
with weights close to the final ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

NORM_KINDS = ("none", "moving", "cumulative", "group")


@dataclass(frozen=True)
class NormConfig:
    kind: str = "moving"
    momentum: float = 0.1
    groups: int = 8
    reset_each_epoch: bool = False
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unknown normalisation {self.kind!r}; choose one of {', '.join(NORM_KINDS)}")
        if self.kind == "moving" and not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.reset_each_epoch and self.kind != "cumulative":
            raise ValueError("reset_each_epoch applies to cumulative normalisation only")

    @property
    def tracks_running_stats(self) -> bool:
        return self.kind in ("moving", "cumulative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def norm_layer(cfg: NormConfig, channels: int) -> nn.Module:
    """The normalisation layer that follows a conv with ``channels`` outputs."""
    if cfg.kind == "none":
        return nn.Identity()
    if cfg.kind == "moving":
        return nn.BatchNorm2d(channels, eps=cfg.eps, momentum=cfg.momentum)
    if cfg.kind == "cumulative":
        return nn.BatchNorm2d(channels, eps=cfg.eps, momentum=None)
    groups = _largest_divisor_at_most(channels, cfg.groups)
    return nn.GroupNorm(groups, channels, eps=cfg.eps)


def conv_bias(cfg: NormConfig) -> bool:
    """A conv keeps its bias only when nothing after it subtracts a mean."""
    return cfg.kind == "none"


def bn_layers(model: nn.Module) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer with running statistics, in module order, with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            yield name, module


def reset_running_stats(model: nn.Module) -> None:
    for _, bn in bn_layers(model):
        bn.reset_running_stats()


def on_epoch_start(model: nn.Module, cfg: NormConfig) -> None:
    """Hook the training loop calls before each epoch."""
    if cfg.kind == "cumulative" and cfg.reset_each_epoch:
        reset_running_stats(model)


def _largest_divisor_at_most(n: int, k: int) -> int:
    for g in range(min(n, k), 0, -1):
        if n % g == 0:
            return g
    return 1
