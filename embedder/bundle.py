"""Model bundles: a directory a model travels in, loaded without ever unpickling.

```
BUNDLE/
  weights.safetensors   tensors only (safetensors: no code, no pickle)
  config.json           architecture, normalisation, input spec, labels, data fingerprint, version,
                        provenance, and the sha256 of weights.safetensors and calibration.npz
  calibration.npz       up to 1024 preprocessed training inputs (uint8) with labels; read with
                        allow_pickle=False
  bn_report.json        the BN health gate's last report (written by `lookalike check`/training)
  metrics.json          training metrics
```

The bundle id is the first 16 hex digits of sha256(weights file bytes + canonical config.json), so a
recalibrated model (new statistics, new weights file) is a new model to the vector store.  The file
hashes in ``config.json`` catch truncation and tampering of the binary files; every failure names the file
and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embedder.errors import BundleError
from embedder.inputs import InputSpec
from embedder.model import EmbedNet, ModelConfig, build_model

FORMAT_VERSION = 1
WEIGHTS, CONFIG, CALIBRATION = "weights.safetensors", "config.json", "calibration.npz"
BN_REPORT, METRICS = "bn_report.json", "metrics.json"
MAX_CALIBRATION = 1024


def lookalike_version() -> str:
    try:
        return version("lookalike")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0+unknown"


@dataclass
class Bundle:
    model: EmbedNet
    model_config: ModelConfig
    input_spec: InputSpec
    labels: list[str]
    calibration_x: np.ndarray  # uint8 (N, C, S, S)
    calibration_y: np.ndarray  # int64 (N,)
    id: str
    path: Path | None = None
    data_fingerprint: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    bn_report: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def bundle_id(weights_sha256: str, config: dict[str, Any]) -> str:
    return hashlib.sha256(weights_sha256.encode() + _canonical(config)).hexdigest()[:16]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_bundle(
    path: str | os.PathLike[str],
    model: EmbedNet,
    input_spec: InputSpec,
    labels: list[str],
    calibration_x: np.ndarray,
    calibration_y: np.ndarray,
    *,
    data_fingerprint: str = "",
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    bn_report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write a bundle directory atomically (built beside it, then renamed) and return its id."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BundleError(f"{path}: already exists; choose another --out or pass --overwrite")
    if calibration_x.dtype != np.uint8 or calibration_x.ndim != 4:
        raise ValueError("calibration_x must be uint8 (N, C, S, S)")
    if len(calibration_x) != len(calibration_y):
        raise ValueError("calibration_x and calibration_y differ in length")
    calibration_x, calibration_y = calibration_x[:MAX_CALIBRATION], calibration_y[:MAX_CALIBRATION]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        np.savez_compressed(tmp / CALIBRATION, x=calibration_x, y=calibration_y.astype(np.int64))
        config = {
            "format_version": FORMAT_VERSION,
            "lookalike_version": lookalike_version(),
            "model": model.cfg.to_dict(),
            "input": input_spec.to_dict(),
            "labels": list(labels),
            "data_fingerprint": data_fingerprint,
            "provenance": provenance or {},
            "files": {WEIGHTS: _sha256_file(tmp / WEIGHTS), CALIBRATION: _sha256_file(tmp / CALIBRATION)},
        }
        _write_json(tmp / CONFIG, config)
        if metrics is not None:
            _write_json(tmp / METRICS, metrics)
        if bn_report is not None:
            _write_json(tmp / BN_REPORT, bn_report)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return bundle_id(config["files"][WEIGHTS], config)


def write_report(path: str | os.PathLike[str], name: str, obj: dict[str, Any]) -> None:
    """(Re)write bn_report.json or metrics.json; they are not part of the bundle id."""
    if name not in (BN_REPORT, METRICS):
        raise ValueError(f"only {BN_REPORT} and {METRICS} may be rewritten")
    _write_json(Path(path) / name, obj)


def _read_json(path: Path, required: bool = True) -> Any:
    if not path.exists():
        if required:
            raise BundleError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Load and verify a bundle; any defect raises :class:`BundleError` naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path / CONFIG}: unsupported or missing format_version (want {FORMAT_VERSION})")
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
        input_spec = InputSpec.from_dict(config["input"])
        labels = [str(x) for x in config["labels"]]
        hashes = config["files"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path / CONFIG}: malformed ({exc!r})") from exc

    for name in (WEIGHTS, CALIBRATION):
        f = path / name
        if not f.exists():
            raise BundleError(f"{f}: missing")
        if _sha256_file(f) != hashes.get(name):
            raise BundleError(f"{f}: sha256 does not match config.json (truncated or modified)")

    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path / WEIGHTS}: unreadable safetensors ({exc})") from exc
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{path / WEIGHTS}: does not match the architecture in config.json: {exc}") from exc
    if model_cfg.num_classes and model_cfg.num_classes != len(labels):
        raise BundleError(
            f"{path / CONFIG}: {len(labels)} labels but the classifier has {model_cfg.num_classes} classes"
        )

    try:
        with np.load(path / CALIBRATION, allow_pickle=False) as npz:
            cal_x, cal_y = npz["x"], npz["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path / CALIBRATION}: unreadable ({exc})") from exc
    want = (input_spec.channels, input_spec.size, input_spec.size)
    if cal_x.dtype != np.uint8 or cal_x.shape[1:] != want or len(cal_x) != len(cal_y):
        raise BundleError(f"{path / CALIBRATION}: expected uint8 (N, {want}) with N labels")

    model.eval()
    return Bundle(
        model=model,
        model_config=model_cfg,
        input_spec=input_spec,
        labels=labels,
        calibration_x=cal_x,
        calibration_y=cal_y,
        id=bundle_id(hashes[WEIGHTS], config),
        path=path,
        data_fingerprint=str(config.get("data_fingerprint", "")),
        provenance=dict(config.get("provenance", {})),
        bn_report=_read_json(path / BN_REPORT, required=False),
        metrics=_read_json(path / METRICS, required=False),
    )


def state_dict_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
