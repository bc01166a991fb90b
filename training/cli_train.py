"""`lookalike train`: labelled files in, a model bundle out, with the BatchNorm gap reported per epoch.

Order of work, cheapest checks first: usage (``--out`` exists, conflicting flags, bad values) is refused
before any data is read; then the data spec is parsed and loaded with exactly the input spec that
``--modality`` / ``--size`` / ``--representation`` define (so an image directory given as executables
yields no usable files and an error, never a silently mixed data set); then the split; then training.

Exit status: 0 success, 1 training failed (diverged), 2 bad usage or unusable data.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# bigram, not InputSpec's nataraj default: on the Debian seen split (docs/training.md) bigram reaches
# P@1 0.88 / mAP 0.86 where nataraj reaches 0.67 / 0.64 with everything else equal (a byte histogram
# alone gets P@1 0.81). The choice is recorded in the bundle, so serving follows it.
EXECUTABLE_REPRESENTATION = "bigram"
SHOW_SKIPPED = 10


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def train_command(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="SPEC: a directory with one sub-directory per class, a CSV manifest (path,label), "
            "or idx:DIR[:train|:test] for MNIST-format files.",
        ),
    ],
    modality: Annotated[
        str,
        typer.Option(
            "--modality",
            help="executable or image. Decides the preprocessing; files of the other kind are skipped.",
        ),
    ],
    norm: Annotated[
        str,
        typer.Option(
            "--norm",
            help="Normalisation: none, moving (BN with an exponential moving average), cumulative (BN "
            "with an equal-weight average of all batches) or group (GroupNorm, no running statistics).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write (refused if it exists).")],
    momentum: Annotated[
        float,
        typer.Option(
            "--momentum",
            help="BN momentum for --norm moving, PyTorch convention: new = (1-m)*old + m*batch "
            "(Keras 0.99 is 0.01).",
        ),
    ] = 0.1,
    reset_each_epoch: Annotated[
        bool,
        typer.Option(
            "--reset-each-epoch",
            help="--norm cumulative only: reset the running statistics at each epoch start, so the "
            "final ones average the last epoch.",
        ),
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs", min=1, help="Passes over the training data. Default: 15 images, 30 executables."
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            "--max-steps", min=1, help="Stop after this many optimiser steps (instead of --epochs)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=2,
            help="Items per step with --sampler random. Default: 128 images, 64 executables.",
        ),
    ] = None,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="random (shuffled batches) or balanced (every batch holds --k-per-class items of every "
            "class; the batch size is then k x classes).",
        ),
    ] = "random",
    k_per_class: Annotated[
        int, typer.Option("--k-per-class", min=1, help="Items per class per batch with --sampler balanced.")
    ] = 1,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="seen (30% of files by sha256 are held out; IDX: the natural test set), unseen (a quarter "
            "of the families held out entirely) or none (train on everything, no held-out numbers).",
        ),
    ] = "seen",
    seed: Annotated[int, typer.Option("--seed", help="Seed of weights, batches, augmentation, sample.")] = 0,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate of the one-cycle schedule (AdamW). Default: 3e-3."),
    ] = None,
    embed_dim: Annotated[int, typer.Option("--embed-dim", min=2, help="Embedding dimension.")] = 128,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            min=8,
            max=512,
            help="Input size S (SxS). Default: 28 images, 256 executables "
            "(the full byte-pair table, no pooling).",
        ),
    ] = None,
    representation: Annotated[
        str | None,
        typer.Option(
            "--representation",
            help="Executables: bigram (byte-pair frequencies, default: far better retrieval on the Debian "
            "families) or nataraj (the bytes laid out as an image).",
        ),
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            help="How the last feature map becomes the embedding: flatten (keeps positions; default for "
            "bigram inputs, where a position is a byte pair) or avg (global average pooling; default "
            "otherwise).",
        ),
    ] = None,
    generic_dim: Annotated[
        int | None,
        typer.Option(
            "--generic-dim",
            min=0,
            help="Principal components of the convolutional features appended to the trained embedding "
            "(0: none); they keep unseen families apart. Default: 128 executables, 0 images.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Processes preprocessing files. Default: every CPU."),
    ] = None,
    limit_per_class: Annotated[
        int | None,
        typer.Option("--limit-per-class", min=1, help="Keep at most this many items per class (quick runs)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Torch compute threads. Default: every core.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train an embedding model on labelled files and write a bundle the service can load.

    Every epoch prints the loss, the accuracy on the same fixed training items in train mode (batch
    statistics) and in eval mode (stored running statistics) -- they diverge when the BatchNorm
    statistics are wrong -- the held-out accuracy and the held-out retrieval P@1 / mAP. The bundle gets
    the calibration sample, metrics.json and curves.png. Exit status: 0 ok, 1 training failed, 2 bad
    usage or data.
    """
    t_start = time.perf_counter()
    command = "lookalike " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if out.exists() and not overwrite:
        raise _fail(f"--out {out} already exists; choose another directory or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise _fail(f"--out {out} exists and is not a directory; refusing to replace it")
    if epochs is not None and max_steps is not None:
        raise _fail("give --epochs or --max-steps, not both")
    if representation is not None and modality == "image":
        raise _fail("--representation applies to executables only")
    if representation is None and modality == "executable":
        representation = EXECUTABLE_REPRESENTATION

    from rich.console import Console

    from embedder.dataspec import SpecError, load_data, parse_spec
    from embedder.errors import BundleError, LookalikeError
    from training.loop import TrainConfig, TrainingError, save_trained_bundle, train
    from training.splits import SplitError, make_split

    console = Console(highlight=False)
    try:
        cfg = TrainConfig(
            modality=modality,
            norm=norm,
            momentum=momentum,
            reset_each_epoch=reset_each_epoch,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            sampler=sampler,
            k_per_class=k_per_class,
            split=split,
            seed=seed,
            lr=lr,
            embed_dim=embed_dim,
            size=size,
            representation=representation,
            head=head,
            generic_dim=generic_dim,
            threads=threads,
        ).resolved()
        if split not in ("seen", "unseen", "none"):
            raise ValueError(f"--split must be seen, unseen or none, not {split!r}")
    except ValueError as exc:
        raise _fail(str(exc)) from exc

    try:
        spec = parse_spec(data)
        t0 = time.perf_counter()
        loaded = load_data(
            spec,
            cfg.input_spec(),
            workers=workers,
            progress=progress,
            limit_per_class=limit_per_class,
            seed=seed,
        )
        t_load = time.perf_counter() - t0
        parts = make_split(loaded, split)
    except (SpecError, SplitError, LookalikeError, OSError) as exc:
        raise _fail(str(exc)) from exc

    console.print(
        f"data {spec}: {len(loaded)} {modality} inputs in {len(loaded.labels)} classes "
        f"({t_load:.1f}s); split {parts.kind}: {len(parts.train)} train, {len(parts.test)} test"
        + (f"; held-out families: {', '.join(parts.held_out)}" if parts.held_out else "")
    )
    if loaded.skipped.total:
        console.print(f"[yellow]{loaded.skipped.summary()}[/]")
        for name, code, message in loaded.skipped.items[:SHOW_SKIPPED]:
            console.print(f"  skipped {name}: {code}: {message}")
        if loaded.skipped.total > SHOW_SKIPPED:
            console.print(f"  ... and {loaded.skipped.total - SHOW_SKIPPED} more")

    try:
        result = train(loaded, parts, cfg, progress=progress, log=console.print)
    except TrainingError as exc:
        raise _fail(str(exc), EXIT_FAILED) from exc

    provenance = {
        "data": str(spec),
        "data_items": len(loaded),
        "skipped": dict(loaded.skipped.counts),
        "split": {"kind": parts.kind, "train": len(parts.train), "test": len(parts.test)},
        "held_out_families": parts.held_out,
    }
    try:
        bundle_id = save_trained_bundle(
            out, result, loaded, parts, provenance=provenance, overwrite=overwrite
        )
    except BundleError as exc:
        raise _fail(str(exc)) from exc

    _write_reports(out, result, command, t_load, time.perf_counter() - t_start)
    _print_summary(console, result.metrics, out, bundle_id, time.perf_counter() - t_start)


def _write_reports(out: Path, result: Any, command: str, t_load: float, t_total: float) -> None:
    """metrics.json with the wall times, and curves.png; neither is part of the bundle id."""
    from embedder.bundle import METRICS, write_report
    from training.plot import plot_curves

    metrics = result.metrics_json()
    metrics["command"] = command
    metrics["final"] = {**metrics["final"], "seconds_load": t_load, "seconds_wall": t_total}
    write_report(out, METRICS, metrics)
    cfg = result.config
    title = f"{cfg.modality}, norm {cfg.norm}" + (f" m={cfg.momentum:g}" if cfg.norm == "moving" else "")
    plot_curves(result.history, out / "curves.png", title=f"{title}, split {cfg.split}, seed {cfg.seed}")


def _print_summary(console: Any, m: dict[str, Any], out: Path, bundle_id: str, t_total: float) -> None:
    from rich.table import Table

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    r = m.get("retrieval") or {}
    table = Table(title=f"bundle {bundle_id}  ({out})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("train-mode accuracy (fixed training items)", f(m["train_mode_acc"])),
        ("eval-mode accuracy (same items)", f(m["eval_mode_acc"])),
        ("held-out accuracy", f(m["heldout_acc"]) + f"  (n={m['heldout_n']})"),
        ("retrieval P@1", f(r.get("P@1"))),
        ("retrieval macro P@1", f(r.get("macro_P@1"))),
        ("retrieval P@10", f(r.get("P@10"))),
        ("retrieval mAP", f(r.get("mAP"))),
        ("retrieval MRR@10", f(r.get("MRR@10"))),
        ("queries x index", f"{r.get('queries', '-')} x {r.get('index', '-')}" if r else "-"),
        ("epochs / steps", f"{m['epochs']} / {m['steps']}"),
        (
            "train / final eval / wall seconds",
            f"{m['seconds_train']:.0f} / {m['seconds_final_eval']:.0f} / {t_total:.0f}",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"bundle id {bundle_id}; metrics.json and curves.png in {out}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
