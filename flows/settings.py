"""Operator settings: ``FKD_*`` environment variables and an optional TOML file, validated by pydantic-settings.

Precedence: explicit CLI options > environment (``FKD_SHARD_SIZE=1000``) > TOML file (``FKD_CONFIG`` or
``./fkd.toml``) > defaults. Bucket credentials are never part of these settings: s3fs reads the standard AWS
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` ...) itself, and fkd never logs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from fkd_core.checkpoint import DEFAULT_MODEL


class FkdSettings(BaseSettings):
    """Defaults for the CLI and for served deployments."""

    model_config = SettingsConfigDict(env_prefix="FKD_", extra="forbid")

    model: str = Field(str(DEFAULT_MODEL), description="Checkpoint used by annotate and evaluate")
    shard_size: int = Field(500, ge=1, le=100_000, description="Images per annotate task")
    workers: int = Field(1, ge=1, le=64, description="Shards at once with the local task runner")
    dask_address: str | None = Field(None, description="Dask scheduler for annotate shards")
    max_pixels: int = Field(50_000_000, ge=1, description="Larger images are refused as pixel bombs")
    nightly_source: str | None = Field(None, description="Prefix annotated incrementally by the nightly deployment")
    nightly_out: str | None = Field(None, description="Output prefix of the nightly deployment")
    nightly_cron: str = Field("0 2 * * *", description="Schedule of the nightly deployment (UTC)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = os.environ.get("FKD_CONFIG") or ("fkd.toml" if Path("fkd.toml").is_file() else None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            if not Path(toml).is_file():
                raise SettingsError(f"FKD_CONFIG names {toml!r}, which does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


class SettingsError(ValueError):
    """Settings could not be loaded; the message names the variable, file or field."""


def load_settings(**overrides) -> FkdSettings:
    """Settings with ``overrides`` (non-None values) on top; invalid values raise :class:`SettingsError`."""
    try:
        return FkdSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        where = os.environ.get("FKD_CONFIG") or ("fkd.toml" if Path("fkd.toml").is_file() else "the environment")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])} (FKD_{str(err['loc'][0]).upper()}): {err['msg']}"
            for err in e.errors()
        )
        raise SettingsError(f"invalid fkd settings from {where}: {problems}") from None
