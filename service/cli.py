"""Subcommands owned by the service: `index`, `search`, `serve`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from service import cli_index, cli_serve

    cli_index.register(app)
    cli_serve.register(app)
