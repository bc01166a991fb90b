"""The service settings: a TOML file, overridden by LOOKALIKE_* variables, overridden by arguments."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import load_settings


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "conf" / "lookalike.toml"
    path.parent.mkdir()
    path.write_text(
        'store = "var/store"\n'
        'api_keys = ["file-key-123"]\n'
        "port = 9000\n"
        "[collections.exe]\n"
        'model = "models/exec"\n'
        'index = "hnsw"\n'
    )
    return path


def test_file_values_and_relative_paths(config_file, monkeypatch):
    for var in ("LOOKALIKE_PORT", "LOOKALIKE_API_KEYS", "LOOKALIKE_CONFIG", "LOOKALIKE_COLLECTIONS"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(config_file)
    assert s.port == 9000 and s.api_keys == ["file-key-123"]
    assert s.store == config_file.parent / "var/store"  # relative to the file, not the working directory
    assert s.collections["exe"].model == config_file.parent / "models/exec"
    assert s.collections["exe"].index == "hnsw"
    assert s.max_upload_bytes == 64 * 1024 * 1024


def test_environment_overrides_file_and_arguments_override_both(config_file, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_PORT", "9100")
    monkeypatch.setenv("LOOKALIKE_API_KEYS", "env-key-1234, env-key-5678")
    s = load_settings(config_file)
    assert s.port == 9100 and s.api_keys == ["env-key-1234", "env-key-5678"]
    assert load_settings(config_file, port=9200, host=None).port == 9200  # None means "not given"


def test_config_from_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError, match=r"missing\.toml"):
        load_settings()
    monkeypatch.delenv("LOOKALIKE_CONFIG")
    monkeypatch.setenv("LOOKALIKE_COLLECTIONS", '{"img": {"model": "/models/fashion"}}')
    assert str(load_settings().collections["img"].model) == "/models/fashion"


def test_bad_settings_are_refused(config_file, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_API_KEYS", "short")
    with pytest.raises(ValidationError, match="at least 8"):
        load_settings(config_file)
    monkeypatch.delenv("LOOKALIKE_API_KEYS")
    config_file.write_text("api_key = ['typo-key-123']\n" + config_file.read_text())
    with pytest.raises(ValueError, match="unknown settings api_key"):
        load_settings(config_file)
