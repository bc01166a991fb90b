"""Subcommands owned by training: `dataset`, `train`, `eval`, `experiment`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from training import cli_dataset, cli_eval, cli_experiment, cli_train

    cli_dataset.register(app)
    cli_train.register(app)
    cli_eval.register(app)
    cli_experiment.register(app)
