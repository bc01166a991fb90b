"""`lookalike check` and `lookalike recalibrate`: the BN health gate and its repair, on bundles.

The sample is the bundle's calibration sample, or ``--data SPEC`` loaded by :mod:`embedder.dataspec`
(the same loader training uses) with labels matched to the bundle's by name.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer

from embedder.bn_gate import GateReport, GateThresholds, check_model
from embedder.bundle import BN_REPORT, MAX_CALIBRATION, Bundle, load_bundle, save_bundle, write_report
from embedder.errors import BundleError, LookalikeError
from embedder.precise_bn import NotEnoughData, recompute_bn_stats

CALIBRATION_SOURCE = "calibration sample"
EXIT_PASS, EXIT_FAIL, EXIT_UNUSABLE = 0, 1, 2


class _Unusable(Exception):
    """Input these commands cannot work with: exit status 2 with this message."""


# ------------------------------------------------------------------------------------------ samples


def _load(path: Path) -> Bundle:
    try:
        return load_bundle(path)
    except BundleError as exc:
        raise _Unusable(str(exc)) from exc


def _sample(bundle: Bundle, data: str | None, max_samples: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x, y, source)``: the bundle's calibration sample, or ``--data`` with labels mapped by name.

    Items whose label the bundle does not know get ``y = -1`` (kept for statistics, left out of accuracy).
    A sample larger than ``max_samples`` is subsampled with a fixed seed: precise statistics need a few
    thousand inputs, more only cost time.
    """
    if data is None:
        return bundle.calibration_x, bundle.calibration_y, CALIBRATION_SOURCE
    from embedder.dataspec import load_data

    try:
        loaded = load_data(data, bundle.input_spec, progress=False)
    except (LookalikeError, OSError, ValueError) as exc:
        raise _Unusable(f"--data {data}: {exc}") from exc
    index = {name: i for i, name in enumerate(bundle.labels)}
    y = np.array([index.get(loaded.labels[int(i)], -1) for i in loaded.y], dtype=np.int64)
    x = np.asarray(loaded.x)
    want = (bundle.input_spec.channels, bundle.input_spec.size, bundle.input_spec.size)
    if x.dtype != np.uint8 or x.shape[1:] != want:
        raise _Unusable(f"--data {data}: inputs are {x.dtype} {x.shape[1:]}, the bundle needs uint8 {want}")
    if len(x) > max_samples:
        keep = np.sort(np.random.default_rng(0).choice(len(x), size=max_samples, replace=False))
        x, y = x[keep], y[keep]
    return x, y, data


