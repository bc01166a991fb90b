"""The training loop: cross-entropy through the cosine classifier, and a per-epoch report that shows the
BatchNorm train/inference gap while it happens.

Every epoch records, besides the loss:

* ``train_mode_acc`` and ``eval_mode_acc`` -- accuracy on the SAME fixed subset of training items (the
  calibration sample), once with batch statistics (``model.train()``, in batches of the training batch
  size, running statistics saved and restored so the measurement does not move them) and once with the
  stored running statistics (``model.eval()``, what the service will use). When the running statistics
  are wrong the two diverge on data the model was trained on: the symptom lookalike exists to catch;
* ``heldout_acc`` -- eval-mode accuracy on the test side of the split (labels seen in training only);
* ``retrieval`` -- P@1 / mAP of the held-out side in eval mode (seen split: test queries against the
  train index; unseen split: leave-one-out among the held-out families). Large splits are subsampled per
  epoch (fixed by the seed) and evaluated in full once at the end.

Determinism: one seed drives the weights (``torch.manual_seed``), the batch order (the samplers are
functions of ``(seed, epoch)``), the augmentation (a ``torch.Generator`` per epoch) and the calibration
sample (a numpy ``Generator``); deterministic algorithms are switched on while training. The same seed on
the same machine and thread count gives the same weights bit for bit.

Data stays in memory as one uint8 tensor and batches are gathered by indexing it: a batch costs
microseconds, so DataLoader worker processes would only compete with the two compute threads (file
decoding, the expensive part, already happened in worker processes inside ``load_data``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedder.bundle import save_bundle
from embedder.dataspec import LabelledData
from embedder.inputs import InputSpec
from embedder.model import EmbedNet, ModelConfig, build_model
from embedder.norm import NormConfig, on_epoch_start
from embedder.progress import progress_bar
from training.metrics import retrieval_metrics
from training.samplers import BalancedBatchSampler, random_batches
from training.splits import Split

SAMPLERS = ("random", "balanced")

# Defaults per modality, measured on the 2-core machine (docs/training.md has the runs behind them).
# Images (Fashion-MNIST, 60,000 x 28x28): a stride-2 stem halves the resolution before the residual
# stages, a quarter of the FLOPs of stride 1; with channels_last an epoch takes well under a minute and
# 15 epochs of flip + crop augmentation reach the acceptance accuracy inside the 20-minute budget.
# Executables (~1,500 training files, ~46 families): an epoch is ~24 steps, so many more epochs are
# needed for the same number of updates; never augmented (a flipped binary is not a binary). The full
# 256x256 byte-pair table goes in unpooled; a stride-8 patch stem (the rule in resolved()) brings it to
# the stages at 32x32, the cost of a 64x64 input. docs/evaluation.md has the runs behind these choices.
# The representation is not set here: it defaults to embedder.inputs.InputSpec's (one place for the
# preprocessing default); `lookalike train` picks bigram for executables, see cli_train.py.
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {
        "epochs": 15,
        "batch_size": 128,
        "lr": 3e-3,
        "size": 28,
        "widths": (32, 64, 128),
        "blocks": (1, 1, 1),
        "stem_stride": 2,
        "augment": True,
        "generic_dim": 0,
    },
    "executable": {
        "epochs": 30,
        "batch_size": 64,
        "lr": 3e-3,
        "size": 256,
        "widths": (32, 64, 128),
        "blocks": (1, 1, 1),
        "augment": False,
        "generic_dim": 128,
    },
}


class TrainingError(RuntimeError):
    """Training cannot proceed (diverged, or the data does not fit the configuration)."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; ``None`` fields take the modality's default.

    It is recorded verbatim (resolved) in the bundle's provenance, so a bundle says how it was made.
    """

    modality: str = "image"
    norm: str = "moving"
    momentum: float = 0.1
    reset_each_epoch: bool = False
    groups: int = 8
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    sampler: str = "random"
    k_per_class: int = 1
    split: str = "seen"
    seed: int = 0
    lr: float | None = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup: float = 0.25  # fraction of the steps spent raising the LR (one-cycle)
    embed_dim: int = 128
    size: int | None = None
    representation: str | None = None
    channels: int = 1
    widths: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    stem_stride: int | None = None
    head: str | None = None
    generic_dim: int | None = None
    augment: bool | None = None
    eval_subset: int = 1024  # fixed training items for train-mode vs eval-mode accuracy (= calibration)
    eval_heldout: int = 10_000  # per-epoch cap on held-out items classified
    eval_queries: int = 2_000  # per-epoch cap on retrieval queries (held-out side)
    eval_index: int = 10_000  # per-epoch cap on the retrieval index (seen split: train side)
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (all cores)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` replaced by the modality default, validated."""
        if self.modality not in MODALITY_DEFAULTS:
            raise ValueError(f"modality must be one of {', '.join(MODALITY_DEFAULTS)}, not {self.modality!r}")
        defaults = MODALITY_DEFAULTS[self.modality]
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        cfg = replace(self, **filled)
        if cfg.stem_stride is None:
            # The residual stages start at 32x32 at most whatever the input size: a larger input is
            # summarised patch by patch by the stem (stride 4 or 8 = patch embedding), so a 256x256
            # bigram costs what a 64x64 one did while keeping every byte value apart.
            cfg.stem_stride = max(2, min(8, int(cfg.size or 64) // 32))
        if cfg.max_steps is not None and self.epochs is None:
            cfg.epochs = None  # max_steps alone decides the length
        cfg.widths, cfg.blocks = tuple(cfg.widths or ()), tuple(cfg.blocks or ())
        cfg._validate()
        cfg.representation = cfg.input_spec().representation  # record the concrete choice
        if cfg.head is None:
            # A bigram image's axes are byte values: global average pooling would throw away which
            # byte pairs a feature fired on. docs/evaluation.md has the runs (unseen families above all).
            cfg.head = "flatten" if cfg.representation == "bigram" else "avg"
        return cfg

    def _validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, not {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, not {self.max_steps}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (BatchNorm needs two samples for a variance)")
        if self.k_per_class < 1:
            raise ValueError("k_per_class must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be positive")
        if not 0.0 < self.warmup < 1.0:
            raise ValueError("warmup must be a fraction in (0, 1)")
        if self.modality == "executable" and self.augment:
            raise ValueError("executables are never augmented: a flipped or cropped binary is not a binary")
        self.model_config(num_classes=2)  # raises on a bad norm, input spec or architecture

    def norm_config(self) -> NormConfig:
        return NormConfig(
            kind=self.norm, momentum=self.momentum, groups=self.groups, reset_each_epoch=self.reset_each_epoch
        )

    def input_spec(self) -> InputSpec:
        """The preprocessing the data must be loaded with, and that the bundle records."""
        extra = {"channels": self.channels} if self.modality == "image" else {}
        return InputSpec.for_modality(
            self.modality,  # type: ignore[arg-type]
            size=self.size,
            representation=self.representation,
            **extra,
        )

    def model_config(self, num_classes: int) -> ModelConfig:
        spec = self.input_spec()
        return ModelConfig(
            in_channels=spec.channels,
            input_size=spec.size,
            widths=tuple(self.widths or ()),
            blocks=tuple(self.blocks or ()),
            stem_stride=int(self.stem_stride or 2),
            head=self.head or "avg",
            generic_dim=int(self.generic_dim or 0),
            embed_dim=self.embed_dim,
            num_classes=num_classes,
            norm=self.norm_config(),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths) if self.widths is not None else None
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return d


@dataclass
class TrainResult:
    model: EmbedNet  # eval mode, contiguous memory format, on CPU
    config: TrainConfig  # resolved
    labels: list[str]  # the classifier's classes (the labels present in the train split)
    label_map: np.ndarray  # data label index -> classifier index, -1 for labels not trained on
    calibration: np.ndarray  # indices into the data: the calibration sample / fixed eval subset
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def calibration_arrays(self, data: LabelledData) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of the calibration sample, ``y`` in the classifier's label indices."""
        return data.x[self.calibration], self.label_map[data.y[self.calibration]]

    def metrics_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "history": self.history, "final": self.metrics}


# ------------------------------------------------------------------------------------------ sampling


def stratified_sample(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of up to ``n`` items, each class represented in proportion to its size (largest
    remainder, at least one item per class while room allows), returned in random order.

    Proportional, not equal per class: the sample stands in for the training population when precise
    BN statistics are estimated from it, and batches cut from it should look like training batches.
    """
    y = np.asarray(y)
    if len(y) <= n:
        return rng.permutation(len(y))
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(np.int64)
    take = np.maximum(take, np.minimum(1, counts)) if len(classes) <= n else take
    rest = n - int(take.sum())
    if rest > 0:
        order = np.argsort(-(quota - np.floor(quota)), kind="stable")
        for c in order:
            if rest == 0:
                break
            if take[c] < counts[c]:
                take[c] += 1
                rest -= 1
    while take.sum() > n:  # the one-per-class floor overshot: trim the largest classes
        take[int(np.argmax(take))] -= 1
    picked = [
        rng.choice(np.flatnonzero(y == c), size=int(t), replace=False)
        for c, t in zip(classes, take, strict=True)
    ]
    return rng.permutation(np.concatenate(picked))


def _subsample(idx: np.ndarray, cap: int, seed: int, salt: int) -> np.ndarray:
    if len(idx) <= cap:
        return idx
    return np.sort(np.random.default_rng([seed, salt]).choice(idx, size=cap, replace=False))


# ------------------------------------------------------------------------------------- augmentation


def augment_images(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop after zero padding (S // 14 pixels, 2 at 28x28).

    Applied to uint8 batches before scaling, so it costs a gather, not a float pass. Zero is the
    background of Fashion-MNIST and the usual padding for natural images.
    """
    b, _, s, _ = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, s // 14)
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ar = torch.arange(s)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    return xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------- evaluation


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _eval_batches(n: int, size: int) -> list[slice]:
    """Like :func:`_batches`, but a last batch of one joins the previous one: BatchNorm in train mode
    cannot take a variance over a single item (the samplers follow the same rule)."""
    out = _batches(n, size)
    if len(out) > 1 and out[-1].stop - out[-1].start == 1:
        out[-2:] = [slice(out[-2].start, n)]
    return out


def _to_model(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def embed_eval(model: EmbedNet, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Eval-mode (stored statistics) embeddings, as the service computes them."""
    model.eval()
    out = np.empty((len(x), model.cfg.out_dim), dtype=np.float32)
    for s in _batches(len(x), batch_size):
        out[s] = model(_to_model(x[s])).numpy()
    return out


@torch.no_grad()
def _accuracy_from_embeddings(model: EmbedNet, emb: np.ndarray, y: np.ndarray) -> float | None:
    if len(y) == 0:
        return None
    pred = model.logits(torch.from_numpy(emb)).argmax(1).numpy()
    return float((pred == y).mean())


@torch.no_grad()
def train_mode_accuracy(model: EmbedNet, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Accuracy with batch statistics, running statistics untouched.

    ``model.train()`` makes every BN layer normalise with the batch's own statistics, as in training;
    a forward in train mode also updates the running buffers, so every buffer is saved first and
    restored after (cumulative BN has no momentum to set to zero, so this is the one way for all kinds).
    """
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        correct = 0
        for s in _eval_batches(len(x), batch_size):
            _, logits = model.forward_train(_to_model(x[s]))
            correct += int((logits.argmax(1).numpy() == y[s]).sum())
        return correct / max(len(x), 1)
    finally:
        for name, buf in model.named_buffers():
            buf.copy_(saved[name])
        model.train(was_training)


@dataclass
class _EvalPlan:
    """Which items each epoch's evaluation uses (fixed for the run, so epochs are comparable)."""

    subset: np.ndarray  # calibration sample: data indices
    heldout: np.ndarray  # data indices of held-out items whose label was trained on
    queries: np.ndarray  # retrieval queries (data indices)
    index: np.ndarray  # retrieval index (data indices); == queries for leave-one-out
    leave_one_out: bool


def _eval_plan(
    data: LabelledData,
    split: Split,
    label_map: np.ndarray,
    calibration: np.ndarray,
    cfg: TrainConfig,
    full: bool,
) -> _EvalPlan:
    test = split.test
    heldout = test[label_map[data.y[test]] >= 0] if len(test) else test
    if split.kind == "unseen":
        queries, index, loo = test, test, True
    elif len(test):
        queries, index, loo = test, split.train, False
    else:
        queries = index = np.zeros(0, dtype=np.int64)
        loo = False
    if not full:
        heldout = _subsample(heldout, cfg.eval_heldout, cfg.seed, 1)
        queries = _subsample(queries, cfg.eval_queries, cfg.seed, 2)
        index = queries if loo else _subsample(index, cfg.eval_index, cfg.seed, 3)
    return _EvalPlan(calibration, heldout, queries, index, loo)


def evaluate(
    model: EmbedNet, data: LabelledData, plan: _EvalPlan, label_map: np.ndarray, batch_size: int
) -> dict[str, Any]:
    """One evaluation pass: train-mode vs eval-mode accuracy, held-out accuracy, retrieval."""
    x_sub, y_sub = data.x[plan.subset], label_map[data.y[plan.subset]]
    # Embed every needed item once in eval mode: the subset, held-out items, queries and index overlap
    # (with a small training set the subset lies inside the index).
    need = np.unique(np.concatenate([plan.subset, plan.heldout, plan.queries, plan.index]))
    emb = embed_eval(model, data.x[need])
    pos = np.searchsorted(need, np.arange(len(data)))

    def rows(idx: np.ndarray) -> np.ndarray:
        return emb[pos[idx]]

    out: dict[str, Any] = {
        "train_mode_acc": train_mode_accuracy(model, x_sub, y_sub, batch_size),
        "eval_mode_acc": _accuracy_from_embeddings(model, rows(plan.subset), y_sub),
    }
    out["gap"] = out["train_mode_acc"] - out["eval_mode_acc"]
    out["heldout_acc"] = _accuracy_from_embeddings(model, rows(plan.heldout), label_map[data.y[plan.heldout]])
    out["heldout_n"] = len(plan.heldout)
    if len(plan.queries) and len(plan.index) > (1 if plan.leave_one_out else 0):
        out["retrieval"] = retrieval_metrics(
            rows(plan.queries),
            data.y[plan.queries],
            rows(plan.index),
            data.y[plan.index],
            exclude_self=plan.leave_one_out,
        )
        out["retrieval"]["leave_one_out"] = plan.leave_one_out
    else:
        out["retrieval"] = None
    return out


# ------------------------------------------------------------------------------------------ training


def one_cycle(total: int, warmup: float, start: float = 1 / 25, end: float = 1e-4) -> Callable[[int], float]:
    """LR factor at step ``t``: a cosine ramp from ``start`` to 1 over the first ``warmup`` fraction of
    the steps, then a cosine anneal to ``end``. The shape of torch's OneCycleLR, written out because
    OneCycleLR divides by zero when a run has only a handful of steps (``--max-steps 3``)."""
    warm = max(1, round(warmup * total))

    def factor(t: int) -> float:
        if t < warm:
            return start + (1 - start) * (1 - math.cos(math.pi * t / warm)) / 2
        p = min(1.0, (t - warm) / max(1, total - warm))
        return end + (1 - end) * (1 + math.cos(math.pi * p)) / 2

    return factor


def _param_groups(model: EmbedNet, weight_decay: float) -> list[dict[str, Any]]:
    """Decay conv / linear weights only: decaying norm scales and biases pulls them toward zero for no
    regularising benefit (the usual practice since Goyal et al. 2017)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Batches:
    """The training batches of one epoch as positions into the training set."""

    def __init__(self, y_train: np.ndarray, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.n = len(y_train)
        self.balanced = (
            BalancedBatchSampler(y_train, k_per_class=cfg.k_per_class, seed=cfg.seed)
            if cfg.sampler == "balanced"
            else None
        )

    @property
    def batch_size(self) -> int:
        return self.balanced.batch_size if self.balanced is not None else int(self.cfg.batch_size or 2)

    def per_epoch(self) -> int:
        if self.balanced is not None:
            return len(self.balanced)
        return len(random_batches(self.n, self.batch_size, self.cfg.seed, 0))

    def epoch(self, e: int) -> list[np.ndarray]:
        if self.balanced is not None:
            self.balanced.set_epoch(e)
            return [np.asarray(b, dtype=np.int64) for b in self.balanced]
        return random_batches(self.n, self.batch_size, self.cfg.seed, e)


def _check_representation(x: np.ndarray, spec: InputSpec) -> None:
    """Refuse arrays declared bigram that are clearly not (nataraj arrays loaded with another spec).

    Both representations are ``(1, S, S)`` uint8, so shapes cannot tell them apart, and a model trained
    on nataraj arrays under a bundle that says "bigram" would be served the wrong inputs. Bigram arrays
    are scaled so that every one peaks at exactly 255; nataraj arrays of real executables do so only
    sometimes (37 % of the Debian manifest at 64x64, 3 % at 32x32). The converse test is not safe: at
    large sizes nataraj pixels are raw bytes, and nearly every executable holds a 0xFF byte.
    """
    if spec.modality != "executable" or len(x) < 20:
        return
    peaks = float((x.reshape(len(x), -1).max(axis=1) == 255).mean())
    if spec.representation == "bigram" and peaks < 0.99:
        raise TrainingError(
            f"the configuration says bigram, but only {peaks:.0%} of the arrays peak at 255 as bigram "
            "arrays always do (nataraj arrays?); load the data with this configuration's input_spec()"
        )


def train(
    data: LabelledData,
    split: Split,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train an embedding model on ``data[split.train]`` and evaluate it every epoch (see module doc)."""
    cfg = replace(cfg.resolved(), split=split.kind)  # the split actually used is what gets recorded
    say = log or (lambda _msg: None)
    spec = cfg.input_spec()
    want = (spec.channels, spec.size, spec.size)
    if data.x.dtype != np.uint8 or data.x.shape[1:] != want:
        raise TrainingError(
            f"data arrays are {data.x.dtype} {tuple(data.x.shape[1:])}, the configuration's input spec "
            f"({spec.modality}, {spec.representation}, size {spec.size}) needs uint8 {want}: load the data "
            "with this configuration's input_spec()"
        )
    _check_representation(data.x, spec)
    if len(split.train) < 2:
        raise TrainingError(f"the {split.kind} split leaves {len(split.train)} training item(s); need 2+")

    trained = np.unique(data.y[split.train])
    if len(trained) < 2:
        raise TrainingError("the training side holds a single class; a classifier needs two or more")
    label_map = np.full(len(data.labels), -1, dtype=np.int64)
    label_map[trained] = np.arange(len(trained))
    labels = [data.labels[i] for i in trained]

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(data, split, cfg, label_map, labels, progress, say)
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def _train(
    data: LabelledData,
    split: Split,
    cfg: TrainConfig,
    label_map: np.ndarray,
    labels: list[str],
    progress: bool,
    say: Callable[[str], None],
) -> TrainResult:
    t_start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    train_idx = np.asarray(split.train, dtype=np.int64)
    y_train_np = label_map[data.y[train_idx]]
    calibration = train_idx[stratified_sample(y_train_np, cfg.eval_subset, rng)]

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config(len(labels))).to(memory_format=torch.channels_last)

    x_train = torch.from_numpy(np.ascontiguousarray(data.x[train_idx]))
    y_train = torch.from_numpy(y_train_np)
    batches = _Batches(y_train_np, cfg)
    per_epoch = batches.per_epoch()
    total = min(
        cfg.max_steps if cfg.max_steps is not None else math.inf,
        per_epoch * cfg.epochs if cfg.epochs is not None else math.inf,
    )
    total = int(total)
    epochs = math.ceil(total / per_epoch)

    # AdamW + one-cycle: the run length is known in advance (epochs or max_steps), and one-cycle's
    # warm-up then cosine anneal to ~0 reaches a good optimum in few epochs (Smith & Topin 2019,
    # "super-convergence"); AdamW's per-parameter scaling makes one LR work for both modalities, whose
    # data sizes differ 50-fold, where SGD needs retuning. The LR ending near zero also means the final
    # weights barely move in the last epoch, so BN running statistics CAN converge -- whether they did
    # is what the per-epoch train/eval accuracy gap shows.
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=float(cfg.lr or 1e-3))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(total, cfg.warmup))
    plan = _eval_plan(data, split, label_map, calibration, cfg, full=False)
    say(
        f"training {len(train_idx)} items, {len(labels)} classes, {epochs} epoch(s) x {per_epoch} steps "
        f"(batch {batches.batch_size}, {cfg.sampler}), norm {cfg.norm}; evaluating each epoch on "
        f"{len(plan.subset)} training items, {len(plan.heldout)} held-out, "
        f"{len(plan.queries)} queries vs {len(plan.index)}"
    )

    history: list[dict[str, Any]] = []
    step = 0
    t_train = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        on_epoch_start(model, cfg.norm_config())
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        epoch_batches = batches.epoch(epoch)[: total - step]
        bar = progress_bar(epoch_batches, enabled=progress, desc=f"epoch {epoch + 1}/{epochs}", unit="step")
        loss_sum = 0.0
        for b in bar:
            idx = torch.from_numpy(b)
            xb = x_train[idx]
            if cfg.augment:
                xb = augment_images(xb, gen)
            _, logits = model.forward_train(_to_model(xb))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        t_epoch = time.perf_counter() - t0
        t_train += t_epoch
        te = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": step,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": loss_sum / max(len(epoch_batches), 1),
        }
        model.fit_generic_basis(_to_model(data.x[calibration]))
        row |= evaluate(model, data, plan, label_map, batches.batch_size)
        row["seconds_train"] = t_epoch
        row["seconds_eval"] = time.perf_counter() - te
        history.append(row)
        say(_epoch_line(row, epochs))

    te = time.perf_counter()
    final = evaluate(
        model,
        data,
        _eval_plan(data, split, label_map, calibration, cfg, full=True),
        label_map,
        batches.batch_size,
    )
    model = model.to(memory_format=torch.contiguous_format).eval()
    final |= {
        "epochs": epochs,
        "steps": step,
        "split": split.kind,
        "n_train": len(train_idx),
        "n_test": len(split.test),
        "n_classes": len(labels),
        "seconds_train": t_train,
        "seconds_final_eval": time.perf_counter() - te,
        "seconds_total": time.perf_counter() - t_start,
    }
    return TrainResult(model, cfg, labels, label_map, calibration, history, final)


def _fmt(v: Any) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    r = row.get("retrieval") or {}
    return (
        f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  train-mode {_fmt(row['train_mode_acc'])}  "
        f"eval-mode {_fmt(row['eval_mode_acc'])}  held-out {_fmt(row['heldout_acc'])}  "
        f"P@1 {_fmt(r.get('P@1'))}  mAP {_fmt(r.get('mAP'))}  "
        f"({row['seconds_train']:.0f}s + {row['seconds_eval']:.0f}s eval)"
    )


def save_trained_bundle(
    path: str | Path,
    result: TrainResult,
    data: LabelledData,
    split: Split,
    *,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``result`` as a bundle: the calibration sample, the fingerprint of the TRAIN side (what
    ``eval retrieval`` compares to tell a clean evaluation from a leaky one), provenance and metrics."""
    cal_x, cal_y = result.calibration_arrays(data)
    prov = {"train_config": result.config.to_dict(), **(provenance or {})}
    return save_bundle(
        path,
        result.model,
        result.config.input_spec(),
        result.labels,
        cal_x,
        cal_y,
        data_fingerprint=data.subset(split.train).fingerprint(),
        provenance=prov,
        metrics=result.metrics_json(),
        overwrite=overwrite,
    )
