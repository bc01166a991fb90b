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

HEADS = ("avg", "flatten")
STEM_STRIDES = (1, 2, 4, 8)


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
    # How the last feature map becomes a vector. "avg" (global average pooling) makes the embedding
    # translation invariant, right for photographs; "flatten" keeps where a feature fired, which is
    # the meaning of a position in a byte-bigram image (row = first byte, column = second byte).
    head: str = "avg"
    # Principal components of the head's input appended to the embedding (0: none). The classifier
    # pulls the trained embedding towards its own classes, so files of a family it never saw collapse
    # together (cosine ~0.95 between unrelated unseen families); the principal directions of the
    # convolutional features keep what told them apart. Fitted after training (fit_generic_basis).
    generic_dim: int = 0

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise ValueError("widths and blocks must be non-empty and of equal length")
        if self.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {', '.join(map(str, STEM_STRIDES))}")
        if self.generic_dim < 0:
            raise ValueError("generic_dim must be 0 or more")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")

    @property
    def out_dim(self) -> int:
        """Length of the embedding vectors: the trained part, then the generic part."""
        return self.embed_dim + self.generic_dim

    @property
    def head_in(self) -> int:
        """Length of the vector the head sees: channels, times positions with the flatten head."""
        return self.widths[-1] * (self.final_size**2 if self.head == "flatten" else 1)

    @property
    def stem_kernel(self) -> int:
        # Strides above 2 are patch embeddings (kernel = stride, no overlap): a full-resolution input
        # is summarised patch by patch at the cost of one small matmul, and the stages run at the
        # resolution a stride-2 stem would give a 4x (8x) smaller input.
        return 3 if self.stem_stride <= 2 else self.stem_stride

    @property
    def final_size(self) -> int:
        """Side of the last feature map (conv arithmetic of the stem, then a halving per later stage)."""
        k = self.stem_kernel
        size = (self.input_size + 2 * (k // 2 if k == 3 else 0) - k) // self.stem_stride + 1
        for _ in range(len(self.widths) - 1):
            size = (size + 1) // 2
        return size

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
        # Odd kernels are padded to keep "same" geometry; even ones are patch embeddings (no padding).
        pad = kernel // 2 if kernel % 2 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=pad, bias=conv_bias(norm))
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
        self.stem = ConvNorm(cfg.in_channels, cfg.widths[0], cfg.stem_kernel, cfg.stem_stride, cfg.norm)
        stages: list[nn.Module] = []
        cin = cfg.widths[0]
        for i, (width, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            for j in range(n):
                stages.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, cfg.norm))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(cfg.head_in, cfg.embed_dim)
        if cfg.generic_dim:
            # A buffer, not a parameter: no gradient reaches it; zeros until fitted, which leaves the
            # embedding the trained part alone (the normalised concatenation of a unit vector and zeros).
            # Only registered when used, so bundles written before the generic part existed still load.
            self.register_buffer("generic_basis", torch.zeros(cfg.generic_dim, cfg.head_in))
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

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional features as one vector per input (``(N, cfg.head_in)``)."""
        h = F.relu(self.stem(self.scale_input(x)))
        h = self.stages(h)
        if self.cfg.head == "avg":
            h = F.adaptive_avg_pool2d(h, 1)
        return torch.flatten(h, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trained projection, before normalisation."""
        return self.proj(self.head_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding: ``(N, cfg.out_dim)`` unit vectors."""
        h = self.head_input(x)
        emb = F.normalize(self.proj(h), dim=1)
        if self.cfg.generic_dim == 0:
            return emb
        # Each part unit length, then the whole: a cosine is the mean of the two parts' cosines.
        generic = F.normalize(h @ self.generic_basis.t(), dim=1)
        return F.normalize(torch.cat([emb, generic], dim=1), dim=1)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        """Class logits from an embedding (the full one or the trained part alone)."""
        if self.classifier is None:
            raise RuntimeError("this model has no classifier head (num_classes == 0)")
        if emb.shape[1] != self.cfg.embed_dim:
            emb = F.normalize(emb[:, : self.cfg.embed_dim], dim=1)
        return self.classifier(emb)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained part of the embedding and the logits; the generic part takes no gradient."""
        emb = F.normalize(self.features(x), dim=1)
        return emb, self.logits(emb)

    @torch.no_grad()
    def fit_generic_basis(self, x: torch.Tensor, batch_size: int = 256) -> None:
        """Set the generic part to the top principal directions of the head's input over ``x``.

        Eval mode (stored statistics), as the embedding is served. The projection is not centred: the
        mean feature direction is itself informative (measured: uncentred 0.948 vs centred 0.926
        macro P@1 on unseen families). Each direction's sign is fixed (largest entry positive) so a
        refit on the same features gives the same basis.
        """
        if self.cfg.generic_dim == 0:
            return
        was_training = self.training
        self.eval()
        try:
            h = torch.cat([self.head_input(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        finally:
            self.train(was_training)
        basis = _principal_directions(h.double(), self.cfg.generic_dim)
        k = len(basis)
        signs = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
        basis = basis * torch.where(signs == 0, 1.0, signs)
        self.generic_basis.zero_()
        self.generic_basis[:k] = basis.to(self.generic_basis.dtype)


def _principal_directions(h: torch.Tensor, k: int) -> torch.Tensor:
    """Top ``k`` principal directions (rows) of the centred rows of ``h``, from the eigenvectors of the
    smaller of the Gram (n x n) and covariance (d x d) matrices: with 1,024 samples of 8,192 features
    that is ~1 s where a full SVD took ~14 s on one core."""
    h = h - h.mean(0)
    n, d = h.shape
    if n < d:
        w, u = torch.linalg.eigh(h @ h.t())
        keep = w > w.max() * 1e-10  # directions with (numerically) no variance are not directions
        w, u = w[keep].flip(0)[:k], u[:, keep].flip(1)[:, :k]
        return (h.t() @ u / w.sqrt()).t()
    w, v = torch.linalg.eigh(h.t() @ h)
    keep = w > w.max() * 1e-10
    return v[:, keep].flip(1)[:, :k].t()


def build_model(cfg: ModelConfig) -> EmbedNet:
    return EmbedNet(cfg)
