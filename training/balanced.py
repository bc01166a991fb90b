"""The balanced-batch experiment (Hajaj & Gillies): train with class-balanced batches, infer with the
statistics of class-balanced TEST batches.

The claim under test: when every training batch holds one image per class, the batch statistics BatchNorm
normalises with are nearly the same in every batch, and a test batch composed the same way reproduces
them, so classifying test images in balanced batches with their own statistics beats the usual inference
with running statistics. Here, on Fashion-MNIST (10 classes, so a balanced batch is 10 images):

* two models from :func:`training.loop.train` with the same seed, epochs and batch size: one with random
  batches, one with :class:`training.samplers.BalancedBatchSampler` batches;
* inference (a) standard: each image alone, running statistics (eval mode); (b) balanced: the test set
  cut into balanced batches (one image per class -- which uses the TEST LABELS to compose the batches; that
  is the paper's protocol, and no deployed system could do it), each normalised with its own statistics;
  (c) the same with the batches recomposed at random for each of several passes (mean and spread);
* (d), a control: batches of the same size composed at random, without the labels, each normalised with
  its own statistics; what (b) gains beyond (d) comes from composing the batches with the labels;
* the circulation probe: a weakly classified test image moved through balanced batches of confidently
  classified ones, to show that its label depends on its batch-mates but not on its position.

Batch-statistics inference exists only in this module; the service and :mod:`embedder` never use it (an
item's embedding must not depend on what else arrived in the same request).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from embedder.dataspec import LabelledData, load_data
from embedder.model import EmbedNet
from embedder.norm import bn_layers
from training.loop import TrainConfig, TrainResult, train
from training.samplers import BalancedBatchSampler, random_batches
from training.splits import make_split

FASHION_SPEC = "idx:/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------------ inference modes


def batch_statistics_model(model: nn.Module) -> nn.Module:
    """A deep copy whose BatchNorm layers normalise with each batch's own statistics and update nothing.

    With its running buffers removed, PyTorch's BatchNorm uses batch statistics even in eval mode, and
    there is nothing to update: the copy stays in eval mode for everything else, and the original
    model's running statistics cannot move.
    """
    m = copy.deepcopy(model).eval()
    for _, bn in list(bn_layers(m)):
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    return m


@torch.no_grad()
def standard_probs(model: EmbedNet, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Softmax class probabilities with running statistics (eval mode): each image independent."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(torch.softmax(model.logits(model(torch.from_numpy(x[i : i + batch_size]))), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def batch_probs(bs_model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Softmax probabilities of ONE batch normalised with its own statistics (``bs_model`` from
    :func:`batch_statistics_model`)."""
    return torch.softmax(bs_model.logits(bs_model(torch.from_numpy(np.ascontiguousarray(x)))), 1).numpy()


def balanced_test_batches(y: np.ndarray, seed: int) -> list[np.ndarray]:
    """The test set cut into batches of one item per class, composed at random by ``seed``.

    Composing them needs the test labels (the paper's protocol). Equal class sizes (Fashion-MNIST's
    1,000 per class) give every item exactly once; otherwise smaller classes are re-drawn, as the
    training sampler does, and :func:`batch_predictions` keeps each item's first prediction.
    """
    sampler = BalancedBatchSampler(y, k_per_class=1, seed=seed)
    return [np.asarray(b, dtype=np.int64) for b in sampler]


def batch_predictions(bs_model: nn.Module, x: np.ndarray, batches: list[np.ndarray]) -> np.ndarray:
    """Predicted class per item, each batch normalised with its own statistics (an item in several
    batches keeps its first prediction)."""
    pred = np.full(len(x), -1, dtype=np.int64)
    for b in batches:
        p = batch_probs(bs_model, x[b]).argmax(1)
        fresh = pred[b] < 0
        pred[b[fresh]] = p[fresh]
    if (pred < 0).any():
        raise ValueError("some items were in no batch")
    return pred


# ------------------------------------------------------------------------------------ the experiment


@dataclass
class BalancedConfig:
    """Options of ``lookalike experiment balanced-batches``; defaults sized for < 45 min on 2 cores."""

    data: str = FASHION_SPEC
    # 6,000 steps of 10 images an epoch, ~110 s each with one thread here: 5 epochs x 2 trainings plus
    # inference is ~20 minutes (3 epochs measured 775 s in all), inside the 45-minute budget with room
    # for a busy machine.
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int | None = None  # random batches; None = number of classes, the balanced batch size
    lr: float | None = None
    norm: str = "moving"
    momentum: float = 0.1
    augment: bool | None = None
    seed: int = 0
    passes: int = 10  # reshuffled balanced passes for (c)
    probe_mates: int = 20  # batch-mate sets for the circulation probe
    limit_per_class: int | None = None
    # Batches of ten 28x28 images: a second torch thread buys little, and on a busy machine the threads
    # wait on each other (measured here under load: 61 ms a step with one thread, 716 ms with two).
    threads: int | None = 1


