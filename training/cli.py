"""Subcommands owned by training: `dataset`, `train`, `eval`, `experiment`."""

from __future__ import annotations

import typer


def _load_spec(text: str, spec: object) -> object:
    from training.specs import load_data

    return load_data(text, spec, progress=False)  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    from embedder.cli_bn import set_data_loader
    from training import cli_dataset, cli_eval, cli_experiment, cli_train

    # `check`/`recalibrate --data SPEC` live in embedder, which must not import training: the composition
    # root hands them training's data-spec loader.
    set_data_loader(_load_spec)

    cli_dataset.register(app)
    cli_train.register(app)
    cli_eval.register(app)
    cli_experiment.register(app)