def _thresholds(pairs: Sequence[str]) -> GateThresholds:
    known = GateThresholds.__dataclass_fields__
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise typer.BadParameter(f"{pair!r}: use NAME=VALUE with NAME one of {', '.join(known)}")
        try:
            values[key] = int(value) if key == "min_samples" else float(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{pair!r}: {value!r} is not a number") from exc
    return GateThresholds(**values)


def _run_gate(
    bundle_id: str,
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    thresholds: GateThresholds,
    batch_size: int,
) -> GateReport:
    try:
        return check_model(model, x, y, thresholds=thresholds, batch_size=batch_size, model_id=bundle_id)
    except NotEnoughData as exc:
        raise _Unusable(str(exc)) from exc


def _fail(exc: Exception, as_json: bool) -> typer.Exit:
    if as_json:
        typer.echo(json.dumps({"error": "unusable_input", "message": str(exc)}))
    else:
        typer.echo(f"error: {exc}", err=True)
    return typer.Exit(EXIT_UNUSABLE)


# ------------------------------------------------------------------------------------------- output


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _print_report(report: GateReport, bundle: Bundle, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output (CI logs, files) gets a fixed width instead of 80 columns that truncate layer names.
    console = Console(width=None if sys.stdout.isatty() else 120)
    norm = report.norm
    mom = f", momentum {norm['momentum']}" if norm.get("momentum") is not None else ""
    console.print(f"bundle [bold]{bundle.path}[/] (id {bundle.id}), norm {norm['kind']}{mom}")
    console.print(f"sample: {source}, {report.n_samples} inputs")
    t = report.thresholds
    if report.layers:
        table = Table(
            title="BatchNorm layers: running vs precise population statistics",
            caption=(
                f"a layer fails when its p95 mean shift > {t.mean_shift_p95:g} "
                f"or its p95 |ln var ratio| > {t.log_var_ratio_p95:g}"
            ),
        )
        table.add_column("layer", no_wrap=True)
        for col in ("ch", "batches", "mean shift p95 / max", "|ln var ratio| p95 / max", "var ratio"):
            table.add_column(col, justify="right")
        table.add_column("")
        for lr in report.layers:
            status = "[red]AT INIT[/]" if lr.at_init else ("[red]FAIL[/]" if lr.failed else "[green]ok[/]")
            table.add_row(
                lr.name,
                str(lr.channels),
                "-" if lr.num_batches_tracked is None else str(lr.num_batches_tracked),
                f"{_fmt(lr.mean_shift_p95)} / {_fmt(lr.mean_shift_max)}",
                f"{_fmt(lr.log_var_ratio_p95)} / {_fmt(lr.log_var_ratio_max)}",
                _fmt(lr.var_ratio_median, ".3g") + "x",
                status,
            )
        console.print(table)
    f = report.functional
    if f is not None:
        console.print(
            f"embedding cosine, running vs precise statistics: mean {f.cosine_mean:.4f}, "
            f"min {f.cosine_min:.4f} (>= {t.min_cosine:g})"
        )
        if f.top1_agreement is not None:
            console.print(
                f"classifier top-1 agreement, running vs precise: {f.top1_agreement:.3f} "
                f"(>= {t.min_top1_agreement:g})"
            )
        if f.eval_accuracy is not None:
            console.print(
                f"accuracy on {f.labelled} labelled inputs: train mode {_fmt(f.train_accuracy)}, "
                f"eval mode {_fmt(f.eval_accuracy)}, eval with precise statistics "
                f"{_fmt(f.precise_accuracy)} (drop <= {t.max_accuracy_drop:g})"
            )
    colour = "green" if report.passed else "red"
    console.print(f"verdict: [bold {colour}]{report.verdict}[/]")
    for reason in report.reasons:
        console.print(f"  - {reason}", highlight=False)


def _report_dict(report: GateReport, path: Path | None, bundle_id: str, source: str) -> dict[str, Any]:
    d = report.to_dict()
    d["bundle"] = {"path": str(path), "id": bundle_id}
    d["source"] = source
    return d


# ----------------------------------------------------------------------------------------- commands

DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", help="Data spec (class DIR, CSV manifest, idx:DIR) instead of the calibration sample."
    ),
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size", min=2, help="Batch size of the train-mode pass (use the training batch size)."
    ),
]
MaxSamplesOpt = Annotated[
    int, typer.Option("--max-samples", min=1, help="Subsample --data to at most this many inputs.")
]
ThresholdOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--threshold", help="Override a gate threshold, NAME=VALUE (repeatable), e.g. min_cosine=0.9."
    ),
]


def check(
    bundle: Annotated[Path, typer.Argument(help="Model bundle directory.")],
    data: DataOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    batch_size: BatchOpt = 64,
    max_samples: MaxSamplesOpt = 4096,
    threshold: ThresholdOpt = None,
    write: Annotated[
        bool, typer.Option("--write-report", help=f"Also store the report as the bundle's {BN_REPORT}.")
    ] = False,
) -> None:
    """Run the BN health gate: can the bundle's stored BatchNorm statistics be trusted in inference?

    Exit status 0 converged (or no running statistics), 1 unconverged, 2 unusable input.  The bundle is
    not modified unless --write-report is given.
    """
    thresholds = _thresholds(threshold or [])
    try:
        b = _load(bundle)
        x, y, source = _sample(b, data, max_samples)
        report = _run_gate(b.id, b.model, x, y, thresholds=thresholds, batch_size=batch_size)
    except _Unusable as exc:
        raise _fail(exc, as_json) from exc
    d = _report_dict(report, b.path, b.id, source)
    if write:
        write_report(bundle, BN_REPORT, d)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
    else:
        _print_report(report, b, source)
    raise typer.Exit(EXIT_PASS if report.passed else EXIT_FAIL)


