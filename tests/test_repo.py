"""Repository-level checks: lint, Docker files, prefect.yaml, and the README's own commands and queries."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
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


def _dockerfile() -> list[tuple[str, str]]:
    """docker/Dockerfile's instructions in order, as (KEYWORD, arguments), continuation lines joined."""
    instructions, current = [], ""
    for raw in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue  # a comment (also inside a continued instruction, as Docker allows), or a blank line
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def _copy_sources(args: str) -> list[str]:
    """The build-context sources of a COPY (shell form, no --chown or --chmod: the tests insist that the image's
    files are root's); a COPY from a stage of the Dockerfile (``--from=build``) takes none."""
    assert not re.match(r"--(chown|chmod)", args), f"COPY {args}: no --chown/--chmod (the application stays root's)"
    if args.startswith("--from="):
        return []
    return [src.removeprefix("./").rstrip("/") for src in args.split()[:-1]]


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def _index(instructions, keyword: str, predicate=lambda args: True, last: bool = False) -> int:
    found = [i for i, (k, a) in enumerate(instructions) if k == keyword and predicate(a)]
    assert found, f"no {keyword} instruction that matches"
    return found[-1] if last else found[0]


def test_dockerfile_installs_the_tested_dependencies_before_the_code():
    """A code change must not reinstall the dependencies (pyproject's runtime list and the yunet extra, constrained
    by constraints.txt; no torch: the worker annotates with ONNX Runtime), installed in a layer built from
    pyproject.toml and constraints.txt only; fkd itself is installed after the code is copied, non-editable and
    without dependencies."""
    ins = _dockerfile()
    code = _index(ins, "COPY", lambda a: {"fkd_core", "flows"} & set(_copy_sources(a)))
    deps = _index(ins, "RUN", lambda a: re.search(r"pip install [^&]*-r \S+[^&]*-c \S*constraints\.txt", a) is not None)
    assert deps < code, "the dependencies must be installed before the application code is copied"
    copied_before = {src for k, a in ins[:deps] if k == "COPY" for src in _copy_sources(a)}
    assert copied_before <= {"pyproject.toml", "constraints.txt"}, copied_before
    deps_run = ins[deps][1]
    assert "tomllib" in deps_run and "dependencies" in deps_run, "the requirements are pyproject's [project] list"
    assert "['yunet']" in deps_run, "and the yunet extra"
    assert not re.search(r"\btorch\b|\['train'\]", deps_run), "the worker image installs no torch"

    install = _index(ins, "RUN", lambda a: "pip install" in a and "--no-deps ." in a)
    assert install > code
    tokens = ins[install][1].split()
    assert "-e" not in tokens and "--editable" not in tokens, "fkd is installed into site-packages, not editable"
    # pyproject's package-dir maps these into the package (fkd_core.saved_models, ...): they must be copied
    copied = {src for k, a in ins[:install] if k == "COPY" for src in _copy_sources(a)}
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {"pyproject.toml", "README.md", "fkd_core", "flows", *package_dirs.values()} <= copied, copied


def test_dockerfile_runs_as_a_user_that_writes_only_to_its_data_volume():
    ins = _dockerfile()
    assert re.fullmatch(r"python:3\.11-slim-(bookworm|trixie)( AS \w+)?", ins[0][1]), (
        "the base names its Debian release"
    )
    final = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    assert ins[final][1].split()[0] in {a.split()[-1] for k, a in ins[:final] if k == "FROM" and " AS " in a}, (
        "the image is the runtime stage with fkd added, not the build stage"
    )
    user = _index(ins, "USER", last=True)
    assert ins[user][1].split(":")[0] not in ("root", "0"), ins[user]
    assert user < _index(ins, "CMD"), "the container runs as the non-root user"
    # the application is installed and copied as root, before the switch: the runtime user cannot change it
    assert max(i for i, (k, a) in enumerate(ins) if k == "COPY" or "pip install" in a) < user
    # the smoke check loads the checkpoint as the runtime user
    smoke = _index(ins, "RUN", lambda a: "fkd_core.load_checkpoint().graphs" in a)
    assert smoke > user and "import fkd_core, fkd_flows.annotate" in ins[smoke][1]
    assert "find_spec('torch') is None" in ins[smoke][1], "the smoke check proves the image has no torch"
    # outputs (relative paths too), trained models and Prefect's home go to the volume, which the user owns
    volume = json.loads(ins[_index(ins, "VOLUME")][1])
    assert volume == ["/data"]
    assert ins[_index(ins, "WORKDIR", last=True)][1] == "/data", "relative outputs land on the volume"
    assert _env(ins)["PREFECT_HOME"].startswith("/data/")
    uid = ins[user][1].split(":")[0]
    assert any(k == "RUN" and "/data" in a and uid in a for k, a in ins[:user]), "/data is created for the user"


