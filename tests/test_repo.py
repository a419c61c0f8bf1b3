"""Repository-level checks: lint, Docker files, prefect.yaml, and the README's own commands and queries."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_is_clean():
    out = subprocess.run([str(BIN / "ruff"), "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_dockerfile_passes_hadolint():
    out = subprocess.run([str(BIN / "hadolint"), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_wires_server_store_and_worker():
    doc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = doc["services"]
    assert {"prefect-server", "s3", "worker"} <= set(services)
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"].startswith("http://prefect-server:4200")
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    # every file the Dockerfile copies exists in the build context
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_prefect_yaml_entrypoints_and_parameters_are_valid():
    import importlib

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for dep in doc["deployments"]:
        path, name = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert flow.name == name
        if "parameters" in dep:
            cfg_type = flow.fn.__annotations__["cfg"]
            cfg_type = getattr(module, cfg_type) if isinstance(cfg_type, str) else cfg_type
            cfg_type(**dep["parameters"]["cfg"])  # raises if the deployment's parameters are invalid
    nightly = next(d for d in doc["deployments"] if d["name"] == "nightly-incremental")
    assert nightly["concurrency_limit"] == 1 and nightly["parameters"]["cfg"]["incremental"] is True


def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_front_door_commands_match_ci():
    shell = "\n".join(_readme_blocks("bash"))
    ci = (ROOT / ".ci" / "run").read_text()
    setup = next(line for line in shell.splitlines() if "pip install" in line)
    tests = next(line for line in shell.splitlines() if line.strip().startswith(".venv/bin/pytest"))
    assert setup.strip() in ci and tests.strip() in ci


def test_readme_names_the_shipped_checkpoint():
    """The README's metrics are for the checkpoint that ships: its heading must name that model id."""
    from fkd_core.checkpoint import load_checkpoint

    heading = re.search(r"### Shipped checkpoint: `([^`]+)`", (ROOT / "README.md").read_text())
    assert heading is not None and heading.group(1) == load_checkpoint().model_id


@pytest.mark.flows
def test_readme_downstream_queries_run_on_real_output(tmp_path, sample_dir):
    """Every ```python block of the README's "Querying the output" section runs against a real annotate output."""
    from fkd_core.checkpoint import DEFAULT_MODEL
    from flows.annotate import AnnotateConfig, annotate

    out = tmp_path / "out"
    annotate(AnnotateConfig(source=str(sample_dir / "photos"), out=str(out), model=str(DEFAULT_MODEL), run_id="r1"))
    broken = tmp_path / "more"
    broken.mkdir()
    (broken / "broken.jpg").write_bytes(b"nope")
    annotate(AnnotateConfig(source=str(broken), out=str(out), model=str(DEFAULT_MODEL), run_id="r2"))
    section = (ROOT / "README.md").read_text().split("## Querying the output", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    ns: dict = {"OUT": str(out)}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    # the README's queries leave their answers in these names
    faces_per_image = ns["faces_per_image"]
    assert dict(zip(faces_per_image["name"], faces_per_image["n_faces"], strict=True)) == {
        "the_beatles.jpg": 4,
        "obamas.jpg": 2,
        "mona_lisa.jpg": 1,
    }
    errors = ns["errors"]
    assert list(errors["image_uri"].str.rsplit("/", n=1).str[-1]) == ["broken.jpg"] and errors["error"][0]
    one_face = ns["one_face"]
    assert one_face.shape == (68, 2)
    assert ns["polars_faces"].height == 7
