"""`lookalike serve`: gate every configured model, then serve the REST API with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer


def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML settings file (else $LOOKALIKE_CONFIG, env, defaults)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind; default 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="Port; default 8000.")] = None,
) -> None:
    """Serve POST /embed and /search for the configured collections.

    Every collection's model must pass the BN health gate; an unconverged model stops the start with
    the layers and numbers that failed (exit 1). Configuration problems exit 2.
    """
    import uvicorn
    from pydantic import ValidationError

    from embedder.errors import BundleError, InputError
    from service.api.app import create_app
    from service.config import load_settings
    from service.runtime import GateRefused, Runtime
    from service.store import StoreError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config, host=host, port=port)
    except (FileNotFoundError, ValidationError, ValueError) as exc:
        typer.echo(f"error: configuration: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not settings.collections:
        typer.echo(
            "error: no collections configured; add [collections.NAME] model = BUNDLE to the config", err=True
        )
        raise typer.Exit(2)
    if not settings.api_keys:
        typer.echo("warning: no API keys configured: every write will be refused", err=True)
    runtime = Runtime(settings)
    try:
        runtime.load()
    except GateRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except (BundleError, InputError, StoreError, OSError) as exc:  # InputError: calibration too small
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    # httptools and uvloop (C) instead of h11 and the pure-Python loop measured ~0.2 ms less per /search, and
    # the access log line ~0.1 ms more (docs/benchmarks.md); requests are counted in /metrics instead.
    uvicorn.run(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="info",
    )


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
