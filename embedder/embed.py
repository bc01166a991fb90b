"""Inference: a bundle's model frozen in eval mode, plus the one preprocessing path.

In eval mode every BatchNorm uses its stored statistics, so an item's embedding never depends on its
batch-mates; :class:`Embedder` never leaves eval mode and holds no gradients.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from embedder.bundle import Bundle, load_bundle
from embedder.inputs import InputSpec, Prepared, prepare, prepare_file


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Embedder:
    def __init__(self, bundle: Bundle, *, model: nn.Module | None = None, batch_size: int = 64) -> None:
        self.bundle = bundle
        # `model` lets the service pass a BN-folded copy; the bundle keeps the original.
        self.model = freeze(model if model is not None else bundle.model)
        self.batch_size = batch_size

    @classmethod
    def from_bundle(cls, path: str | os.PathLike[str], **kwargs: object) -> Embedder:
        return cls(load_bundle(path), **kwargs)  # type: ignore[arg-type]

    @property
    def spec(self) -> InputSpec:
        return self.bundle.input_spec

    @property
    def model_id(self) -> str:
        return self.bundle.id

    @property
    def dim(self) -> int:
        return self.bundle.model_config.out_dim

    def embed_arrays(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 ``(N, C, S, S)`` -> float32 ``(N, D)`` unit vectors, in batches."""
        x = np.stack(list(x)) if not isinstance(x, np.ndarray) else x
        out = np.empty((len(x), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(x), self.batch_size):
                out[i : i + self.batch_size] = self.model(
                    torch.from_numpy(x[i : i + self.batch_size])
                ).numpy()
        return out

    def prepare(self, data: bytes, *, allow_raw: bool = False) -> Prepared:
        return prepare(data, self.spec, allow_raw=allow_raw)

    def prepare_file(self, path: str | os.PathLike[str], *, allow_raw: bool = False) -> Prepared:
        return prepare_file(path, self.spec, allow_raw=allow_raw)

    def embed_bytes(self, data: bytes, *, allow_raw: bool = False) -> tuple[Prepared, np.ndarray]:
        p = self.prepare(data, allow_raw=allow_raw)
        return p, self.embed_arrays(p.array[None])[0]

    def embed_file(
        self, path: str | os.PathLike[str], *, allow_raw: bool = False
    ) -> tuple[Prepared, np.ndarray]:
        p = self.prepare_file(path, allow_raw=allow_raw)
        return p, self.embed_arrays(p.array[None])[0]
