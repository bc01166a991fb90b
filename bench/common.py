"""What every benchmark needs: a call-rate timer, the same-run matmul yardstick, a servable model."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from embedder.bundle import save_bundle
from embedder.inputs import InputSpec
from embedder.model import ModelConfig, build_model
from embedder.precise_bn import recompute_bn_stats


def timed_rate(fn: Callable[[], object], seconds: float, warmup: int = 2) -> float:
    """Calls per second of ``fn``, after ``warmup`` calls, over at least ``seconds``."""
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def matmul_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """This machine's float32 matmul rate right now: the yardstick every FLOP rate is divided by."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return timed_rate(lambda: torch.mm(a, b), seconds) * 2 * n**3 / 1e9


def shipped_config(
    modality: str, size: int | None = None, norm: str = "moving"
) -> tuple[ModelConfig, InputSpec]:
    """The architecture and input `lookalike train` builds for a modality by default (TrainConfig is
    the one place those defaults live)."""
    from training.cli_train import EXECUTABLE_REPRESENTATION
    from training.loop import TrainConfig

    rep = EXECUTABLE_REPRESENTATION if modality == "executable" else None
    cfg = TrainConfig(modality=modality, norm=norm, size=size, representation=rep).resolved()
    return cfg.model_config(num_classes=2), cfg.input_spec()


def random_gated_bundle(
    path: Path, *, spec: InputSpec | None = None, cfg: ModelConfig | None = None, seed: int = 0
) -> Path:
    """A bundle with random weights and precise BN statistics: it passes the gate, so it can be served.

    Speed does not depend on training, so benchmarks use this instead of waiting for a trained model.
    ``cfg`` defaults to the base architecture for ``spec`` (which defaults to ``InputSpec()``).
    """
    spec = spec or InputSpec()
    torch.manual_seed(seed)
    model = build_model(cfg or ModelConfig(in_channels=spec.channels, input_size=spec.size, num_classes=2))
    x = np.random.default_rng(seed).integers(
        0, 256, (256, spec.channels, spec.size, spec.size), dtype=np.uint8
    )
    recompute_bn_stats(model, x)
    save_bundle(path, model.eval(), spec, ["a", "b"], x, np.arange(len(x)) % 2)
    return path
