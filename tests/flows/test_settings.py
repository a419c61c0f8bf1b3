import os
import socket
import subprocess
import sys

import pytest

from fkd_flows.configs import unknown_variables
from fkd_flows.settings import FkdSettings, SettingsError, load_settings
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
        ({"FKD_SHARD_SIZE": "0"}, "FKD_SHARD_SIZE (environment): Input should be greater than or equal to 1"),
        ({"FKD_WORKERS": "many"}, "FKD_WORKERS (environment): Input should be a valid integer"),
        ({"FKD_CONFIG": "/nonexistent/fkd.toml"}, "FKD_CONFIG names '/nonexistent/fkd.toml', which does not exist"),
        ({"FKD_NIGHTLY_CRON": "every night"}, "FKD_NIGHTLY_CRON (environment): 'every night' is not a cron expression"),
        ({"FKD_NIGHTLY_CRON": "0 25 * * *"}, "FKD_NIGHTLY_CRON (environment): '0 25 * * *' is not a cron expression"),
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
    with pytest.raises(SettingsError, match=r"shard_sise in .*x.toml: Extra inputs are not permitted"):
        load_settings()


def test_a_bad_toml_file_is_one_line_naming_the_file(tmp_path, monkeypatch):
    toml = tmp_path / "broken.toml"
    toml.write_text("shard_size = \n")
    monkeypatch.setenv("FKD_CONFIG", str(toml))
    with pytest.raises(SettingsError, match=r"broken.toml is not valid TOML: .*line 1"):
        load_settings()
    out = subprocess.run(
        [str(BIN / "fkd"), "settings"], capture_output=True, text=True, env={**os.environ, "FKD_CONFIG": str(toml)}
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "broken.toml is not valid TOML" in out.stderr


def test_a_bad_cli_flag_is_blamed_on_the_flag(tmp_path):
    out = subprocess.run(
        [str(BIN / "fkd"), "annotate", str(tmp_path), str(tmp_path / "o"), "--shard-size", "0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--shard-size: Input should be greater than or equal to 1" in out.stderr
    assert "environment" not in out.stderr and "FKD_SHARD_SIZE" not in out.stderr


def test_a_misspelt_variable_is_warned_about():
    assert unknown_variables({"FKD_SHARDSIZE": "3", "FKD_MODEL": "m", "FKD_CONFIG": "x", "OTHER": "1"}) == [
        "warning: FKD_SHARDSIZE is not an fkd setting and is ignored; did you mean FKD_SHARD_SIZE?"
    ]
    # a command option's variable is known, and a misspelt one is named with the right spelling
    assert unknown_variables({"FKD_TRAIN_EPOCHS": "3", "FKD_TRAIN_EPOCS": "3"}) == [
        "warning: FKD_TRAIN_EPOCS is not an fkd setting and is ignored; did you mean FKD_TRAIN_EPOCHS?"
    ]
    out = subprocess.run(
        [str(BIN / "fkd"), "settings", "--get", "shard_size"],
        capture_output=True,
        text=True,
        env={**os.environ, "FKD_NIGHTLY_SORCE": "s3://b/in"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "500"
    assert "FKD_NIGHTLY_SORCE is not an fkd setting and is ignored; did you mean FKD_NIGHTLY_SOURCE?" in out.stderr


def test_evaluate_honours_fkd_model_and_a_missing_model_names_the_path_given(tmp_path, sample_csv, sample_dir):
    missing = tmp_path / "nowhere" / "mine.safetensors"
    for command in (
        ["evaluate", str(sample_csv), str(sample_dir / "images"), str(tmp_path / "e")],
        ["annotate", str(sample_dir / "photos"), str(tmp_path / "a")],
    ):
        out = subprocess.run(
            [str(BIN / "fkd"), *command], capture_output=True, text=True, env={**os.environ, "FKD_MODEL": str(missing)}
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"fkd: model {missing} does not exist", command
    assert not (tmp_path / "e").exists() and not (tmp_path / "a").exists()


def test_an_empty_variable_means_the_default_and_a_dead_scheduler_is_one_line(tmp_path, sample_dir, monkeypatch):
    """compose passes unset FKD_* through as empty strings; they must not become settings."""
    monkeypatch.setenv("FKD_MODEL", "")
    monkeypatch.setenv("FKD_SHARD_SIZE", "")
    from fkd_core.checkpoint import DEFAULT_MODEL

    s = load_settings()
    assert (s.model, s.shard_size) == (str(DEFAULT_MODEL), 500)
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    out = subprocess.run(
        [str(BIN / "fkd"), "annotate", str(sample_dir / "photos"), str(tmp_path / "a"), "--dask-address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"fkd: Dask scheduler {address} does not answer (Connection refused); check --dask-address or FKD_DASK_ADDRESS"
    ]
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("user_value,expected", [(None, ("1", "false")), ("0", ("0", "false"))])
def test_prefect_telemetry_is_off_unless_the_user_turns_it_on(user_value, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    if user_value is not None:
        env["DO_NOT_TRACK"] = user_value
    code = "import os, fkd_flows.cli; print(os.environ['DO_NOT_TRACK'], os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert tuple(out.stdout.split()) == expected


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
        "import fkd_flows.cli\n"
        "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s\n"
        "print(s.value())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("command", ["annotate", "ingest", "train", "evaluate"])
def test_every_config_field_is_a_cli_parameter_with_its_default_and_variable(command):
    """The CLI is built from the flows' configs: each field (but those the CLI sets itself) is an argument or an
    option with the config's default (settings-backed options: None, resolved by load_settings) and variable."""
    import typer.main
    from pydantic_core import PydanticUndefined

    import fkd_flows.cli
    from fkd_flows.configs import COMMANDS, HIDDEN, SETTINGS_BACKED, env_var

    cls, arguments = COMMANDS[command]
    params = {p.name: p for p in typer.main.get_command(fkd_flows.cli.app).commands[command].params}
    assert set(params) == set(cls.model_fields) - set(HIDDEN.get(command, ()))
    for name, f in cls.model_fields.items():
        if name in arguments or name in HIDDEN.get(command, ()):
            continue
        p = params[name]
        if name in SETTINGS_BACKED.get(command, ()):
            assert p.default is None and env_var(command, name) in p.help, name
        else:
            assert p.default == (None if f.default is PydanticUndefined else f.default), name
            assert p.envvar == env_var(command, name) == f"FKD_{command.upper()}_{name.upper()}", name


def test_train_config_refuses_an_unknown_device_naming_the_field():
    from pydantic import ValidationError

    from fkd_flows.train import TrainConfig

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


@pytest.mark.parametrize(
    "flow,config",
    [
        ("fkd_flows.annotate:annotate", "AnnotateConfig"),
        ("fkd_flows.ingest:ingest", "IngestConfig"),
        ("fkd_flows.train:train", "TrainConfig"),
        ("fkd_flows.evaluate:evaluate", "EvaluateConfig"),
    ],
)
def test_flows_take_their_config_fields_as_flat_parameters(flow, config):
    """`prefect deployment run ... --param source=...` needs flat parameters; they are the config's fields."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = flow.split(":")
    mod = importlib.import_module(module)
    fields = getattr(mod, config).model_fields
    schema = parameter_schema(getattr(mod, name))
    assert list(schema.properties) == list(fields)
    assert set(schema.required or []) == {n for n, f in fields.items() if f.is_required()}
    for n, f in fields.items():
        if f.description:
            assert schema.properties[n].get("description") == f.description, n
        if not f.is_required():
            assert schema.properties[n].get("default") == f.default, n


def test_fkd_detector_picks_the_detector_of_every_run_that_names_none(monkeypatch):
    """A Python call or a served deployment run (configs built where the flow runs) uses FKD_DETECTOR, as the CLI
    does; a run that names its detector keeps it; a bad value names the variable."""
    from fkd_flows.configs import AnnotateConfig, EvaluateConfig

    assert AnnotateConfig(source="s", out="o").detector is None  # the model's own
    monkeypatch.setenv("FKD_DETECTOR", "yunet")
    assert AnnotateConfig(source="s", out="o").detector == "yunet"
    assert EvaluateConfig(csv="c", images="i", out="o").detector == "yunet"
    assert AnnotateConfig(source="s", out="o", detector="haar").detector == "haar"
    monkeypatch.setenv("FKD_DETECTOR", "dlib")
    with pytest.raises(ValueError, match=r"FKD_DETECTOR \(environment\): Input should be 'haar' or 'yunet'"):
        AnnotateConfig(source="s", out="o")


@pytest.mark.flows
def test_a_run_id_too_long_to_name_a_file_is_refused_before_anything_is_written(tmp_path, sample_dir, model_path):
    """A 300-character --run-id would fail late with "File name too long": it is one line and exit 2 at once,
    and the longest id allowed names its files fine."""
    from fkd_flows.annotate import annotate

    photo = str(sample_dir / "photos" / "obamas.jpg")
    out = tmp_path / "out"
    cli = subprocess.run(
        [str(BIN / "fkd"), "annotate", photo, str(out), "--run-id", "r" * 300, "--model", model_path],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.startswith("fkd: invalid run_id (--run-id): String should have at most 100 characters")
    assert not out.exists()
    longest = "r" * 100
    doc = annotate(source=photo, out=str(out), run_id=longest, model=model_path)
    assert doc["status"] == "completed" and (out / "runs" / f"{longest}.json").is_file()


def test_python_callers_and_deployment_runs_take_the_operator_settings(monkeypatch):
    """Settings have one owner (FkdSettings): a config built anywhere (a deployment run's, a Python caller's)
    takes FKD_* for the fields it was not given, with the setting's bounds; given values win."""
    from pydantic import ValidationError

    from fkd_flows.configs import AnnotateConfig, EvaluateConfig

    for name, value in (("SHARD_SIZE", "7"), ("WORKERS", "3"), ("MAX_PIXELS", "1000"), ("DASK_ADDRESS", "tcp://h:1")):
        monkeypatch.setenv(f"FKD_{name}", value)
    cfg = AnnotateConfig(source="a", out="b")
    assert (cfg.shard_size, cfg.workers, cfg.max_pixels, cfg.dask_address) == (7, 3, 1000, "tcp://h:1")
    assert AnnotateConfig(source="a", out="b", shard_size=2, workers=1).shard_size == 2
    assert EvaluateConfig(csv="a", images="b", out="c").shard_size == 500  # evaluate's own option, no setting
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AnnotateConfig(source="a", out="b", shard_size=0)  # the setting's bounds hold for a given value too
    monkeypatch.setenv("FKD_SHARD_SIZE", "0")
    with pytest.raises(ValidationError, match="FKD_SHARD_SIZE"):
        AnnotateConfig(source="a", out="b")
    for name in ("SHARD_SIZE", "WORKERS", "MAX_PIXELS", "DASK_ADDRESS"):
        monkeypatch.delenv(f"FKD_{name}")
    cfg = AnnotateConfig(source="a", out="b")
    defaults = FkdSettings()
    assert (cfg.shard_size, cfg.workers, cfg.max_pixels) == (defaults.shard_size, defaults.workers, defaults.max_pixels)
