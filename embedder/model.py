"""The embedding network: a small residual CNN whose output is an L2-normalised vector.

Inputs arrive as ``uint8`` ``(N, C, S, S)`` straight from :mod:`embedder.inputs`; the scaling to floats
is the first step of :meth:`EmbedNet.forward`, so no caller can scale differently from another.

Every convolution is wrapped with its normalisation in a :class:`ConvNorm`, which is what BN folding and
the BN health tools walk over.  The classifier head is a cosine classifier (scaled dot products of unit
vectors): training through it shapes the angles between embeddings, which is what retrieval by cosine
similarity then uses.  Serving never calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedder.norm import NormConfig, conv_bias, norm_layer


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 1
    input_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1)
    stem_stride: int = 2
    embed_dim: int = 128
    num_classes: int = 0
    classifier_scale: float = 16.0
    norm: NormConfig = field(default_factory=NormConfig)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty and of equal length")
        if self.stem_stride not in (1, 2):
            raise ValueError("stem_stride must be 1 or 2")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"], d["blocks"] = list(self.widths), list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["widths"], d["blocks"] = tuple(d["widths"]), tuple(d["blocks"])
        d["norm"] = NormConfig.from_dict(d["norm"])
        return cls(**d)


class ConvNorm(nn.Module):
    """conv -> norm: the unit that BN folding and statistics tools operate on."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, norm: NormConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=conv_bias(norm))
        self.norm = norm_layer(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: NormConfig) -> None:
        super().__init__()
        self.a = ConvNorm(cin, cout, 3, stride, norm)
        self.b = ConvNorm(cout, cout, 3, 1, norm)
        self.shortcut = ConvNorm(cin, cout, 1, stride, norm) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b(F.relu(self.a(x))) + self.shortcut(x))


class CosineClassifier(nn.Module):
    """logits = s * cos(embedding, class prototype); used in training only."""

    def __init__(self, dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * emb @ F.normalize(self.weight, dim=1).t()


class EmbedNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = ConvNorm(cfg.in_channels, cfg.widths[0], 3, cfg.stem_stride, cfg.norm)
        stages: list[nn.Module] = []
        cin = cfg.widths[0]
        for i, (width, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            for j in range(n):
                stages.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, cfg.norm))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(cin, cfg.embed_dim)
        self.classifier = (
            CosineClassifier(cfg.embed_dim, cfg.num_classes, cfg.classifier_scale)
            if cfg.num_classes > 0
            else None
        )

    @staticmethod
    def scale_input(x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels/bytes -> floats in [-1, 1]; floats pass through (already scaled)."""
        if x.dtype == torch.uint8:
            return x.float().mul_(1.0 / 127.5).sub_(1.0)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(self.scale_input(x)))
        h = self.stages(h)
        return self.proj(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding: ``(N, D)`` unit vectors."""
        return F.normalize(self.features(x), dim=1)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this model has no classifier head (num_classes == 0)")
        return self.classifier(emb)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self(x)
        return emb, self.logits(emb)


def build_model(cfg: ModelConfig) -> EmbedNet:
    return EmbedNet(cfg)