@dataclass
class InferenceRow:
    training: str  # "random" or "balanced" batches
    inference: str  # "standard", "balanced", "balanced-shuffled"
    error: float  # mean test error
    error_std: float = 0.0  # over passes (shuffled rows only)
    error_min: float = 0.0
    error_max: float = 0.0
    passes: int = 1
    seconds: float = 0.0


@dataclass
class CirculationRow:
    case: str  # "slot" (replaces the class-k image) or "position" (same batch, moved) or "mates"
    where: int
    replaced: str  # class whose image was replaced, or "" when the batch stays balanced
    predicted: str
    prob: float


@dataclass
class CirculationProbe:
    index: int  # position of the probed image in the test set
    true_label: str
    standard_label: str
    standard_prob: float
    rows: list[CirculationRow] = field(default_factory=list)
    mates_counts: dict[str, int] = field(default_factory=dict)
    position_max_logit_diff: float = 0.0

    def takes_missing_class(self) -> tuple[int, int]:
        """(slots where the image got the label of the class missing from its batch, such slots)."""
        other = [r for r in self.rows if r.case == "slot" and r.replaced]
        return sum(r.predicted == r.replaced for r in other), len(other)


@dataclass
class BalancedReport:
    config: dict[str, Any]
    n_train: int
    n_test: int
    labels: list[str]
    rows: list[InferenceRow]
    probe: CirculationProbe | None
    train_seconds: dict[str, float]
    train_history: dict[str, list[dict[str, Any]]]
    seconds: float = 0.0

    def row(self, training: str, inference: str) -> InferenceRow:
        for r in self.rows:
            if r.training == training and r.inference == inference:
                return r
        raise KeyError((training, inference))

    def relative_reduction(self, training: str, inference: str, against: tuple[str, str]) -> float:
        base = self.row(*against).error
        return (base - self.row(training, inference).error) / base if base > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_error_reduction"] = {
            "balanced/balanced vs standard/standard": self.relative_reduction(
                "balanced", "balanced", ("random", "standard")
            ),
            "balanced/balanced vs balanced/standard": self.relative_reduction(
                "balanced", "balanced", ("balanced", "standard")
            ),
        }
        return d

    def to_markdown(self) -> str:
        lines = [
            f"{self.n_train} training images, {self.n_test} test images, {len(self.labels)} classes; "
            f"{self.config['epochs']} epoch(s), seed {self.config['seed']}, norm {self.config['norm']} "
            f"(momentum {self.config['momentum']}).",
            "",
            "| training batches / inference | test error | accuracy | spread over passes | seconds |",
            "|---|---:|---:|---|---:|",
        ]
        names = {"random": "standard", "balanced": "balanced"}
        for r in self.rows:
            spread = (
                f"std {r.error_std:.4f}, min {r.error_min:.4f}, max {r.error_max:.4f} ({r.passes} passes)"
                if r.passes > 1
                else ""
            )
            lines.append(
                f"| {names[r.training]} / {r.inference} | {r.error:.4f} | {1 - r.error:.4f} | {spread} | "
                f"{r.seconds:.1f} |"
            )
        d = self.to_dict()["relative_error_reduction"]
        lines += [""] + [f"- relative error reduction, {k}: {v:+.1%}" for k, v in d.items()]
        lines.append(
            "- training wall time: "
            + ", ".join(f"{k} batches {v:.0f} s" for k, v in self.train_seconds.items())
            + f"; whole experiment {self.seconds:.0f} s."
        )
        if self.probe is not None:
            lines += ["", *_probe_markdown(self.probe)]
        return "\n".join(lines) + "\n"


def _probe_markdown(p: CirculationProbe) -> list[str]:
    lines = [
        f"Circulation probe: test image #{p.index} (true {p.true_label!r}); standard inference says "
        f"{p.standard_label!r} with p={p.standard_prob:.2f}.",
        "",
        "| case | slot / position | replaced image of class | predicted | p |",
        "|---|---:|---|---|---:|",
    ]
    for r in p.rows:
        lines.append(
            f"| {r.case} | {r.where} | {r.replaced or '(own class: still balanced)'} | "
            f"{r.predicted} | {r.prob:.2f} |"
        )
    took, slots = p.takes_missing_class()
    lines += [
        "",
        f"- in {took} of {slots} slots that unbalance the batch, the image takes the label of the class "
        "missing from its batch.",
        f"- same batch, image moved through all positions: largest logit difference "
        f"{p.position_max_logit_diff:.2e} (BatchNorm statistics are permutation invariant).",
        "- with different confident batch-mates (its own class's slot): "
        + ", ".join(f"{k} x{v}" for k, v in sorted(p.mates_counts.items(), key=lambda t: -t[1])),
    ]
    return lines


