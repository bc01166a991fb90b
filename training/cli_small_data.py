"""`lookalike experiment small-data-bn`: the BatchNorm failure on small data, variant by variant."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from training.cli_experiment import experiment_app

BEGIN, END = "<!-- small-data-bn:{}:begin -->", "<!-- small-data-bn:{}:end -->"


def _update_docs(path: Path, modality: str, text: str) -> None:
    """Replace this modality's marked section of ``path`` (appended when absent)."""
    begin, end = BEGIN.format(modality), END.format(modality)
    old = path.read_text() if path.exists() else "# Experiments\n"
    block = f"{begin}\n{text}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


@experiment_app.command("small-data-bn")
def small_data_bn(
    modality: Annotated[str, typer.Option(help="executable (Debian families) or image (Fashion-MNIST).")] = (
        "executable"
    ),
    data: Annotated[
        str | None,
        typer.Option(
            help="executable: a Debian manifest CSV (default: built and cached); image: an IDX dir."
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated families/classes (default: coreutils,util-linux,systemd / "
            "T-shirt/top,Trouser,Bag)."
        ),
    ] = None,
    per_class: Annotated[int, typer.Option(help="Files or images per class.")] = 110,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs: few, so the statistics see few batches (default 4 executables, 2 images)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate: high, so the weights move fast.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of data selection and training.")] = 0,
    docs: Annotated[
        Path | None, typer.Option(help="Also write the table into this markdown file (a marked section).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Train moving 0.01 (Keras 0.99), moving 0.1, cumulative and none on a few hundred files of three
    classes in a few dozen steps; measure train-mode vs eval-mode accuracy on their own training files,
    held-out accuracy and the BN gate's verdict; then repair the moving 0.01 model with precise
    statistics and measure it again."""
    from training import small_data

    started = time.perf_counter()
    # Measured defaults: the fewest epochs at which the Keras-like EMA is still far from converged while
    # the weights already classify well (docs/experiments.md); 3 Fashion classes are learnt faster.
    epochs = epochs or (4 if modality == "executable" else 2)
    if modality == "executable":
        names = tuple(classes.split(",")) if classes else small_data.DEFAULT_FAMILIES
        dataset = small_data.executable_data(names, per_class, Path(data) if data else None, seed)
    elif modality == "image":
        names = tuple(classes.split(",")) if classes else small_data.DEFAULT_CLASSES
        directory = Path(data.removeprefix("idx:") if data else "/usr/share/datasets/fashion-mnist")
        dataset = small_data.image_data(directory, names, per_class, seed)
    else:
        raise typer.BadParameter("modality must be executable or image")
    typer.echo(f"{len(dataset)} items of {', '.join(names)}", err=True)
    rows = small_data.run(
        dataset,
        modality=modality,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log=lambda line: typer.echo(line, err=True),
    )
    wall = time.perf_counter() - started
    command = "lookalike " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if as_json:
        typer.echo(
            json.dumps({"command": command, "seconds": round(wall, 1), "rows": [asdict(r) for r in rows]})
        )
    else:
        title = (
            f"{modality}: {len(dataset)} items, {epochs} epochs of batch {batch_size}, {rows[0].steps} steps"
        )
        typer.echo(small_data.markdown(rows, title))
    if docs is not None:
        text = small_data.markdown(rows, f"{modality}, {len(dataset)} items of {', '.join(names)}")
        _update_docs(
            docs, modality, f"{text}\n\n`{command}` ({rows[0].steps} steps per training, {wall:.0f} s wall)"
        )
