"""The service's one settings object: a TOML file, overridden by ``LOOKALIKE_*`` environment variables.

Precedence, highest first: explicit arguments (``lookalike serve --port``), environment variables
(``LOOKALIKE_API_KEYS=k1,k2``, ``LOOKALIKE_PORT=9000``, ``LOOKALIKE_COLLECTIONS='{"exe": {"model": "m"}}'``),
the TOML file (``--config FILE`` or ``LOOKALIKE_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class CollectionSettings(BaseModel):
    model: Path = Field(description="Model bundle directory; it must pass the BN gate to be served.")
    index: str = Field("flat", description="flat | hnsw | ivf, or a FAISS factory string.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="forbid")

    store: Path = Path("var/store")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    require_key_for_reads: bool = False
    max_upload_mb: float = 64
    host: str = "127.0.0.1"
    port: int = 8000
    collections: dict[str, CollectionSettings] = Field(default_factory=dict)
    parser_workers: int = 2
    parser_timeout_s: float = 10.0
    parser_memory_mb: int = 1024
    catch_up_interval_s: float = 2.0
    default_k: int = 10
    max_k: int = 1000

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        # The environment gives "k1,k2"; TOML gives a list.
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _no_short_keys(cls, v: list[str]) -> list[str]:
        if any(len(k) < 8 for k in v):
            raise ValueError("API keys must be at least 8 characters")
        return v

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from ``config_file`` (or ``$LOOKALIKE_CONFIG``), the environment and ``overrides``.

    Relative paths in the file (store, models) are resolved against the file's directory, so a
    config works wherever the server is started from.
    """
    path = config_file or os.environ.get("LOOKALIKE_CONFIG")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not path:
        return Settings(**overrides)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")

    # The TOML source ignores unknown keys; a typo ("api_key") must not silently drop a setting.
    with path.open("rb") as f:
        unknown = sorted(set(tomllib.load(f)) - set(Settings.model_fields))
    if unknown:
        raise ValueError(
            f"{path}: unknown settings {', '.join(unknown)}; known: {', '.join(Settings.model_fields)}"
        )

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    settings = Settings.model_validate(_FromFile(**overrides).model_dump())
    base = path.resolve().parent
    settings.store = base / settings.store
    for c in settings.collections.values():
        c.model = base / c.model
    return settings
