"""Subcommands owned by the service: `index`, `search`, `serve`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from service import cli_serve

    cli_serve.register(app)
