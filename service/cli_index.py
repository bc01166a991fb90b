"""`lookalike index` (the batch job) and `lookalike search` (nearest neighbours from the shell)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

BUNDLES_FILE = "bundles.json"  # collection -> bundle path, so `search` finds the model that indexed it


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _record_bundle(store: Path, collection: str, bundle: Path, model_id: str) -> None:
    path = store / BUNDLES_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    known[collection] = {"path": str(bundle.resolve()), "model": model_id}
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".bundles.")
    with os.fdopen(fd, "w") as f:
        json.dump(known, f, indent=2)
    os.replace(tmp, path)


def index(
    store: Annotated[Path, typer.Option(help="Vector store directory (created if missing).")],
    collection: Annotated[
        str, typer.Option(help="Collection name; created pinned to the model on first use.")
    ],
    model: Annotated[Path, typer.Option(help="Model bundle; must pass the BN gate.")],
    data: Annotated[str, typer.Option(help="Files to index: a directory of class sub-directories or a CSV.")],
    index_kind: Annotated[
        str | None,
        typer.Option("--index", help="New collections: flat (default), hnsw, ivf or a FAISS factory string."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Preprocessing processes (default: all cores).")] = None,
    chunk_size: Annotated[int, typer.Option(help="Files per embedding batch and per transaction.")] = 64,
    raw: Annotated[
        bool, typer.Option("--raw", help="Index non-executables as raw bytes instead of refusing them.")
    ] = False,
    rejects: Annotated[
        Path | None, typer.Option(help="Where to list rejected files (default: in the store).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Embed every file of DATA into a collection; files already there (same sha256) are skipped.

    Interrupted runs resume: rerun the same command. Exit 0 when done (rejected files are listed, not
    fatal), 1 if the model fails the BN gate, 2 for unusable arguments or a model that is not the
    collection's own.
    """
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from embedder.bn_gate import check_model
    from embedder.bundle import load_bundle
    from embedder.dataspec import SpecError, list_files, parse_spec
    from embedder.embed import Embedder
    from embedder.errors import BundleError, InputError
    from embedder.fold import fold_batchnorm
    from service.indexer import index_files
    from service.runtime import gate_explanation
    from service.store import Store, StoreError

    console = Console(stderr=True)
    try:
        bundle = load_bundle(model)
        spec = parse_spec(data)
        if spec.kind == "idx":
            raise _fail(
                "idx: specs are for training and evaluation; index image files from a directory or CSV"
            )
        files = list_files(spec)
    except (BundleError, SpecError) as exc:
        raise _fail(str(exc)) from exc
    try:
        gate = check_model(bundle.model, bundle.calibration_x, bundle.calibration_y, model_id=bundle.id)
    except InputError as exc:  # e.g. a calibration sample too small to check
        raise _fail(f"{model}: {exc}") from exc
    report = gate.to_dict()
    if not report["passed"]:
        raise _fail(gate_explanation(collection, str(model), bundle.id, report), 1)
    embedder = Embedder(bundle, model=fold_batchnorm(bundle.model))
    try:
        store.mkdir(parents=True, exist_ok=True)
        coll = Store(store).open_or_create(collection, bundle.id, embedder.dim, index_kind=index_kind)
    except (StoreError, OSError) as exc:
        raise _fail(str(exc)) from exc
    _record_bundle(store, collection, model, bundle.id)

    bar = tqdm(
        total=len(files), unit="file", desc=f"indexing {collection}", disable=not progress, file=sys.stderr
    )
    started, read_bytes = time.perf_counter(), 0

    def on_progress(n: int, nbytes: int) -> None:
        nonlocal read_bytes
        read_bytes += nbytes
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.update(n)
        bar.set_postfix_str(f"{read_bytes / elapsed / 1e6:.1f} MB/s")

    try:
        result = index_files(
            coll,
            embedder,
            files,
            workers=workers,
            chunk_size=chunk_size,
            allow_raw=raw,
            on_progress=on_progress,
        )
    except KeyboardInterrupt:
        bar.close()
        coll.close()
        console.print("interrupted: everything committed so far is kept; rerun the same command to resume")
        raise typer.Exit(130) from None
    finally:
        bar.close()
    coll.close()

    table = Table(
        title=f"{collection}: {result.files} files, {result.bytes_read / 1e6:.1f} MB in {result.wall_s:.1f} s"
    )
    table.add_column("outcome")
    table.add_column("files", justify="right")
    for outcome, n in sorted(result.outcomes.items(), key=lambda kv: -kv[1]):
        if n:
            table.add_row(outcome, str(n))
    console.print(table)
    busy = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    console.print(
        f"time: {busy} (read, preprocess: summed over workers); {result.files / result.wall_s:.1f} files/s, "
        f"{result.bytes_read / result.wall_s / 1e6:.1f} MB/s"
    )
    if result.rejected:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        out = rejects or store / f"rejected-{collection}-{stamp}.tsv"
        with out.open("w") as f:
            f.write("path\tcode\tmessage\n")
            for path, code, message in result.rejected:
                f.write(f"{path}\t{code}\t{message}\n")
        console.print(f"{len(result.rejected)} rejected files listed in {out}")


def search(
    store: Annotated[Path, typer.Option(help="Vector store directory.")],
    collection: Annotated[str, typer.Option(help="Collection to search.")],
    file: Annotated[Path, typer.Argument(help="The executable or image to find look-alikes of.")],
    k: Annotated[int, typer.Option(help="Number of neighbours.")] = 10,
    model: Annotated[
        Path | None, typer.Option(help="Model bundle (default: the one that indexed the collection).")
    ] = None,
    label: Annotated[str | None, typer.Option(help="Only return items with this label.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """The k items of a collection most similar to FILE (cosine similarity of embeddings)."""
    from rich.console import Console
    from rich.table import Table

    from embedder.embed import Embedder
    from embedder.errors import BundleError, InputError
    from service.store import Store, StoreError

    try:
        coll = Store(store).open_collection(collection)
    except StoreError as exc:
        raise _fail(str(exc)) from exc
    if model is None:
        known = json.loads((store / BUNDLES_FILE).read_text()) if (store / BUNDLES_FILE).exists() else {}
        if collection not in known:
            raise _fail(f"no bundle recorded for {collection!r}; pass --model")
        model = Path(known[collection]["path"])
    try:
        embedder = Embedder.from_bundle(model)
    except BundleError as exc:
        raise _fail(str(exc)) from exc
    if embedder.model_id != coll.model_id:
        raise _fail(f"{model} is model {embedder.model_id}; collection {collection!r} holds {coll.model_id}")
    try:
        prepared, vector = embedder.embed_file(file)
    except (InputError, OSError) as exc:
        raise _fail(f"{file}: {exc}", 1) from exc
    started = time.perf_counter()
    hits = coll.search(vector[None], k, label=label)[0]
    took = (time.perf_counter() - started) * 1000
    results = [
        {"id": h.id, "score": round(h.score, 6), "sha256": h.sha256, "name": h.name, "label": h.label}
        for h in hits
    ]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": coll.model_id,
                    "query": prepared.sha256,
                    "took_ms": round(took, 3),
                    "results": results,
                }
            )
        )
        return
    table = Table(title=f"{file} ({prepared.format}) in {collection}")
    for col in ("id", "score", "label", "name", "sha256"):
        table.add_column(col)
    for r in results:
        table.add_row(str(r["id"]), f"{r['score']:.4f}", r["label"] or "", r["name"] or "", r["sha256"][:16])
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("search")(search)