def test_dockerfile_has_an_init_a_stop_signal_and_a_runner_healthcheck():
    ins = _dockerfile()
    entrypoint = json.loads(ins[_index(ins, "ENTRYPOINT")][1])
    assert entrypoint[0].rsplit("/", 1)[-1] == "tini" and entrypoint[1:] == ["--"], entrypoint
    assert json.loads(ins[_index(ins, "CMD")][1]) == ["fkd", "serve"]
    apt = ins[_index(ins, "RUN", lambda a: "apt-get install" in a)][1]
    assert re.search(r"\btini\b", apt) and "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists" in apt
    assert ins[_index(ins, "STOPSIGNAL")][1] == "SIGTERM"

    # Prefect's runner starts its webserver when PREFECT_RUNNER_SERVER_ENABLE is set (Runner.start); the names
    # are Prefect's own settings
    from prefect.settings import PREFECT_RUNNER_SERVER_ENABLE, PREFECT_RUNNER_SERVER_HOST, PREFECT_RUNNER_SERVER_PORT

    env = _env(ins)
    assert env[PREFECT_RUNNER_SERVER_ENABLE.name].lower() == "true"
    assert env[PREFECT_RUNNER_SERVER_HOST.name] in ("127.0.0.1", "localhost", "0.0.0.0")
    assert int(env[PREFECT_RUNNER_SERVER_PORT.name]) > 0
    check = ins[_index(ins, "HEALTHCHECK")][1]
    assert "/health" in check and "curl" not in check and "wget" not in check  # the slim image has neither
    # `fkd serve` answers about 2.5 min after a cold start on 2 cores: probes before then must not count
    start = re.search(r"--start-period=(\d+)s", check)
    assert start is not None and int(start.group(1)) >= 240, check


@pytest.mark.timeout(120)
def test_dockerfile_healthcheck_command_asks_the_prefect_runner_webserver(tmp_path):
    """The HEALTHCHECK's own command, with the image's settings, against Prefect's runner webserver: it passes
    while the runner answers, and fails when nothing listens."""
    from tests.conftest import free_port

    ins = _dockerfile()
    check = ins[_index(ins, "HEALTHCHECK")][1]
    command = json.loads(check[check.index("CMD") + 3 :])
    command[0] = sys.executable  # the image's `python`
    runner_env = {k: v for k, v in _env(ins).items() if k.startswith("PREFECT_RUNNER_SERVER_")}
    env = {**os.environ, **runner_env, "PREFECT_HOME": str(tmp_path / "prefect")}
    env["PREFECT_RUNNER_SERVER_PORT"] = str(free_port())

    def healthcheck() -> int:
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=30).returncode

    assert healthcheck() != 0, "passes with no runner"
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import types; from prefect.runner.server import start_webserver; "
            "start_webserver(types.SimpleNamespace(last_polled=None))",
        ],
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while healthcheck() != 0:
            assert server.poll() is None, "the runner webserver exited"
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


_GLOB = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}  # Docker's (Go's) globs, `**` included


