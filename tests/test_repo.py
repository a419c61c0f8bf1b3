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


_INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
_CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|_USER")


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # compose also accepts ["KEY=value", ...]
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _dotenv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values


def test_compose_wires_server_store_and_worker():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    assert {"postgres", "prefect-server", "s3", "worker"} <= set(services)

    # the Prefect server runs on PostgreSQL (its production database), once that answers
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:15")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "ports" not in postgres, "PostgreSQL must not be published outside the compose network"
    server = services["prefect-server"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    db_url = _environment(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    part = r"(\$\{[^}]*\}|[^:@/${}]+)"  # one ${...} interpolation, or a literal
    url = re.fullmatch(rf"postgresql\+asyncpg://{part}:{part}@postgres:5432/{part}", db_url)
    assert url is not None, f"not a postgresql+asyncpg URL to the postgres service: {db_url}"
    pg_env = _environment(postgres)
    for piece, key in zip(url.groups(), ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"), strict=True):
        ref = _INTERPOLATION.fullmatch(piece)
        assert ref is not None and ref.group(1) == key, (piece, key)
        assert _INTERPOLATION.fullmatch(pg_env[key]).group(1) == key

    # published ports are reachable from this machine only
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)

    # no literal credential: every credential is a ${VAR} (or ${VAR:?message}) with no default
    for name, service in services.items():
        for key, value in _environment(service).items():
            if _CREDENTIAL_KEY.search(key):
                ref = _INTERPOLATION.fullmatch(value)
                assert ref is not None and not ref.group(2).startswith(":-"), (name, key, value)
    assert "minioadmin" not in text
    example = _dotenv(ROOT / "docker" / ".env.example")
    for key, value in example.items():
        if "PASSWORD" in key:
            assert value not in text, f"{key} of docker/.env.example appears literally in compose.yaml"

    # every variable without a default is defined (with a placeholder) in docker/.env.example
    required = {m.group(1) for m in _INTERPOLATION.finditer(text) if not m.group(2).startswith(":-")}
    assert required >= {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
    missing = sorted(var for var in required if not example.get(var))
    assert not missing, f"not defined in docker/.env.example: {missing}"

    env = _environment(services["worker"])
    assert env["AWS_ACCESS_KEY_ID"] == _environment(services["s3"])["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == _environment(services["s3"])["MINIO_ROOT_PASSWORD"]
    assert env["FKD_NIGHTLY_SOURCE"] == "${FKD_NIGHTLY_SOURCE:-s3://images/incoming}"
    assert env["PREFECT_API_URL"].startswith("http://prefect-server:4200")
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    # every file the Dockerfile copies exists in the build context
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_prefect_yaml_needs_no_checkout_and_never_shares_a_served_name():
    """Module entrypoints and no pull step (a worker with fkd installed needs nothing else); `-pool` names, so
    `prefect deploy --all` cannot take over what `fkd serve` serves. `tests/flows/test_deploy.py` deploys it."""
    import importlib
    import inspect

    from flows.deploy import NIGHTLY, ON_DEMAND

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert doc["pull"] == []
    for dep in doc["deployments"]:
        module, name = dep["entrypoint"].split(":")
        assert "/" not in module and not module.endswith(".py"), dep["entrypoint"]
        flow = getattr(importlib.import_module(module), name)
        assert flow.name == name
        assert dep["name"].endswith("-pool") and dep["name"] not in (NIGHTLY, ON_DEMAND)
        params = inspect.signature(flow.fn).parameters
        assert set(dep.get("parameters", {})) <= set(params), dep["name"]
    nightly = next(d for d in doc["deployments"] if d["name"] == NIGHTLY + "-pool")
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert nightly["parameters"]["incremental"] is True
    assert "FKD_REPO_DIR" not in (ROOT / "prefect.yaml").read_text()


def _readme_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_front_door_commands_match_ci():
    shell = "\n".join(_readme_blocks("bash"))
    ci = (ROOT / ".ci" / "run").read_text()
    setup = next(line for line in shell.splitlines() if "pip install" in line)
    tests = next(line for line in shell.splitlines() if line.strip().startswith(".venv/bin/pytest"))
    assert setup.strip() in ci and tests.strip() in ci


def test_model_card_names_the_shipped_checkpoint():
    """The model card's metrics are for the checkpoint that ships: its heading must name that model id."""
    from fkd_core.checkpoint import load_checkpoint

    heading = re.search(r"### Shipped checkpoint: `([^`]+)`", (ROOT / "docs" / "model.md").read_text())
    assert heading is not None and heading.group(1) == load_checkpoint().model_id


def _relative_links(text: str) -> list[str]:
    """Targets of the markdown links and images in ``text`` that point into the repository (no URLs, no anchors)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, flags=re.I)]


def test_readme_is_the_front_door():
    """The README stays short (depth lives in docs/), and no relative link in it or in docs/ is broken."""
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= 10 * 1024, f"README.md is {readme.stat().st_size} bytes; move depth to docs/"
    pages = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ holds no markdown"
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in _relative_links(page.read_text())
        if target and not (page.parent / target).exists()
    ]
    assert not broken, broken


@pytest.mark.flows
def test_readme_downstream_queries_run_on_real_output(tmp_path, sample_dir):
    """Every ```python block of the README's "Querying the output" section runs against a real annotate output."""
    from fkd_core.checkpoint import DEFAULT_MODEL
    from flows.annotate import annotate

    out = tmp_path / "out"
    annotate(source=str(sample_dir / "photos"), out=str(out), model=str(DEFAULT_MODEL), run_id="r1")
    broken = tmp_path / "more"
    broken.mkdir()
    (broken / "broken.jpg").write_bytes(b"nope")
    annotate(source=str(broken), out=str(out), model=str(DEFAULT_MODEL), run_id="r2")
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
