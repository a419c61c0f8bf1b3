"""Operator settings: ``FKD_*`` environment variables and an optional TOML file, validated by pydantic-settings.

Precedence: explicit CLI options > environment (``FKD_SHARD_SIZE=1000``) > TOML file (``FKD_CONFIG`` or
``./fkd.toml``) > defaults. Bucket credentials are never part of these settings: s3fs reads the standard AWS
variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` ...) itself, and fkd never logs them.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from fkd_core.image_io import DEFAULT_MAX_PIXELS
from fkd_core.resources import DEFAULT_MODEL


class FkdSettings(BaseSettings):
    """The operator settings, and the one owner of their defaults and bounds: a flow config's settings-backed
    fields (``AnnotateConfig.SETTINGS``...) take their type, bounds and default from here
    (:func:`resolve_settings`), wherever the config is built: the CLI, a served or worker's deployment run, a
    Python caller."""

    # an empty FKD_* variable means "not set" (compose passes `FKD_MODEL: ${FKD_MODEL:-}` through as "")
    model_config = SettingsConfigDict(env_prefix="FKD_", extra="forbid", env_ignore_empty=True)

    model: str = Field(str(DEFAULT_MODEL), description="Checkpoint used by annotate and evaluate")
    detector: Literal["haar", "yunet"] | None = Field(
        None, description="Face detector of annotate and evaluate: haar or yunet (default: the model's own, haar)"
    )
    shard_size: int = Field(500, ge=1, le=100_000, description="Images per annotate task")
    workers: int = Field(1, ge=1, le=64, description="Shards at once with the local task runner")
    dask_address: str | None = Field(None, description="Dask scheduler for annotate shards")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Larger images are refused as pixel bombs")
    nightly_source: str | None = Field(None, description="Prefix annotated incrementally by the nightly deployment")
    nightly_out: str | None = Field(None, description="Output prefix of the nightly deployment")
    nightly_cron: str = Field("0 2 * * *", description="Schedule of the nightly deployment (cron, UTC)")

    @field_validator("nightly_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if v == cls.model_fields["nightly_cron"].default:
            return v  # known good: no Prefect import (it creates PREFECT_HOME) for a command that never schedules
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=v)
        except ValidationError:
            raise ValueError(f"{v!r} is not a cron expression (five fields, e.g. '0 2 * * *' for 02:00 UTC)") from None
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = toml_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            if not Path(toml).is_file():
                raise SettingsError(f"FKD_CONFIG names {toml!r}, which does not exist")
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
            except tomllib.TOMLDecodeError as e:
                raise SettingsError(f"{toml} is not valid TOML: {e}") from None
        return tuple(sources)


SERVED_MODEL = "default: FKD_MODEL (or the settings file's model), else the packaged model"
SERVED_DETECTOR = (
    "haar (OpenCV's Haar cascade) or yunet (libfacedetection's CNN, in fkd's yunet extra); default: FKD_DETECTOR "
    "(or the settings file's detector), else the one the model was trained behind (haar for the packaged model)"
)


def resolve_settings(cfg):
    """Fill in a config's settings-backed fields (``type(cfg).SETTINGS``) that were not given from the operator
    settings (FKD_* variables, the settings file, else their defaults). Resolved where the flow runs, so FKD_MODEL,
    FKD_SHARD_SIZE... reach every run the same way: the CLI's, a served or worker's deployment's, a Python
    caller's. (A pydantic after-validator.)"""
    missing = [name for name in type(cfg).SETTINGS if getattr(cfg, name) is None]
    if missing:
        settings = load_settings()
        for name in missing:
            setattr(cfg, name, getattr(settings, name))
    return cfg


def setting_type(name: str):
    """The type of a config field backed by setting ``name``: the setting's own type and bounds, or None (not
    given: :func:`resolve_settings` fills it in)."""
    from typing import Annotated

    f = FkdSettings.model_fields[name]
    return (Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation) | None


class SettingsError(ValueError):
    """Settings could not be loaded; the message names the variable, file, flag or field."""


# FKD_* variables that are not settings but are read elsewhere: the settings file, and the tests' model.
_OTHER_VARIABLES = {"FKD_CONFIG", "FKD_TEST_MODEL"}


def toml_file() -> str | None:
    """The settings file in force: ``FKD_CONFIG``, else ``./fkd.toml`` if there is one."""
    return os.environ.get("FKD_CONFIG") or ("fkd.toml" if Path("fkd.toml").is_file() else None)


def load_settings(**overrides) -> FkdSettings:
    """Settings with ``overrides`` (CLI options; None means not given) on top.

    An invalid value raises :class:`SettingsError` blaming where it came from: the CLI flag, the ``FKD_*``
    variable, or the TOML file.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return FkdSettings(**given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            if field in given:
                where = f"--{field.replace('_', '-')}"
            elif f"FKD_{field.upper()}" in {k.upper() for k in os.environ}:
                where = f"FKD_{field.upper()} (environment)"
            else:
                where = f"{field} in {toml_file() or 'the settings'}"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid fkd settings: " + "; ".join(problems)) from None