def _dockerignore() -> list[re.Pattern]:
    """/.dockerignore's patterns as regexes over context-relative paths (a simple reading: no `!` exceptions)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "the test's reading of .dockerignore does not handle exceptions"
        tokens = re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", line.strip("/"))
        patterns.append(re.compile("".join(_GLOB.get(token) or re.escape(token) for token in tokens)))
    return patterns


def _ignored(path: str, patterns: list[re.Pattern]) -> bool:
    """Whether the path, or a folder above it, is excluded from the build context."""
    parts = path.split("/")
    return any(p.fullmatch("/".join(parts[:n])) for p in patterns for n in range(1, len(parts) + 1))


def test_dockerignore_keeps_the_context_small_and_what_the_image_copies():
    patterns = _dockerignore()
    for path in (
        ".venv",
        ".git",
        "out",
        "build",
        "fkd.egg-info",
        "fkd_core/__pycache__/x.pyc",
        ".pytest_cache",
        ".ruff_cache",
        "docker/.env",
        "tests",
        "data",
    ):
        assert _ignored(path, patterns), f"{path} is sent to the Docker build context"
    ins = _dockerfile()
    for src in (s for k, a in ins if k == "COPY" for s in _copy_sources(a)):
        assert (ROOT / src).exists(), src
        files = (
            [src]
            if (ROOT / src).is_file()
            else [p.relative_to(ROOT).as_posix() for p in (ROOT / src).rglob("*") if p.is_file()]
        )
        kept = [f for f in files if not _ignored(f, patterns)]
        assert kept, f"COPY {src}: .dockerignore excludes it"
        lost = [f for f in files if _ignored(f, patterns) and "__pycache__" not in f]
        assert not lost, f"COPY {src}: .dockerignore excludes {lost}"


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


def test_compose_runs_the_prefect_server_on_postgres():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    assert {"postgres", "prefect-server", "s3", "worker"} <= set(services)

    # the Prefect server runs on PostgreSQL (its production database), once that answers
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:15\.\d+-bookworm", postgres["image"]), "pin PostgreSQL's minor version and base"
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


def _compose() -> tuple[str, dict]:
    text = (ROOT / "docker" / "compose.yaml").read_text()
    return text, yaml.safe_load(text)["services"]


def test_compose_publishes_nothing_beyond_this_machine_and_holds_no_literal_credential():
    text, services = _compose()
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


def test_compose_wires_the_worker_to_the_server_and_the_store():
    _, services = _compose()
    env = _environment(services["worker"])
    # the worker uses the user create-buckets makes for it, never the store's root credentials
    made = _environment(services["create-buckets"])
    assert env["AWS_ACCESS_KEY_ID"] == made["FKD_S3_ACCESS_KEY"] != _environment(services["s3"])["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == made["FKD_S3_SECRET_KEY"]
    assert services["worker"]["depends_on"]["create-buckets"]["condition"] == "service_completed_successfully"
    assert env["FKD_NIGHTLY_SOURCE"] == "${FKD_NIGHTLY_SOURCE:-s3://images/incoming}"
    assert env["PREFECT_API_URL"].startswith("http://prefect-server:4200")
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / "docker" / services["worker"]["build"]["context"]).resolve() == ROOT, "the context is the root"
    # every file the Dockerfile copies exists in the build context
    for keyword, args in _dockerfile():
        if keyword == "COPY":
            for src in _copy_sources(args):
                assert (ROOT / src).exists(), src


def test_compose_worker_keeps_outputs_on_a_volume_and_stops_gracefully():
    from fkd_flows.deploy import STOP_GRACE_SECONDS

    doc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    worker = doc["services"]["worker"]
    ins = _dockerfile()
    (data,) = json.loads(ins[_index(ins, "VOLUME")][1])
    mounts = dict(str(v).rsplit(":", 1)[::-1] for v in worker.get("volumes", []))
    assert data in mounts, f"no volume on the image's {data}"
    assert mounts[data] in (doc.get("volumes") or {}), f"{mounts[data]} is not a named volume"
    grace = re.fullmatch(r"(\d+)s", str(worker["stop_grace_period"]))
    assert grace is not None and int(grace.group(1)) >= 2 * STOP_GRACE_SECONDS, worker["stop_grace_period"]


def test_prefect_yaml_needs_no_checkout_and_never_shares_a_served_name():
    """Module entrypoints and no pull step (a worker with fkd installed needs nothing else); `-pool` names, so
    `prefect deploy --all` cannot take over what `fkd serve` serves. `tests/flows/test_deploy.py` deploys it."""
    import importlib
    import inspect

    from fkd_flows.deploy import NIGHTLY, ON_DEMAND

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


def test_model_card_and_readme_name_the_shipped_checkpoint():
    """The model card's and the README's metrics are for the checkpoint that ships: both must name its model id."""
    from fkd_core.checkpoint import load_checkpoint

    shipped = load_checkpoint().model_id
    heading = re.search(r"### Shipped checkpoint: `([^`]+)`", (ROOT / "docs" / "model-card.md").read_text())
    assert heading is not None and heading.group(1) == shipped
    named = re.search(r"The shipped `([^`]+)`", (ROOT / "README.md").read_text())
    assert named is not None and named.group(1) == shipped


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
    from fkd_flows.annotate import annotate

    out = tmp_path / "out"
    # all-digit run ids: readers that type partitions by their look would make run_id a number
    annotate(source=str(sample_dir / "photos"), out=str(out), model=str(DEFAULT_MODEL), run_id="2024")
    broken = tmp_path / "more"
    broken.mkdir()
    (broken / "broken.jpg").write_bytes(b"nope")
    annotate(source=str(broken), out=str(out), model=str(DEFAULT_MODEL), run_id="2025")
    section = (ROOT / "README.md").read_text().split("## Querying the output", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2
    ns: dict = {"OUT": str(out)}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    # the README's queries leave their answers in these names
    faces_per_image = ns["faces_per_image"]
    assert dict(zip(faces_per_image["name"], faces_per_image["n_faces"], strict=True)) == {
        "the_beatles.jpg": 4,
        "obamas.jpg": 2,
        "mona_lisa.jpg": 1,
    }
    errors = ns["errors"]
    assert list(errors["image_uri"].str.rsplit("/", n=1).str[-1]) == ["broken.jpg"] and errors["error"][0]
    assert list(errors["run_id"]) == ["2025"]  # text in pandas, polars and DuckDB alike
    assert ns["polars_faces"]["run_id"].to_list() == ["2024"] * 7
    assert list(faces_per_image["run_id"]) == ["2024"] * 3
    one_face = ns["one_face"]
    assert one_face.shape == (68, 2)
    assert ns["polars_faces"].height == 7
    # faces you can trust: DuckDB and pandas agree, and both are the faces whose columns pass the thresholds
    faces = ns["polars_faces"]
    expected = {
        (u, i)
        for u, i, p, q in faces.select("image_uri", "face_index", "face_prob", "quality").iter_rows()
        if p >= 0.5 and q <= 0.1
    }
    trusted = ns["trusted"]
    assert set(zip(trusted["image_uri"], trusted["face_index"], strict=True)) == expected
    assert set(zip(ns["trusted_pd"]["image_uri"], ns["trusted_pd"]["face_index"], strict=True)) == expected
    # the turned Beatle, whose keypoints fail, is not among them; the Obamas are
    assert 0 < len(expected) < 7 and sum(u.endswith("obamas.jpg") for u, _ in expected) == 2


def test_readme_library_example_runs(tmp_path, sample_dir, monkeypatch):
    """The README's "As a library" lines run as written, on a group photo, and keep only the trusted faces."""
    text = (ROOT / "README.md").read_text().split("As a library:", 1)[1]
    block = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(ROOT)  # the README's commands run from the repository root
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    from fkd_core.predict import Face

    faces, good = ns["faces"], ns["good"]
    assert len(faces) == 4 and all(k.shape == (68, 2) for k in good)
    assert len(good) == sum(f.face_prob >= 0.5 and f.quality <= 0.1 for f in faces) == 3
    assert not Face(faces[0].box, faces[0].keypoints).trusted()  # no trust columns: never trusted


