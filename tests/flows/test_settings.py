import os
import subprocess
import sys

import pytest

from flows.settings import FkdSettings, SettingsError, load_settings
from tests.flows.conftest import BIN


def test_env_overrides_toml_and_cli_overrides_env(tmp_path, monkeypatch):
    toml = tmp_path / "fkd.toml"
    toml.write_text('shard_size = 200\nworkers = 3\nnightly_source = "s3://b/in"\n')
    monkeypatch.setenv("FKD_CONFIG", str(toml))
    monkeypatch.setenv("FKD_WORKERS", "5")
    s = load_settings()
    assert (s.shard_size, s.workers, s.nightly_source) == (200, 5, "s3://b/in")
    assert load_settings(workers=7, shard_size=None).workers == 7


@pytest.mark.parametrize(
    "env,message",
    [
        ({"FKD_SHARD_SIZE": "0"}, "shard_size (FKD_SHARD_SIZE): Input should be greater than or equal to 1"),
        ({"FKD_WORKERS": "many"}, "workers (FKD_WORKERS): Input should be a valid integer"),
        ({"FKD_CONFIG": "/nonexistent/fkd.toml"}, "FKD_CONFIG names '/nonexistent/fkd.toml', which does not exist"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert message in str(e.value)


def test_unknown_toml_key_is_refused_naming_the_file(tmp_path, monkeypatch):
    toml = tmp_path / "x.toml"
    toml.write_text("shard_sise = 3\n")
    monkeypatch.setenv("FKD_CONFIG", str(toml))
    with pytest.raises(SettingsError, match=r"x.toml: shard_sise .*Extra inputs are not permitted"):
        load_settings()


def test_cli_reports_bad_settings_without_a_traceback(tmp_path):
    out = subprocess.run(
        [str(BIN / "fkd"), "annotate", str(tmp_path), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "FKD_SHARD_SIZE": "-1", "HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    assert "FKD_SHARD_SIZE" in out.stderr and "Traceback" not in out.stderr


def test_settings_hold_no_credentials():
    assert not any("secret" in f or "key" in f or "password" in f for f in FkdSettings.model_fields)


def test_cli_reports_an_invalid_flow_config_naming_the_field(tmp_path):
    out = subprocess.run(
        [str(BIN / "fkd"), "ingest", "a.csv", "imgs", str(tmp_path), "--split-by", "random"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "invalid split_by" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("user_value,expected", [(None, "300"), ("7", "7")])
def test_cli_waits_long_enough_for_the_ephemeral_prefect_server(user_value, expected):
    """A fresh PREFECT_HOME needs longer than Prefect's default 20 s to migrate its database on a busy CI box."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    if user_value is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_value
    code = (
        "import flows.cli\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s\n"
        "print(s.value())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize(
    "command,config",
    [
        ("train", "flows.train:TrainConfig"),
        ("evaluate", "flows.evaluate:EvaluateConfig"),
        ("ingest", "flows.ingest:IngestConfig"),
    ],
)
def test_cli_defaults_are_the_flow_config_defaults(command, config):
    """The CLI spells out each option's default; it must not drift from the flow's validated config."""
    import importlib
    import inspect

    import flows.cli

    module, cls = config.split(":")
    fields = getattr(importlib.import_module(module), cls).model_fields
    params = inspect.signature(getattr(flows.cli, command)).parameters
    shared = [n for n, p in params.items() if n in fields and p.default is not inspect.Parameter.empty]
    assert shared, "no option shares a name with the config"
    for name in shared:
        assert params[name].default == fields[name].default, name


def test_train_config_refuses_an_unknown_device_naming_the_field():
    from pydantic import ValidationError

    from flows.train import TrainConfig

    with pytest.raises(ValidationError, match=r"device\n.*String should match pattern"):
        TrainConfig(examples="x", device="gpu")
    assert TrainConfig(examples="x", device="cuda:1").device == "cuda:1"


def test_cli_refuses_a_gpu_where_torch_sees_none(tmp_path):
    out = subprocess.run(
        [str(BIN / "fkd"), "train", str(tmp_path / "examples"), "--device", "cuda"],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode != 0 and "torch sees no CUDA GPU" in out.stdout + out.stderr