def _nested(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def recalibrate(
    bundle: Annotated[Path, typer.Argument(help="Model bundle directory (never modified).")],
    out: Annotated[Path, typer.Option("--out", help="Directory of the new bundle.")],
    data: DataOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    batch_size: BatchOpt = 64,
    max_samples: MaxSamplesOpt = 4096,
    threshold: ThresholdOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a new bundle whose BatchNorm running statistics are precise population statistics.

    The statistics are measured on the calibration sample (or --data), with the weights fixed; the new
    bundle records where they came from, gets a new id, and its gate report is written beside it.  With
    --data, up to 1024 of those inputs become the new bundle's calibration sample.  Exit status 0 when
    the new bundle passes the gate, 1 when it does not, 2 for unusable input.
    """
    thresholds = _thresholds(threshold or [])
    src, dst = Path(os.path.abspath(bundle)), Path(os.path.abspath(out))
    try:
        if _nested(dst, src) or _nested(src, dst):
            raise _Unusable(
                f"--out {out} would overwrite the input bundle {bundle}; choose another directory"
            )
        b = _load(bundle)
        x, y, source = _sample(b, data, max_samples)
        model = b.model
        try:
            recompute_bn_stats(model, x, batch_size=batch_size, min_samples=thresholds.min_samples)
        except NotEnoughData as exc:
            raise _Unusable(str(exc)) from exc
        provenance = dict(b.provenance)
        provenance["recalibrated_from"] = b.id
        provenance["recalibration"] = {"source": source, "samples": len(x), "estimator": "precise_bn"}
        cal_x, cal_y = (b.calibration_x, b.calibration_y) if data is None else (x, y)
        if len(cal_x) > MAX_CALIBRATION:
            keep = np.sort(np.random.default_rng(0).choice(len(cal_x), size=MAX_CALIBRATION, replace=False))
            cal_x, cal_y = cal_x[keep], cal_y[keep]
        # The generic part is the principal directions of the features these statistics produce: refit
        # on the sample the new bundle carries, as training fitted it on the one the old bundle carries.
        model.fit_generic_basis(torch.from_numpy(np.ascontiguousarray(cal_x)))
        try:
            new_id = save_bundle(
                out,
                model.eval(),
                b.input_spec,
                b.labels,
                cal_x,
                cal_y,
                data_fingerprint=b.data_fingerprint,
                provenance=provenance,
                metrics=b.metrics,
                overwrite=overwrite,
            )
        except BundleError as exc:
            raise _Unusable(str(exc)) from exc
        report = _run_gate(new_id, model, x, y, thresholds=thresholds, batch_size=batch_size)
    except _Unusable as exc:
        raise _fail(exc, as_json) from exc
    d = _report_dict(report, out, new_id, source)
    write_report(out, BN_REPORT, d)
    if as_json:
        typer.echo(json.dumps({"from": b.id, "to": new_id, "out": str(out), "source": source, "gate": d}))
    else:
        typer.echo(f"{b.id} -> {new_id}  ({out})")
        typer.echo(f"statistics from {source}: {len(x)} inputs; gate: {report.verdict}")
        for reason in report.reasons:
            typer.echo(f"  - {reason}")
    raise typer.Exit(EXIT_PASS if report.passed else EXIT_FAIL)


def register(app: typer.Typer) -> None:
    app.command("check")(check)
    app.command("recalibrate")(recalibrate)
