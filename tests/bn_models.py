"""Small models and data for the BatchNorm tools' tests (precise statistics, the gate, folding)."""

from __future__ import annotations

import numpy as np


def striped_images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three learnable classes of striped images with class-dependent brightness: BN layers see
    non-trivial means and variances, and a short training run separates the classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    yy, xx = np.mgrid[:size, :size]
    patterns = np.stack([np.sin(yy * 1.3), np.sin(xx * 1.3), np.sin((xx + yy) * 0.9)])
    img = (
        128
        + 60 * patterns[y] * rng.uniform(0.5, 1.5, (n, 1, 1))
        + 30 * (y[:, None, None] - 1)
        + rng.normal(0, 20, (n, size, size))
    )
    return np.clip(img, 0, 255).astype(np.uint8)[:, None], y
