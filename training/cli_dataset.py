"""`lookalike dataset ...`: build and inspect data sets.

* ``dataset debian`` -- a manifest of this machine's ELF/PE files labelled by Debian source package;
* ``dataset show`` -- load a SPEC as training would and print its classes and skipped files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

dataset_app = typer.Typer(help="Build and inspect data sets.", no_args_is_help=True)


@dataset_app.command("debian")
def debian(
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write (path,label,sha256,size).")],
    root: Annotated[
        list[Path] | None,
        typer.Option(
            "--root", help="Directory to scan; repeatable. Default: /usr/bin /usr/sbin /usr/lib /usr/libexec."
        ),
    ] = None,
    min_family: Annotated[
        int, typer.Option("--min-family", min=1, help="Drop families with fewer files.")
    ] = 8,
    max_mb: Annotated[
        int, typer.Option("--max-mb", min=1, help="Drop files larger than this (training refuses them).")
    ] = 64,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Label every ELF/PE file under the roots by its Debian source package and write a manifest.

    Exact duplicates (sha256) keep the first path in sorted order; families with fewer than
    --min-family files are dropped. Use the manifest as `--data manifest.csv`.
    """
    from training.debian import DEFAULT_ROOTS, DebianError, build_manifest, write_manifest

    console = Console()
    roots = root or [r for r in DEFAULT_ROOTS if r.exists()]
    missing = [r for r in roots if not r.exists()]
    if missing:
        console.print(f"[red]error:[/] no such root: {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    try:
        manifest = build_manifest(roots, min_family, progress, max_bytes=max_mb * 1024 * 1024)
    except DebianError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    write_manifest(manifest, out)

    families = manifest.families()
    table = Table(title=f"Families (min {min_family} files)")
    table.add_column("family")
    table.add_column("files", justify="right")
    table.add_column("MB", justify="right")
    for name, files, size in families:
        table.add_row(name, str(files), f"{size / 1e6:.1f}")
    console.print(table)

    d = manifest.dropped
    summary = Table(title="Summary", show_header=False)
    summary.add_column("what")
    summary.add_column("files", justify="right")
    summary.add_row("ELF/PE files found (by magic)", str(manifest.found))
    summary.add_row("unknown to dpkg", str(d["unknown_to_dpkg"]))
    summary.add_row("not a parsable executable", str(d["not_an_executable"]))
    summary.add_row(f"larger than {max_mb} MB", str(d["too_large"]))
    summary.add_row("unreadable", str(d["unreadable"]))
    summary.add_row("exact duplicates (sha256)", str(d["duplicate"]))
    summary.add_row(f"in {manifest.small_families} families under {min_family} files", str(d["small_family"]))
    summary.add_row(f"kept, in {len(families)} families", str(len(manifest.rows)))
    console.print(summary)
    console.print(f"wrote {out} in {manifest.seconds:.1f} s")


@dataset_app.command("show")
def show(
    data: Annotated[
        str, typer.Argument(help="SPEC: class directory, path,label CSV, or idx:DIR[:train|:test].")
    ],
    modality: Annotated[str, typer.Option("--modality", help="executable or image.")] = "executable",
    limit_per_class: Annotated[int | None, typer.Option("--limit-per-class", min=1)] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Default: every CPU.")] = None,
) -> None:
    """Load SPEC exactly as training would and print class sizes, skip reasons and the fingerprint."""
    from embedder.dataspec import SpecError, load_data
    from embedder.inputs import InputSpec

    console = Console()
    try:
        spec = InputSpec.for_modality(modality)  # type: ignore[arg-type]
        ds = load_data(data, spec, workers=workers, limit_per_class=limit_per_class)
    except (SpecError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    table = Table(title=f"{data}: {len(ds.keys)} items, {len(ds.labels)} classes")
    table.add_column("class")
    table.add_column("items", justify="right")
    for name, n in sorted(ds.class_counts().items(), key=lambda t: (-t[1], t[0])):
        table.add_row(name, str(n))
    console.print(table)
    console.print(f"input {tuple(ds.x.shape[1:])} uint8, fingerprint {ds.fingerprint()}")
    if ds.skipped.counts:
        console.print(ds.skipped.summary())


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
