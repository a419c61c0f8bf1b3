"""A real `prefect server` (SQLite) and `fkd serve` on 127.0.0.1: the scheduled deployment runs and writes Parquet."""

import os
import shutil
import subprocess
import time

import httpx
import pytest

from fkd_core.parquet_io import output_tables
from tests.conftest import free_port
from tests.flows.conftest import BIN, stop, wait_http

pytestmark = [pytest.mark.flows, pytest.mark.server]


def test_served_schedule_runs_and_writes_parquet(tmp_path, sample_dir, model_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    src = tmp_path / "bucket"
    shutil.copytree(sample_dir / "photos", src)
    out = tmp_path / "out"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=base_env,
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )
    worker = None
    try:
        wait_http(f"{api}/health", timeout=120)
        env = base_env | {
            "PREFECT_API_URL": api,
            "FKD_NIGHTLY_SOURCE": str(src),
            "FKD_NIGHTLY_OUT": str(out),
            "FKD_MODEL": model_path,
        }
        worker = subprocess.Popen(
            [str(BIN / "fkd"), "serve", "--interval", "5"],
            env=env,
            cwd=tmp_path,
            stdout=open(tmp_path / "serve.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # noqa: SIM115
        )
        completed = []
        deadline = time.monotonic() + 240
        with httpx.Client(base_url=api, timeout=10) as client:
            while time.monotonic() < deadline and not completed:
                assert worker.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                resp = client.post(
                    "/flow_runs/filter",
                    json={
                        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                        "limit": 10,
                    },
                )
                resp.raise_for_status()
                completed = resp.json()
                time.sleep(1)
            assert completed, "no scheduled run completed in time:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            deployments = client.post("/deployments/filter", json={}).json()
        names = {d["name"] for d in deployments}
        assert {"nightly-incremental", "on-demand"} <= names
        nightly = next(d for d in deployments if d["name"] == "nightly-incremental")
        assert completed[0]["deployment_id"] == nightly["id"]
        images = output_tables(str(out))["images"].to_table()
        # runs keep coming every 5 s; with one run at a time, each image is annotated exactly once
        assert sorted(u.rsplit("/", 1)[-1] for u in images.column("image_uri").to_pylist()) == [
            "mona_lisa.jpg",
            "obamas.jpg",
            "the_beatles.jpg",
        ]
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
    assert server.poll() is not None and worker.poll() is not None
