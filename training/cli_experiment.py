"""`lookalike experiment ...`: the research experiments the project reproduces.

To add an experiment: write one function decorated with ``@experiment_app.command("name")`` -- in this
file, or in its own module whose import you add to :func:`register` (one line). Nothing else changes.

* ``experiment balanced-batches`` -- Hajaj & Gillies: random vs balanced training batches, standard vs
  batch-statistics inference, and the circulation probe (:mod:`training.balanced`).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

experiment_app = typer.Typer(help="Reproduce the research experiments.", no_args_is_help=True)


def _command_line() -> str:
    return "lookalike " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@experiment_app.command("balanced-batches")
def balanced_batches(
    data: Annotated[
        str, typer.Option("--data", help="idx:DIR with train and test parts.")
    ] = "idx:/usr/share/datasets/fashion-mnist",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs of each of the two trainings.")] = 5,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop each training after this many steps.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=2, help="Random-batch size. Default: the number of classes."),
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak learning rate (default: the loop's).")
    ] = None,
    norm: Annotated[str, typer.Option("--norm", help="moving or cumulative BatchNorm.")] = "moving",
    momentum: Annotated[float, typer.Option("--momentum", help="BN momentum (PyTorch convention).")] = 0.1,
    augment: Annotated[
        bool | None, typer.Option("--augment/--no-augment", help="Flip + crop (default: the loop's).")
    ] = None,
    passes: Annotated[int, typer.Option("--passes", min=0, help="Reshuffled balanced passes.")] = 10,
    probe_mates: Annotated[
        int, typer.Option("--probe-mates", min=1, help="Batch-mate sets in the circulation probe.")
    ] = 20,
    limit_per_class: Annotated[
        int | None, typer.Option("--limit-per-class", min=2, help="At most this many images per class.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch threads (batches of 10 gain little from more).")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of markdown.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the markdown report here.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train on Fashion-MNIST with random and with balanced batches; compare standard inference with
    balanced test batches normalised by their own statistics; run the circulation probe.

    Balanced test batches are composed with the test labels (the paper's protocol): the numbers say what
    batch statistics can do, not what a deployed model could. Defaults finish well inside 45 minutes
    on 2 cores.
    """
    from embedder.errors import LookalikeError
    from training.balanced import BalancedConfig, run_balanced_experiment
    from training.loop import TrainingError

    if norm not in ("moving", "cumulative"):
        typer.echo("error: --norm must be moving or cumulative (the experiment is about BatchNorm)", err=True)
        raise typer.Exit(2)
    cfg = BalancedConfig(
        data=data,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        norm=norm,
        momentum=momentum,
        augment=augment,
        seed=seed,
        passes=passes,
        probe_mates=probe_mates,
        limit_per_class=limit_per_class,
        threads=threads,
    )
    try:
        report = run_balanced_experiment(cfg, progress=progress, log=lambda msg: typer.echo(msg, err=True))
    except (LookalikeError, TrainingError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    text = report.to_markdown()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"```\n{_command_line()}\n```\n\n{text}")
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(text)


def register(app: typer.Typer) -> None:
    # One import line per experiment module that registers commands on experiment_app goes here.
    from training import cli_small_data  # noqa: F401  (registers small-data-bn)

    app.add_typer(experiment_app, name="experiment")
