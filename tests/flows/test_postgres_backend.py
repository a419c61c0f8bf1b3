"""The production backend: a real Prefect server on a real PostgreSQL (what docker/compose.yaml runs)."""

from __future__ import annotations

import json
import os
import subprocess
from urllib.parse import urlsplit

import httpx
import pytest

from tests.flows.conftest import start_prefect_server, stop

pytestmark = [pytest.mark.flows, pytest.mark.server]


def _psql(db_url: str, sql: str, password: str | None = None, check: bool = True) -> str:
    url = urlsplit(db_url)
    out = subprocess.run(
        ["/usr/bin/psql", "-h", "127.0.0.1", "-p", str(url.port), "-U", "postgres", "-d", "prefect", "-tAc", sql],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PGPASSWORD": url.password if password is None else password},
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out.stdout.strip() if out.returncode == 0 else out.stderr


def test_prefect_server_runs_on_postgres(tmp_path, postgres_url):
    import prefect

    proc, api = start_prefect_server(tmp_path, os.environ.copy(), db_url=postgres_url)
    try:
        with httpx.Client(base_url=api, timeout=30) as client:
            version = client.get("/admin/version")
            assert version.status_code == 200 and version.json() == prefect.__version__
            runs = client.post("/flow_runs/filter", json={"limit": 10})
            assert runs.status_code == 200 and isinstance(runs.json(), list)  # the cluster is per session
            flow = client.post("/flows/", json={"name": "fkd-postgres-check"})
            assert flow.status_code in (200, 201), flow.text
            found = client.post("/flows/filter", json={"flows": {"name": {"any_": ["fkd-postgres-check"]}}})
            assert [f["id"] for f in found.json()] == [flow.json()["id"]]
        # what the API wrote is in PostgreSQL, in Prefect's schema (not in a SQLite file in PREFECT_HOME)
        assert _psql(postgres_url, "select count(*) from information_schema.tables where table_name='flow_run'") == "1"
        assert _psql(postgres_url, "select id from flow where name='fkd-postgres-check'") == flow.json()["id"]
        assert not list((tmp_path / "prefect-server-home").glob("*.db"))
        # the cluster checks passwords, as the one docs/operations.md sets up: the URL's password is what let in
        assert "password authentication failed" in _psql(postgres_url, "select 1", password="wrong", check=False)
    finally:
        stop(proc)
    assert proc.poll() is not None


def test_served_deployments_run_end_to_end_on_postgres(tmp_path, postgres_url, sample_dir, sample_csv, model_path):
    """The production path: `fkd serve` against a Prefect server on PostgreSQL, the README's on-demand commands
    for ingest -> train -> evaluate -> annotate, each run by the served deployments to completion."""
    from fkd_core.checkpoint import load_checkpoint
    from fkd_core.runs import list_runs
    from tests.flows.test_deploy import Serve, client_env, deployment_id, run_readme_command, wait_for, wait_state

    proc, api = start_prefect_server(tmp_path, os.environ.copy(), db_url=postgres_url)
    env = client_env(api, tmp_path / "home") | {"FKD_MODEL": model_path}
    serve = Serve(tmp_path, env)
    try:
        wait_for("the on-demand deployments", lambda: deployment_id(api, "evaluate/on-demand"), 120, serve)
        models = tmp_path / "models"
        steps = [
            ("ingest", {"csv": str(sample_csv), "images": str(sample_dir / "images"), "out": str(tmp_path / "ingest")}),
            (
                "train",
                {
                    "examples": str(tmp_path / "ingest" / "examples"),
                    "name": "retrained",
                    "out_dir": str(models),
                    "epochs": "1",
                    "threads": "1",
                },
            ),
            (
                "evaluate",
                lambda: {
                    "csv": str(sample_csv),
                    "images": str(sample_dir / "images"),
                    "out": str(tmp_path / "eval"),
                    # the new checkpoint, named by its weights' sha256 (as its train run logged)
                    "model": str(next(models.glob("retrained-*.safetensors"))),
                },
            ),
            ("annotate", {"source": str(sample_dir / "photos"), "out": str(tmp_path / "annotated")}),
        ]
        for flow, values in steps:
            run = run_readme_command(flow, env, values() if callable(values) else values, tmp_path)
            wait_state(api, run, {"COMPLETED"}, 300, serve)
        report = json.loads((tmp_path / "ingest" / "ingest_report.json").read_text())
        assert report["rows_kept"] == 60
        (weights,) = models.glob("retrained-*.safetensors")
        retrained = load_checkpoint(weights)
        assert weights.stem == retrained.model_id
        assert retrained.meta["train"]["epochs_run"] == 1
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert metrics["model_id"] == retrained.model_id and metrics["metrics"]["faces"] == 60
        (record,) = list_runs(str(tmp_path / "annotated"))
        assert record["status"] == "completed" and record["counts"]["faces"] == 7
        # the flow runs are in PostgreSQL
        assert int(_psql(postgres_url, "select count(*) from flow_run where state_type = 'COMPLETED'")) >= 4
    finally:
        stop(serve.proc)
        stop(proc)