def _train_one(
    data: LabelledData, sampler: str, cfg: BalancedConfig, batch_size: int, log: Any, progress: bool
) -> TrainResult:
    tcfg = TrainConfig(
        modality="image",
        norm=cfg.norm,
        momentum=cfg.momentum,
        epochs=cfg.epochs if cfg.max_steps is None else None,
        max_steps=cfg.max_steps,
        batch_size=batch_size,
        sampler=sampler,
        split="seen",
        seed=cfg.seed,
        lr=cfg.lr,
        augment=cfg.augment,
        # The loop's per-epoch report is not what this experiment measures: keep it small.
        eval_subset=256,
        eval_heldout=1000,
        eval_queries=500,
        eval_index=5000,
        threads=cfg.threads,
    )
    split = make_split(data, "seen")
    return train(data, split, tcfg, progress=progress, log=log)


def _evaluate_model(
    model: EmbedNet, training: str, x: np.ndarray, y: np.ndarray, cfg: BalancedConfig
) -> list[InferenceRow]:
    rows = []
    t0 = time.perf_counter()
    err = float((standard_probs(model, x).argmax(1) != y).mean())
    rows.append(InferenceRow(training, "standard", err, seconds=time.perf_counter() - t0))
    bs_model = batch_statistics_model(model)
    t0 = time.perf_counter()
    err = float((batch_predictions(bs_model, x, balanced_test_batches(y, cfg.seed)) != y).mean())
    rows.append(InferenceRow(training, "balanced", err, seconds=time.perf_counter() - t0))
    if training == "balanced" and cfg.passes > 0:
        t0 = time.perf_counter()
        errs = np.array(
            [
                (batch_predictions(bs_model, x, balanced_test_batches(y, cfg.seed + 1 + p)) != y).mean()
                for p in range(cfg.passes)
            ]
        )
        rows.append(
            InferenceRow(
                training,
                "balanced-shuffled",
                float(errs.mean()),
                float(errs.std(ddof=1)) if len(errs) > 1 else 0.0,
                float(errs.min()),
                float(errs.max()),
                len(errs),
                time.perf_counter() - t0,
            )
        )
    # Control: batch statistics from batches of the same size composed WITHOUT the labels. What the
    # balanced rows gain beyond this row comes from the label-composed batches, not from batch
    # statistics as such.
    t0 = time.perf_counter()
    batches = random_batches(len(y), len(np.unique(y)), cfg.seed)
    err = float((batch_predictions(bs_model, x, batches) != y).mean())
    rows.append(InferenceRow(training, "random-batches", err, seconds=time.perf_counter() - t0))
    return rows


