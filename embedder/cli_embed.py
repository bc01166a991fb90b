"""`lookalike embed BUNDLE FILE...`: one embedding per file; failures reported per file, never fatal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from embedder.errors import BundleError, InputError


def embed(
    bundle: Annotated[Path, typer.Argument(help="Model bundle directory (from `lookalike train`).")],
    files: Annotated[list[Path], typer.Argument(help="Executables or images to embed.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line instead of text.")
    ] = False,
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Embed files that are not executables as raw bytes instead of refusing."),
    ] = False,
) -> None:
    """Print the embedding of each FILE: sha256, detected format and the vector.

    Files that cannot be embedded are reported one per line with the reason; the others are still
    embedded. Exit status 1 if any file failed, 2 if the bundle is unusable.
    """
    from embedder.embed import Embedder

    try:
        embedder = Embedder.from_bundle(bundle)
    except BundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    failed = 0
    for path in files:
        try:
            prepared, vector = embedder.embed_file(path, allow_raw=raw)
        except (InputError, OSError) as exc:
            failed += 1
            code = getattr(exc, "code", "unreadable")
            if as_json:
                typer.echo(json.dumps({"file": str(path), "error": code, "message": str(exc)}))
            else:
                typer.echo(f"{path}\tERROR {code}: {exc}")
            continue
        if as_json:
            record = {
                "file": str(path),
                "sha256": prepared.sha256,
                "format": prepared.format,
                "model": embedder.model_id,
                "dim": embedder.dim,
                "embedding": [round(float(v), 7) for v in vector],
            }
            typer.echo(json.dumps(record))
        else:
            values = " ".join(f"{v:.5f}" for v in vector)
            typer.echo(f"{path}\t{prepared.sha256}\t{prepared.format}\t{values}")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
