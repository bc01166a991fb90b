"""`lookalike embed` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from embedder.bundle import save_bundle
from embedder.inputs import InputSpec
from embedder.model import ModelConfig, build_model

LOOKALIKE = Path(sys.executable).with_name("lookalike")


def _bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_classes=2)).eval()
    x = np.zeros((4, 1, 64, 64), np.uint8)
    save_bundle(tmp_path / "b", model, InputSpec(), ["a", "b"], x, np.array([0, 1, 0, 1]))
    return tmp_path / "b"


def test_embed_reports_bad_files_and_embeds_the_rest(tmp_path, elf_path, pe_path):
    bundle = _bundle(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not an executable\n")
    r = subprocess.run(
        [LOOKALIKE, "embed", "--json", bundle, elf_path, text, pe_path, tmp_path / "absent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec.get("error") for rec in records] == [None, "not_an_executable", None, "unreadable"]
    ok = [rec for rec in records if "error" not in rec]
    assert [rec["format"] for rec in ok] == ["ELF", "PE"]
    for rec in ok:
        assert len(rec["embedding"]) == rec["dim"] == 128
        assert abs(np.linalg.norm(rec["embedding"]) - 1) < 1e-4
    assert r.stderr == ""


def test_embed_exit_codes(tmp_path, elf_path):
    bundle = _bundle(tmp_path)
    ok = subprocess.run([LOOKALIKE, "embed", bundle, elf_path], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.count("\n") == 1 and "\tELF\t" in ok.stdout
    bad = subprocess.run(
        [LOOKALIKE, "embed", tmp_path / "nobundle", elf_path], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not a bundle directory" in bad.stderr
