"""Subcommands owned by the embedder library: `embed`, and the BN gate's `check` and `recalibrate`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from embedder import cli_bn, cli_embed

    cli_embed.register(app)
    cli_bn.register(app)