def circulation_probe(
    model: EmbedNet, x: np.ndarray, y: np.ndarray, labels: list[str], *, mates: int = 20, seed: int = 0
) -> CirculationProbe:
    """Move a weakly classified test image through balanced batches of confidently classified ones.

    The probed image is the test image with the lowest top probability under standard inference. Its
    batch-mates are, per class, the most confidently and correctly classified test images. Three cases:
    ``slot`` k -- the image replaces the class-k image of one fixed batch (k = its own class keeps the
    batch balanced, any other k leaves two of one class and none of k); ``position`` -- the balanced batch
    (own slot) with the image rotated through every position; ``mates`` -- balanced batches with
    ``mates`` different sets of batch-mates.
    """
    probs = standard_probs(model, x)
    top = probs.max(1)
    pred = probs.argmax(1)
    weak = int(np.argmin(top))
    classes = np.unique(y)
    pool: dict[int, np.ndarray] = {}
    for c in classes:
        ok = np.flatnonzero((y == c) & (pred == c) & (np.arange(len(y)) != weak))
        if len(ok) == 0:
            ok = np.flatnonzero((y == c) & (np.arange(len(y)) != weak))
        pool[int(c)] = ok[np.argsort(-top[ok], kind="stable")][: max(mates, 1)]
    bs_model = batch_statistics_model(model)
    probe = CirculationProbe(weak, labels[int(y[weak])], labels[int(pred[weak])], float(top[weak]))
    own = int(y[weak])
    base = np.array([pool[int(c)][0] for c in classes])

    def run(batch: np.ndarray, at: int) -> tuple[int, float, np.ndarray]:
        p = batch_probs(bs_model, x[batch])
        return int(p[at].argmax()), float(p[at].max()), p[at]

    for k, c in enumerate(classes):
        batch = base.copy()
        batch[k] = weak
        label, prob, _ = run(batch, k)
        probe.rows.append(
            CirculationRow("slot", k, "" if int(c) == own else labels[int(c)], labels[label], prob)
        )
    own_slot = int(np.flatnonzero(classes == own)[0])
    balanced_batch = base.copy()
    balanced_batch[own_slot] = weak
    ref_logits = None
    for shift in range(len(classes)):
        batch = np.roll(balanced_batch, shift)
        at = (own_slot + shift) % len(classes)
        with torch.no_grad():
            logits = bs_model.logits(bs_model(torch.from_numpy(np.ascontiguousarray(x[batch])))).numpy()[at]
        if ref_logits is None:
            ref_logits = logits
        probe.position_max_logit_diff = max(
            probe.position_max_logit_diff, float(np.abs(logits - ref_logits).max())
        )
        label = int(logits.argmax())
        prob = float(torch.softmax(torch.from_numpy(logits), 0).max())
        probe.rows.append(CirculationRow("position", at, "", labels[label], prob))
    probe.rows.sort(key=lambda r: (r.case != "slot", r.where))
    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    for _ in range(mates):
        batch = np.array([rng.choice(pool[int(c)]) for c in classes])
        batch[own_slot] = weak
        counts[labels[run(batch, own_slot)[0]]] += 1
    probe.mates_counts = dict(counts)
    return probe


def run_balanced_experiment(
    cfg: BalancedConfig,
    *,
    data: LabelledData | None = None,
    progress: bool = True,
    log: Any = None,
) -> BalancedReport:
    """Train with random and with balanced batches, then compare the inference modes (module doc).

    ``data`` may pass a loaded IDX data set (both parts, loaded with the image input spec).
    """
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, data, progress, log or (lambda _msg: None))
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: BalancedConfig, data: LabelledData | None, progress: bool, say: Any) -> BalancedReport:
    t_start = time.perf_counter()
    if data is None:
        spec = TrainConfig(modality="image").resolved().input_spec()
        data = load_data(
            cfg.data, spec, progress=progress, limit_per_class=cfg.limit_per_class, seed=cfg.seed
        )
    split = make_split(data, "seen")
    n_classes = len(np.unique(data.y[split.train]))
    batch_size = cfg.batch_size or n_classes
    x_test = np.ascontiguousarray(data.x[split.test])
    rows: list[InferenceRow] = []
    train_seconds: dict[str, float] = {}
    history: dict[str, list[dict[str, Any]]] = {}
    models: dict[str, TrainResult] = {}
    for sampler in ("random", "balanced"):
        say(f"training with {sampler} batches of {batch_size if sampler == 'random' else n_classes}")
        t0 = time.perf_counter()
        result = _train_one(data, sampler, cfg, batch_size, say, progress)
        train_seconds[sampler] = time.perf_counter() - t0
        history[sampler] = result.history
        models[sampler] = result
        y_test = result.label_map[data.y[split.test]]
        if (y_test < 0).any():
            raise ValueError("a test class was not trained on; use more data per class")
        new_rows = _evaluate_model(result.model, sampler, x_test, y_test, cfg)
        for r in new_rows:
            say(f"{sampler}-trained, {r.inference} inference: test error {r.error:.4f} ({r.seconds:.0f} s)")
        rows += new_rows
    bal = models["balanced"]
    probe = circulation_probe(
        bal.model, x_test, bal.label_map[data.y[split.test]], bal.labels, mates=cfg.probe_mates, seed=cfg.seed
    )
    order = {("random", "standard"): 0, ("balanced", "standard"): 1, ("balanced", "balanced"): 2}
    order |= {("balanced", "balanced-shuffled"): 3, ("random", "balanced"): 4}
    order |= {("balanced", "random-batches"): 5, ("random", "random-batches"): 6}
    rows.sort(key=lambda r: order.get((r.training, r.inference), 9))
    return BalancedReport(
        config=asdict(cfg) | {"random_batch_size": batch_size},
        n_train=len(split.train),
        n_test=len(split.test),
        labels=bal.labels,
        rows=rows,
        probe=probe,
        train_seconds=train_seconds,
        train_history=history,
        seconds=time.perf_counter() - t_start,
    )
