"""Retrieval evaluation: the model and the baselines on exactly the same queries and index.

The protocol is DESIGN's "Evaluation protocol": ``seen`` -- queries are the split's test files, the index
its train files (for ``idx:DIR`` the natural split: 10,000 test images against the 60,000 training
images); ``unseen`` -- queries and index are the files of the held-out families, each query leaving
itself out. Every method produces a score or distance matrix over the same ``(queries, index)`` pair and
goes through the same :mod:`training.metrics` code, so a difference in the table is a difference in the
representation and nothing else.

The model embeds with :class:`embedder.embed.Embedder` (eval mode: stored BatchNorm statistics, an item's
vector independent of its batch-mates), exactly as the service will.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedder.bundle import Bundle, load_bundle
from embedder.dataspec import LabelledData, load_data
from embedder.embed import Embedder
from training.baselines import (
    FILE_BASELINES,
    IMAGE_BASELINES,
    TNULL,
    FeatureCache,
    FeatureStats,
    file_features,
    pixel_vectors,
    sqrt_histograms,
    ssdeep_distances,
    tlsh_distances,
)
from training.metrics import rank_metrics_from_distances, retrieval_metrics
from training.splits import Split, make_split

METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("P@1", "P@1"),
    ("macro_P@1", "macro P@1"),
    ("P@10", "P@10"),
    ("mAP", "mAP"),
    ("MRR@10", "MRR@10"),
)


def default_baselines(modality: str) -> tuple[str, ...]:
    """File baselines for executables, raw pixels for images (fuzzy hashes of pixels mean nothing)."""
    return FILE_BASELINES if modality == "executable" else IMAGE_BASELINES


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class RetrievalReport:
    """One evaluation: where it came from, what was queried against what, and every method's metrics."""

    model: str
    model_id: str
    data: str
    split: str
    queries: int
    index: int
    leave_one_out: bool
    held_out: list[str]
    trained_on: str
    methods: list[MethodResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(name)

    def to_markdown(self) -> str:
        """A markdown table, one row per method, plus the facts needed to read it."""
        lines = [
            f"model `{self.model}` (id {self.model_id}), data `{self.data}`, split **{self.split}**: "
            f"{self.queries} queries against {self.index} indexed items"
            + (" (leave-one-out)" if self.leave_one_out else "")
            + f"; model trained on: {self.trained_on}.",
        ]
        if self.held_out:
            lines.append(f"held-out families ({len(self.held_out)}): {', '.join(self.held_out)}.")
        lines.append("")
        head = ["method", *(title for _, title in METRIC_COLUMNS), "queries", "seconds", "notes"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---", *["---:"] * (len(head) - 2), "---"]) + "|")
        for m in self.methods:
            cells = [m.method]
            cells += [_fmt(m.metrics.get(key)) for key, _ in METRIC_COLUMNS]
            cells += [str(m.metrics.get("queries", "")), f"{m.seconds:.1f}", "; ".join(m.notes)]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _trained_on(bundle: Bundle, data: LabelledData, split: Split) -> str:
    """What the bundle's data fingerprint says about leakage: the seen split's promise is that the
    model never trained on a query, which only holds when it trained on the train side."""
    fp = bundle.data_fingerprint
    if not fp:
        return "unknown (no data fingerprint in the bundle)"
    if fp == data.subset(split.train).fingerprint():
        return f"exactly the {split.kind} split's train side"
    if fp == data.fingerprint():
        return "ALL of this data, queries included (the numbers are optimistic)"
    return "other data than this split's train side"


def _queries_and_index(split: Split) -> tuple[np.ndarray, np.ndarray, bool]:
    if split.kind == "seen":
        return split.test, split.train, False
    if split.kind == "unseen":
        return split.test, split.test, True
    raise ValueError(f"evaluation needs a seen or unseen split, not {split.kind!r}")


def evaluate_retrieval(
    model: str | Path,
    data_spec: str,
    split: str = "seen",
    baselines: list[str] | tuple[str, ...] | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    cache_path: str | Path | None = None,
    limit_per_class: int | None = None,
    seed: int = 0,
    data: LabelledData | None = None,
) -> RetrievalReport:
    """Evaluate the bundle at ``model`` and the ``baselines`` on ``data_spec`` under ``split``.

    ``data`` may pass an already loaded data set (it must have been loaded with the bundle's input spec);
    ``baselines`` defaults to :func:`default_baselines` for the bundle's modality, and a baseline that does
    not apply to the modality is reported in ``notes`` and skipped.
    """
    t_start = time.perf_counter()
    bundle = load_bundle(model)
    spec = bundle.input_spec
    if data is None:
        data = load_data(
            data_spec, spec, workers=workers, progress=progress, limit_per_class=limit_per_class, seed=seed
        )
    sp = make_split(data, split)
    q, b, loo = _queries_and_index(sp)
    yq, yb = data.y[q], data.y[b]
    notes: list[str] = []
    if data.skipped.total:
        notes.append(f"data: {data.skipped.summary()}")

    wanted = list(default_baselines(spec.modality) if baselines is None else baselines)
    applicable = FILE_BASELINES + IMAGE_BASELINES if spec.modality == "executable" else IMAGE_BASELINES
    for name in [w for w in wanted if w not in applicable]:
        notes.append(f"baseline {name!r} does not apply to {spec.modality} data; skipped")
    wanted = [w for w in wanted if w in applicable]

    def score(xq: np.ndarray, xb: np.ndarray) -> dict[str, Any]:
        return retrieval_metrics(xq, yq, xb, yb, exclude_self=loo)

    methods: list[MethodResult] = []

    # The model: every item embedded once, queries and index are rows of the same matrix.
    t0 = time.perf_counter()
    rows = np.unique(np.concatenate([q, b]))
    pos = np.searchsorted(rows, np.arange(len(data)))
    emb = Embedder(bundle, batch_size=256).embed_arrays(data.x[rows])
    t_embed = time.perf_counter() - t0
    m = score(emb[pos[q]], emb[pos[b]])
    methods.append(
        MethodResult(
            "model",
            m,
            time.perf_counter() - t0,
            [
                f"cosine of {emb.shape[1]}-d embeddings, eval mode, {bundle.model_config.norm.kind} norm",
                f"embedding {len(rows) / max(t_embed, 1e-9):.0f} items/s",
            ],
        )
    )

    file_kinds = [w for w in wanted if w in FILE_BASELINES]
    if file_kinds:
        with FeatureCache(cache_path) as cache:
            feats, stats = file_features(
                [data.names[i] for i in rows],
                [data.keys[i] for i in rows],
                file_kinds,
                cache=cache,
                workers=workers,
                progress=progress,
            )
        notes.append(_cache_note(stats, cache.path))
        for kind in file_kinds:
            values = feats[kind]
            fq = [values[pos[i]] for i in q]
            fb = [values[pos[i]] for i in b]
            methods.append(
                file_baseline_metrics(
                    kind, fq, fb, yq, yb, leave_one_out=loo, workers=workers, progress=progress
                )
            )
    if "pixels" in wanted:
        t0 = time.perf_counter()
        xp = pixel_vectors(data.x[rows])
        methods.append(
            MethodResult(
                "pixels",
                score(xp[pos[q]], xp[pos[b]]),
                time.perf_counter() - t0,
                [f"cosine of raw {spec.size}x{spec.size} inputs, not mean-centred"],
            )
        )

    return RetrievalReport(
        model=str(model),
        model_id=bundle.id,
        data=data_spec,
        split=sp.kind,
        queries=len(q),
        index=len(b),
        leave_one_out=loo,
        held_out=list(sp.held_out),
        trained_on=_trained_on(bundle, data, sp),
        methods=methods,
        notes=notes,
        seconds=time.perf_counter() - t_start,
    )


def _cache_note(stats: FeatureStats, path: Path) -> str:
    return (
        f"baseline features: {stats.cached} files from the cache, {stats.computed} computed, "
        f"{stats.seconds:.1f} s ({path})"
    )


def file_baseline_metrics(
    kind: str,
    fq: list[Any],
    fb: list[Any],
    yq: np.ndarray,
    yb: np.ndarray,
    *,
    leave_one_out: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> MethodResult:
    """One fuzzy-hash or histogram baseline from its per-file features (:func:`file_features` values
    for the queries ``fq`` and the index ``fb``), scored by the same metric code as the model."""
    t0 = time.perf_counter()
    loo = leave_one_out
    if kind == "bytehist":
        m = retrieval_metrics(sqrt_histograms(fq), yq, sqrt_histograms(fb), yb, exclude_self=loo)
        return MethodResult(kind, m, time.perf_counter() - t0, ["sqrt-normalised 256-bin histogram, cosine"])
    if kind == "tlsh":
        D = tlsh_distances(fq, fb)
        m = rank_metrics_from_distances(D, yq, yb, exclude_self=loo)
        nq, nb = sum(h == TNULL for h in fq), sum(h == TNULL for h in fb)
        return MethodResult(
            kind, m, time.perf_counter() - t0, [f"TNULL: {nq} queries, {nb} index items (ranked last)"]
        )
    if kind == "ssdeep":
        D, n_pairs = ssdeep_distances(fq, fb, workers=workers, progress=progress)
        m = rank_metrics_from_distances(D, yq, yb, exclude_self=loo)
        if loo:
            np.fill_diagonal(D, 100.0)  # after scoring: a query's match with itself is not a match
        zero = int((D >= 100).all(axis=1).sum())
        return MethodResult(
            kind,
            m,
            time.perf_counter() - t0,
            [f"distance 100 - score; {n_pairs} pairs compared; {zero} queries score 0 against everything"],
        )
    raise ValueError(f"unknown file baseline {kind!r}")