def test_constraints_pin_every_dependency_inside_its_range():
    """constraints.txt is the tested set the README's setup installs: it must pin each requirement of pyproject (and
    of its extras) to a version the range allows, or the setup would fail or install an untested version."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    problems = [
        f"{r}: pinned {pins.get(canonicalize_name(r.name))}"
        for r in reqs
        if canonicalize_name(r.name) != "fkd"
        and not (canonicalize_name(r.name) in pins and r.specifier.contains(pins[canonicalize_name(r.name)]))
    ]
    assert not problems, problems


def test_compose_services_report_health_within_bounded_time():
    _, services = _compose()
    for name in ("postgres", "prefect-server", "s3"):
        check = services[name]["healthcheck"]
        assert check.get("timeout") and check.get("retries"), (name, check)
    assert services["prefect-server"]["healthcheck"]["start_period"]  # its first start migrates the database
    assert "timeout=" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert services["s3"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert services["create-buckets"]["depends_on"]["s3"]["condition"] == "service_healthy"


def _create_buckets(
    tmp_path, alias_fails: bool, attach_says: str | None = None
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run create-buckets' script as compose hands it to the container's shell, with an `mc` that records its
    arguments (and refuses the root credentials if asked) and a `sleep` that returns at once."""
    _, services = _compose()
    service = services["create-buckets"]
    script = service["command"][0].replace("$$", "$")  # compose's escape for the container's shell
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    mc = bin_dir / "mc"
    fail = 'if [ "$1 $2" = "alias set" ]; then exit 1; fi' if alias_fails else ""
    if attach_says:  # mc refuses the attach with this message
        fail += f'\nif [ "$1 $2 $3" = "admin policy attach" ]; then echo "{attach_says}" >&2; exit 1; fi'
    keep_policy = f'if [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" {tmp_path}/policy.json; fi'
    mc.write_text(f'#!/bin/sh\nprintf "%s\\037" "$@" >> {calls}; echo >> {calls}\n{fail}\n{keep_policy}\n')
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MINIO_ROOT_USER": "root-user", "MINIO_ROOT_PASSWORD": "root-pass",
           "FKD_S3_ACCESS_KEY": "fkd-user", "FKD_S3_SECRET_KEY": "fkd-secret"}  # fmt: skip
    entry = service["entrypoint"]
    done = subprocess.run([*entry, script], env=env, capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return done, [line.split("\x1f")[:-1] for line in lines]


def test_create_buckets_gives_up_on_refused_root_credentials(tmp_path):
    done, calls = _create_buckets(tmp_path, alias_fails=True)
    assert done.returncode != 0 and "refused MINIO_ROOT_USER/MINIO_ROOT_PASSWORD 30 times" in done.stderr
    assert len(calls) == 30 and all(c[:2] == ["alias", "set"] for c in calls)


def test_create_buckets_makes_the_buckets_and_a_worker_user_limited_to_them(tmp_path):
    done, calls = _create_buckets(tmp_path, alias_fails=False)
    assert done.returncode == 0, done.stderr
    assert calls[0] == ["alias", "set", "local", "http://s3:9000", "root-user", "root-pass"]
    assert ["mb", "--ignore-existing", "local/images", "local/keypoints"] in calls
    assert ["admin", "user", "add", "local", "fkd-user", "fkd-secret"] in calls
    assert ["admin", "policy", "attach", "local", "fkd-worker", "--user", "fkd-user"] in calls
    policy = json.loads((tmp_path / "policy.json").read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::images", "arn:aws:s3:::keypoints", "arn:aws:s3:::images/*",
                         "arn:aws:s3:::keypoints/*"}  # fmt: skip
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert not any(a.startswith("admin:") or a == "s3:*" for a in actions)
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions


@pytest.mark.parametrize("message,ok", [("policy is already attached to the user", True), ("Access Denied.", False)])
def test_create_buckets_passes_a_rerun_s_attach_and_fails_any_other_refusal(tmp_path, message, ok):
    done, calls = _create_buckets(tmp_path, alias_fails=False, attach_says=message)
    assert (done.returncode == 0) is ok, done.stderr
    assert ok or f"create-buckets: {message}" in done.stderr
