"""The `lookalike` console script: it only dispatches; each package registers its own subcommands."""

from __future__ import annotations

import os

# Before anything imports torch: libgomp's threads otherwise spin at every barrier, and on a machine
# whose cores are shared (parser workers, other jobs) a spinning thread burns the time slice its partner
# needs (one training step: 4.3 s spinning vs 0.17 s passive under load; docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

from embedder.cli import register as register_embedder
from service.cli import register as register_service
from training.cli import register as register_training

app = typer.Typer(
    name="lookalike",
    help="Find look-alike executables and images: train, check, index, search, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from embedder.bundle import lookalike_version

        typer.echo(f"lookalike {lookalike_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Find look-alike executables and images: train, check, index, search, serve."""


register_embedder(app)
register_training(app)
register_service(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
