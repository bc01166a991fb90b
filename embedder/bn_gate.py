"""The BN health gate: can a model's stored BatchNorm statistics be trusted in inference?

Each BN layer's running statistics are compared with precise population statistics of the calibration
sample (:mod:`embedder.precise_bn`), channel by channel:

* standardised mean shift ``|mu_run - mu_pop| / sqrt(var_pop + eps)``: how far, in the population's own
  standard deviations, inference moves every activation of that channel;
* variance log-ratio ``|ln((var_run + eps) / (var_pop + eps))|``: by what factor inference rescales it.

Their 95th percentiles over a layer's channels decide (the maximum is reported, not used: a single
near-dead channel should not fail a model).  Precise statistics are measured layer by layer with the
earlier layers already repaired, so a layer with bad statistics is reported alone instead of dragging
every later layer with it.

Functional checks then measure the consequences on the whole model as it would be served: the cosine
between embeddings with running and with precise statistics, the classifier's top-1 agreement between the
two, and the classifier's accuracy on the calibration sample in eval mode (running statistics) against
train mode (batch statistics, as in training).  Any failed criterion makes the verdict ``unconverged``,
and statistics still at their initial values (mean exactly 0, variance exactly 1) fail outright.

The defaults of :class:`GateThresholds` come from measured runs; docs/bn-gate.md has the numbers.
The input model is never modified: every measurement runs on a deep copy.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from embedder.norm import bn_layers
from embedder.precise_bn import (
    MIN_SAMPLES,
    StatsDict,
    apply_statistics,
    as_batches,
    precise_statistics,
    to_tensor,
)

CONVERGED = "converged"
UNCONVERGED = "unconverged"
NO_RUNNING_STATS = "no running statistics"
PASSING_VERDICTS = frozenset({CONVERGED, NO_RUNNING_STATS})

_CHUNK = 256  # inference batch size of the functional passes; results do not depend on it


@dataclass(frozen=True)
class GateThresholds:
    """Limits of the gate.  Defaults are set from measurements (docs/bn-gate.md)."""

    mean_shift_p95: float = 0.5
    """Largest allowed 95th percentile (over a layer's channels) of the standardised mean shift."""
    log_var_ratio_p95: float = 0.5
    """Largest allowed 95th percentile of ``|ln(var_run / var_pop)|`` (0.5: a factor of 1.65)."""
    min_cosine: float = 0.95
    """Smallest allowed mean cosine between embeddings with running and with precise statistics."""
    min_top1_agreement: float = 0.9
    """Smallest allowed share of calibration inputs whose classifier top-1 is the same both ways."""
    max_accuracy_drop: float = 0.1
    """Largest allowed train-mode minus eval-mode accuracy on the calibration sample."""
    min_samples: int = MIN_SAMPLES
    """Smallest calibration sample accepted (see :data:`embedder.precise_bn.MIN_SAMPLES`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateThresholds:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class LayerReport:
    name: str
    channels: int
    num_batches_tracked: int | None
    at_init: bool
    mean_shift_p95: float
    mean_shift_max: float
    log_var_ratio_p95: float
    log_var_ratio_max: float
    var_ratio_median: float
    """Median over channels of ``var_run / var_pop``: tells "too small" from "too large"."""
    failed: list[str] = field(default_factory=list)


@dataclass
class FunctionalReport:
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    eval_accuracy: float | None = None
    """Classifier accuracy with the running statistics (what serving would use)."""
    precise_accuracy: float | None = None
    """Classifier accuracy with precise statistics (what ``recalibrate`` would give)."""
    train_accuracy: float | None = None
    """Classifier accuracy in train mode: batch statistics over shuffled batches of ``batch_size``."""
    labelled: int = 0

    @property
    def accuracy_drop(self) -> float | None:
        if self.train_accuracy is None or self.eval_accuracy is None:
            return None
        return self.train_accuracy - self.eval_accuracy


@dataclass
class GateReport:
    verdict: str
    reasons: list[str]
    norm: dict[str, Any]
    n_samples: int
    batch_size: int
    thresholds: GateThresholds
    layers: list[LayerReport] = field(default_factory=list)
    functional: FunctionalReport | None = None
    seconds: float = 0.0
    model_id: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict in PASSING_VERDICTS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; non-finite numbers (corrupt statistics) become ``None``."""
        d = asdict(self)
        d["passed"] = self.passed
        if self.functional is not None:
            d["functional"]["accuracy_drop"] = self.functional.accuracy_drop
        return _finite(d)


def gate_passes(report: GateReport | dict[str, Any], *, model_id: str | None = None) -> bool:
    """True when the report's verdict lets the model be served (``converged`` or no running statistics).

    With ``model_id`` (a bundle id) a report written for another model, e.g. a stale ``bn_report.json``
    beside recalibrated weights, does not pass.
    """
    d = report.to_dict() if isinstance(report, GateReport) else report
    if model_id is not None and d.get("model_id") != model_id:
        return False
    return d.get("verdict") in PASSING_VERDICTS


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _norm_info(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "cfg", None)
    norm = getattr(cfg, "norm", None)
    if norm is None:
        return {"kind": "unknown"}
    return {"kind": norm.kind, "momentum": norm.momentum if norm.kind == "moving" else None}


def _ok_at_most(value: float | None, limit: float) -> bool:
    """``value <= limit``, where NaN (corrupt statistics) fails."""
    return value is not None and value <= limit


def _layer_report(
    name: str, bn: nn.modules.batchnorm._BatchNorm, pop: tuple[torch.Tensor, torch.Tensor]
) -> LayerReport:
    mu_run, var_run = bn.running_mean.double(), bn.running_var.double()
    mu_pop, var_pop = pop
    shift = ((mu_run - mu_pop).abs() / (var_pop + bn.eps).sqrt()).numpy()
    log_ratio = torch.log((var_run + bn.eps) / (var_pop + bn.eps)).numpy()
    nbt = None if bn.num_batches_tracked is None else int(bn.num_batches_tracked)
    return LayerReport(
        name=name,
        channels=int(mu_run.numel()),
        num_batches_tracked=nbt,
        at_init=bool(torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)),
        mean_shift_p95=float(np.percentile(shift, 95)),
        mean_shift_max=float(shift.max()),
        log_var_ratio_p95=float(np.percentile(np.abs(log_ratio), 95)),
        log_var_ratio_max=float(np.abs(log_ratio).max()),
        var_ratio_median=float(np.exp(np.median(log_ratio))),
    )


