"""Placeholder: its owner replaces this file."""

import typer


def register(app: typer.Typer) -> None:
    return None
