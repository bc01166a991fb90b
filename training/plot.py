"""PNG curves of a training run: the BatchNorm gap (train-mode vs eval-mode accuracy on the same training
items), held-out accuracy, and the loss and retrieval numbers per epoch.

Drawn with matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, so it is safe
in a headless server and in a process where someone else uses matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _series(history: Sequence[dict[str, Any]], key: str, sub: str | None = None) -> list[float]:
    out = []
    for row in history:
        v = row.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        out.append(float("nan") if v is None else float(v))
    return out


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """Write the curves of ``history`` (the training loop's per-epoch rows) to a PNG at ``path``."""
    path = Path(path)
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    left.plot(epochs, _series(history, "train_mode_acc"), "o-", label="train mode (batch statistics)")
    left.plot(epochs, _series(history, "eval_mode_acc"), "s-", label="eval mode (running statistics)")
    left.plot(epochs, _series(history, "heldout_acc"), "^--", label="held-out, eval mode")
    left.set_title("accuracy: same training items, two BN modes")
    left.set_xlabel("epoch")
    left.set_ylabel("accuracy")
    left.set_ylim(0.0, 1.02)
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)

    right.plot(epochs, _series(history, "loss"), "o-", color="tab:gray", label="training loss")
    right.set_xlabel("epoch")
    right.set_ylabel("loss")
    right.grid(alpha=0.3)
    ret = right.twinx()
    ret.plot(epochs, _series(history, "retrieval", "P@1"), "s-", color="tab:green", label="held-out P@1")
    ret.plot(epochs, _series(history, "retrieval", "mAP"), "^-", color="tab:purple", label="held-out mAP")
    ret.set_ylim(0.0, 1.02)
    ret.set_ylabel("retrieval")
    lines = right.get_lines() + ret.get_lines()
    right.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    right.set_title("loss and retrieval")

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(epochs) == 1:  # a single point still needs a readable axis
        for ax in (left, right):
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