@torch.no_grad()
def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in as_batches(x, _CHUNK)])


@torch.no_grad()
def _train_mode_predictions(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Top-1 with batch statistics, as in training: shuffled (fixed seed) near-equal batches."""
    work = copy.deepcopy(model).train()
    order = np.random.default_rng(0).permutation(len(x))
    pred = torch.empty(len(x), dtype=torch.long)
    for idx in np.array_split(order, max(1, math.ceil(len(x) / batch_size))):
        t = torch.from_numpy(idx)
        pred[t] = work.logits(work(x[t])).argmax(1)
    return pred


def _functional(
    model: nn.Module, precise: StatsDict, x: torch.Tensor, y: np.ndarray | None, batch_size: int
) -> FunctionalReport:
    run = copy.deepcopy(model).eval()
    pre = copy.deepcopy(model).eval()
    apply_statistics(pre, precise, num_batches=1)
    e_run, e_pre = _embed(run, x).double(), _embed(pre, x).double()
    cos = torch.nn.functional.cosine_similarity(e_run, e_pre, dim=1)  # NaN for corrupt statistics
    rep = FunctionalReport(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    if getattr(model, "classifier", None) is None:
        return rep
    with torch.no_grad():
        top_run = run.logits(e_run.float()).argmax(1)
        top_pre = pre.logits(e_pre.float()).argmax(1)
    rep.top1_agreement = float((top_run == top_pre).double().mean())
    if y is None:
        return rep
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    valid = (labels >= 0) & (labels < int(model.cfg.num_classes))
    rep.labelled = int(valid.sum())
    if rep.labelled == 0:
        return rep
    top_train = _train_mode_predictions(model, x, batch_size)

    def accuracy(pred: torch.Tensor) -> float:
        return float((pred[valid] == labels[valid]).double().mean())

    rep.eval_accuracy, rep.precise_accuracy = accuracy(top_run), accuracy(top_pre)
    rep.train_accuracy = accuracy(top_train)
    return rep


def check_model(
    model: nn.Module,
    x_cal: np.ndarray | torch.Tensor,
    y_cal: np.ndarray | None = None,
    *,
    thresholds: GateThresholds | None = None,
    batch_size: int = 64,
    model_id: str | None = None,
) -> GateReport:
    """Run the BN health gate on ``model`` with calibration inputs ``x_cal`` (uint8 ``(N, C, S, S)``).

    ``y_cal`` (class indices; negative = unknown) enables the accuracy comparison when the model has a
    classifier.  ``batch_size`` is the batch size of the train-mode pass (use the training batch size);
    nothing else depends on it.  Raises :class:`~embedder.precise_bn.NotEnoughData` when the sample is
    smaller than ``thresholds.min_samples``.
    """
    thresholds = thresholds or GateThresholds()
    start = time.perf_counter()
    x = to_tensor(x_cal)
    report = GateReport(
        verdict=CONVERGED,
        reasons=[],
        norm=_norm_info(model),
        n_samples=len(x),
        batch_size=batch_size,
        thresholds=thresholds,
        model_id=model_id,
    )
    layers = dict(bn_layers(model))
    if not layers:
        report.verdict = NO_RUNNING_STATS
        report.reasons.append(
            f"normalisation {report.norm['kind']!r} keeps no running statistics: nothing to check"
        )
        report.seconds = time.perf_counter() - start
        return report

    precise = precise_statistics(model, as_batches(x, _CHUNK), min_samples=thresholds.min_samples)
    t = thresholds
    for name, bn in layers.items():
        lr = _layer_report(name, bn, precise[name])
        report.layers.append(lr)
        if lr.at_init:
            lr.failed.append("at_init")
            report.reasons.append(
                f"{name}: running statistics still at their initial values (mean 0, variance 1, "
                f"num_batches_tracked {lr.num_batches_tracked})"
            )
            continue
        if not _ok_at_most(lr.mean_shift_p95, t.mean_shift_p95):
            lr.failed.append("mean_shift")
            report.reasons.append(
                f"{name}: p95 standardised mean shift {lr.mean_shift_p95:.3g} > {t.mean_shift_p95:g} "
                f"(max {lr.mean_shift_max:.3g})"
            )
        if not _ok_at_most(lr.log_var_ratio_p95, t.log_var_ratio_p95):
            lr.failed.append("log_var_ratio")
            report.reasons.append(
                f"{name}: p95 |log variance ratio| {lr.log_var_ratio_p95:.3g} > {t.log_var_ratio_p95:g} "
                f"(running/population variance, median over channels: {lr.var_ratio_median:.3g}x)"
            )

    f = report.functional = _functional(model, precise, x, y_cal, batch_size)
    if not f.cosine_mean >= t.min_cosine:
        report.reasons.append(
            f"embeddings with running vs precise statistics: mean cosine {f.cosine_mean:.4f} < "
            f"{t.min_cosine:g} (min {f.cosine_min:.4f})"
        )
    if f.top1_agreement is not None and not f.top1_agreement >= t.min_top1_agreement:
        report.reasons.append(
            f"classifier top-1 agreement running vs precise statistics {f.top1_agreement:.3f} < "
            f"{t.min_top1_agreement:g}"
        )
    drop = f.accuracy_drop
    if drop is not None and not _ok_at_most(drop, t.max_accuracy_drop):
        report.reasons.append(
            f"eval-mode accuracy {f.eval_accuracy:.3f} is {drop:.3f} below train-mode accuracy "
            f"{f.train_accuracy:.3f} on the calibration sample (allowed {t.max_accuracy_drop:g})"
        )
    if report.reasons:
        report.verdict = UNCONVERGED
    report.seconds = time.perf_counter() - start
    return report
