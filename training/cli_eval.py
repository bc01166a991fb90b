"""`lookalike eval ...`: measure a model against the baselines on the evaluation protocol's splits.

* ``eval retrieval`` -- P@1, macro P@1, P@10, mAP and MRR@10 of the model and of each baseline on the very
  same queries and index, as a markdown table (``--out FILE.md`` also writes it) or JSON.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(help="Evaluate models against baselines.", no_args_is_help=True)


@eval_app.command("retrieval")
def retrieval(
    model: Annotated[Path, typer.Option("--model", help="Model bundle directory.")],
    data: Annotated[str, typer.Option("--data", help="SPEC: class directory, path,label CSV or idx:DIR.")],
    split: Annotated[
        str,
        typer.Option("--split", help="seen (test files query train files) or unseen (held-out families)."),
    ] = "seen",
    baselines: Annotated[
        str | None,
        typer.Option(
            "--baselines",
            help="Comma list of tlsh, ssdeep, bytehist, pixels, or 'none'. "
            "Default: tlsh,ssdeep,bytehist for executables, pixels for images.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of the markdown table.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the markdown table (with the command) here.")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Default: every CPU.")] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Baseline cache (SQLite). Default: $LOOKALIKE_BASELINE_CACHE or ~/.cache/lookalike.",
        ),
    ] = None,
    limit_per_class: Annotated[
        int | None, typer.Option("--limit-per-class", min=1, help="Keep at most this many items per class.")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Retrieval metrics of the model and the baselines on exactly the same queries and index.

    seen: queries are the test files of the sha256 rule (or Fashion-MNIST's test images), the index the
    train files. unseen: queries and index are the files of the held-out families, leave-one-out.
    Exit status 2 when the bundle, the data or the split is unusable.
    """
    from embedder.errors import LookalikeError
    from training.baselines import ALL_BASELINES, BaselineError
    from training.evaluate import evaluate_retrieval
    from training.splits import SplitError

    chosen: list[str] | None = None
    if baselines is not None:
        chosen = [b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"]
        unknown = [b for b in chosen if b not in ALL_BASELINES]
        if unknown:
            typer.echo(
                f"error: unknown baseline(s) {unknown}; choose from {', '.join(ALL_BASELINES)}", err=True
            )
            raise typer.Exit(2)
    try:
        report = evaluate_retrieval(
            model,
            data,
            split,
            chosen,
            workers=workers,
            progress=progress,
            cache_path=cache,
            limit_per_class=limit_per_class,
        )
    except (LookalikeError, SplitError, BaselineError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    table = report.to_markdown()
    if out is not None:
        command = "lookalike " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"```\n{command}\n```\n\n{table}\nwall time {report.seconds:.1f} s\n")
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(table)
        typer.echo(f"wall time {report.seconds:.1f} s")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
