"""docker-compose.yml and the Dockerfile: validated with the real docker-compose (no engine runs here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (make data)")
def test_compose_config_is_valid_and_wires_api_to_indexer():
    env = {**os.environ, "LOOKALIKE_API_KEYS": "test-key-123"}
    r = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    api, indexer = cfg["services"]["api"], cfg["services"]["indexer"]
    assert api["depends_on"]["indexer"]["condition"] == "service_completed_successfully"
    assert indexer["command"][0] == "index" and api["command"][0] == "serve"
    volume_of = {s: {v.split(":")[0] for v in svc["volumes"]} for s, svc in cfg["services"].items()}
    assert "store" in volume_of["api"] and "store" in volume_of["indexer"]
    assert api["environment"]["LOOKALIKE_API_KEYS"] == "test-key-123"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (make data)")
def test_compose_refuses_to_start_without_api_keys():
    env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_API_KEYS"}
    r = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "LOOKALIKE_API_KEYS" in r.stderr


def test_dockerfile_installs_cpu_torch_before_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert text.index("torch==2.13.0") < text.index("pip install .")
    assert "whl/cpu" in text
