"""Deployments for real: a `prefect server` (SQLite here; PostgreSQL in test_postgres_backend.py), `fkd serve`,
the README's `prefect deployment run` commands, SIGTERM, a killed serve, and `prefect deploy --all` + a worker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fkd_core.parquet_io import output_tables
from fkd_core.runs import list_runs, read_run
from tests.conftest import ROOT, SHARED_DATA
from tests.flows.conftest import BIN, start_prefect_server, stop
from tests.services import spawn

pytestmark = [pytest.mark.flows, pytest.mark.server]


def client_env(api: str, home: Path) -> dict[str, str]:
    """The environment of a process that talks to the test's Prefect server (and nothing else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FKD_"))}
    return env | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # fkd and prefect, as in an activated environment
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # Prefect's minimum; the zombie automation waits 3 beats
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefect-server")
    proc, api = start_prefect_server(tmp, dict(os.environ))
    yield api
    stop(proc)


class Serve:
    """`fkd serve` in its own process group, its log in a file."""

    def __init__(self, tmp: Path, env: dict[str, str], *args: str) -> None:
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self.proc = spawn(
            [str(BIN / "fkd"), "serve", *args],
            env=env,
            cwd=tmp,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
        )

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def engines(self) -> int:
        """Flow-run processes this serve has running now."""
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid), "-f", "prefect.engine"], capture_output=True)
        return len(out.stdout.split())


def api_client(api: str) -> httpx.Client:
    return httpx.Client(base_url=api, timeout=30)


def wait_for(what: str, check, timeout: float, serve: Serve | None = None, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serve is not None:
            assert serve.proc.poll() is None, f"fkd serve exited:\n{serve.tail()}"
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} within {timeout} s" + (f"\n{serve.tail()}" if serve else ""))


def flow_run(api: str, run_id: str) -> dict:
    with api_client(api) as c:
        return c.get(f"/flow_runs/{run_id}").json()


def deployment_id(api: str, name: str) -> str | None:
    flow, dep = name.split("/")
    with api_client(api) as c:
        r = c.get(f"/deployments/name/{flow}/{dep}")
        return r.json()["id"] if r.status_code == 200 else None


def readme_commands() -> dict[str, str]:
    """The README's `prefect deployment run '<flow>/on-demand' ...` lines, by flow."""
    text = (ROOT / "README.md").read_text()
    return {m.group(1): m.group(0) for m in re.finditer(r"prefect deployment run '(\w+)/on-demand'[^\n]*", text)}


def run_readme_command(flow: str, env: dict[str, str], values: dict[str, str], cwd: Path) -> str:
    """Run the README's command for ``flow`` as shown, each `--param name=` given this test's value; returns
    the flow run id it created."""
    shown = readme_commands()[flow]
    args = shown.split()[1:]  # without the leading `prefect`
    args = [a.strip("'") for a in args]
    for i, a in enumerate(args):
        if args[i - 1] == "--param":
            name = a.split("=", 1)[0]
            assert name in values, f"the README's {flow} command sets {name}, which this test does not give"
            args[i] = f"{name}={values[name]}"
    shown_names = {a.split("=", 1)[0] for i, a in enumerate(args) if args[i - 1] == "--param"}
    for name in sorted(set(values) - shown_names):  # the test's own extras (small epochs, a temp out_dir)
        args += ["--param", f"{name}={values[name]}"]
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"flow-run/([0-9a-f-]{36})", out.stdout).group(1)


def wait_state(api: str, run_id: str, types: set[str], timeout: float, serve: Serve | None = None) -> dict:
    def check():
        run = flow_run(api, run_id)
        assert run["state"]["type"] not in {"FAILED", "CRASHED"} - types, run["state"]
        return run if run["state"]["type"] in types else None

    return wait_for(f"flow run {run_id} in {types}", check, timeout, serve)


def copy_frames(dst: Path, n: int) -> Path:
    """``n`` real frames of the full training set (``../shared/data``)."""
    dst.mkdir(parents=True)
    training = SHARED_DATA / "facial-keypoints" / "training"
    if not training.is_dir():
        pytest.skip(f"needs the full training set beside the checkout ({training})")
    frames = sorted(training.iterdir())[:n]
    assert len(frames) == n, f"the full training set is read from {SHARED_DATA}"
    for f in frames:
        shutil.copy(f, dst / f.name)
    return dst


def test_nightly_runs_on_quiet_nights_wait_in_prefect_and_on_demand_runs_as_documented(
    server, tmp_path, sample_dir, model_path
):
    src = tmp_path / "incoming"
    shutil.copytree(sample_dir / "photos", src)
    out = tmp_path / "keypoints"
    env = client_env(server, tmp_path / "home") | {
        "FKD_NIGHTLY_SOURCE": str(src),
        "FKD_NIGHTLY_OUT": str(out),
        "FKD_MODEL": model_path,
        "FKD_SHARD_SIZE": "2",  # a setting every run where it runs takes, the nightly and the on-demand alike
    }
    serve = Serve(tmp_path, env, "--interval", "2")
    most_engines, most_active = 0, 0
    try:
        nightly = wait_for("the nightly deployment", lambda: deployment_id(server, "annotate/nightly-incremental"), 120)

        def completed_nightly_runs():
            nonlocal most_engines, most_active
            most_engines = max(most_engines, serve.engines())
            with api_client(server) as c:
                active = c.post(
                    "/flow_runs/filter",
                    json={
                        "deployments": {"id": {"any_": [nightly]}},
                        "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}},
                    },
                ).json()
                most_active = max(most_active, len(active))
                runs = c.post(
                    "/flow_runs/filter",
                    json={
                        "deployments": {"id": {"any_": [nightly]}},
                        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                    },
                ).json()
            return runs if len(runs) >= 3 else None

        wait_for("three completed nightly runs", completed_nightly_runs, 240, serve, every=0.3)
        # runs fell due every 2 s, each taking longer: one ran at a time and the others waited in Prefect, not as
        # processes (a finishing run's process may overlap the next one's start for a moment)
        assert most_active == 1 and most_engines <= 2
        with api_client(server) as c:
            all_runs = c.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [nightly]}}}).json()
            states = [
                s["name"] for r in all_runs for s in c.get("/flow_run_states/", params={"flow_run_id": r["id"]}).json()
            ]
        assert "AwaitingConcurrencySlot" in states
        assert not [r for r in all_runs if r["state"]["type"] in ("FAILED", "CRASHED")]
        # the first run annotated the three photos; later ones (a quiet night: nothing new) completed with zeros
        records = [r for r in list_runs(str(out)) if r["status"] == "completed"]
        assert len(records) >= 3
        assert records[0]["counts"]["images"] == 3 and records[0]["counts"]["faces"] == 7
        assert (records[0]["config"]["shard_size"], records[0]["shards"]) == (2, 2)  # FKD_SHARD_SIZE
        assert all(r["counts"] == dict.fromkeys(("images", "ok", "no_face", "error", "faces"), 0) for r in records[1:])
        assert all(r["skipped_existing"] == 3 for r in records[1:])
        images = output_tables(str(out))["images"].to_table().column("image_uri").to_pylist()
        assert sorted(Path(u).name for u in images) == ["mona_lisa.jpg", "obamas.jpg", "the_beatles.jpg"]

        # on demand, with the README's command
        demand_out = tmp_path / "on-demand"
        values = {"source": str(sample_dir / "photos"), "out": str(demand_out)}
        run = run_readme_command("annotate", env, values, tmp_path)
        wait_state(server, run, {"COMPLETED"}, 180, serve)
        (record,) = list_runs(str(demand_out))
        assert record["status"] == "completed" and record["counts"]["faces"] == 7
        assert (record["config"]["shard_size"], record["shards"]) == (2, 2)  # FKD_SHARD_SIZE, not given
        assert record["run_id"].endswith(run.replace("-", "")[-8:])  # the fkd run id follows the flow run

        # a run given a path that does not exist fails with that one line, in its state and in the serve log,
        # without a traceback in the log
        missing = tmp_path / "no-such-folder"
        before = len(serve.log.read_text())
        run = run_readme_command("annotate", env, {"source": str(missing), "out": str(demand_out)}, tmp_path)
        state = wait_state(server, run, {"FAILED"}, 180, serve)["state"]
        assert f"source {missing} does not exist" in state["message"]
        logged = wait_for("the failed run's log line", lambda: (t := serve.log.read_text()[before:]) and
                          f"source {missing} does not exist" in t and t, 30)  # fmt: skip
        assert "Traceback" not in logged and "raise SourceNotFound" not in logged, logged[-3000:]
    finally:
        stop(serve.proc)
    assert serve.proc.poll() is not None


def test_sigterm_stops_serve_fast_and_the_interrupted_run_resumes_and_a_killed_one_is_crashed(
    server, tmp_path, model_path
):
    src = copy_frames(tmp_path / "frames", 900)
    out = tmp_path / "out"
    env = client_env(server, tmp_path / "home") | {"FKD_MODEL": model_path}
    serve = Serve(tmp_path, env)
    wait_for("the on-demand deployment", lambda: deployment_id(server, "annotate/on-demand"), 120, serve)
    values = {"source": str(src), "out": str(out), "shard_size": "100"}
    run = run_readme_command("annotate", env, values, tmp_path)
    parts = out / "images"
    wait_for("a first finished shard", lambda: parts.is_dir() and any(parts.rglob("part-*.parquet")), 180, serve)
    (record,) = list_runs(str(out))
    assert record["status"] == "running"

    t0 = time.monotonic()
    os.kill(serve.proc.pid, signal.SIGTERM)
    serve.proc.wait(timeout=30)
    stopped_in = time.monotonic() - t0
    # it stops after STOP_GRACE_SECONDS at most (about 7 s idle, printed below); compose allows 30 s, and a
    # loaded machine needs room
    assert stopped_in < 20, f"fkd serve took {stopped_in:.1f} s to stop:\n{serve.tail()}"
    state = flow_run(server, run)["state"]
    assert state["type"] == "SCHEDULED", state  # back in the queue, not Running forever nor Cancelled
    (record,) = list_runs(str(out))
    assert (record["status"], record["error"]) == ("interrupted", "interrupted by SIGTERM; rerun the run id to resume")
    done_before = record["counts"]["images"]
    assert 0 < done_before < 900

    # served again, the same flow run resumes the same fkd run: only the unfinished shards run
    serve = Serve(tmp_path, env)
    try:
        wait_state(server, run, {"COMPLETED"}, 300, serve)
        (record,) = list_runs(str(out))
        assert (record["status"], record["attempts"], record["counts"]["images"]) == ("completed", 2, 900)
        assert record["shards_run_now"] == record["shards"] - done_before // 100 < record["shards"]

        # a serve killed outright (SIGKILL to it and its flow run) leaves no run Running: the heartbeat
        # automation marks it Crashed; its fkd record stays resumable
        out2 = tmp_path / "out2"
        run2 = run_readme_command("annotate", env, values | {"out": str(out2)}, tmp_path)
        parts2 = out2 / "images"
        wait_for("a first shard", lambda: parts2.is_dir() and any(parts2.rglob("part-*.parquet")), 180, serve)
        os.killpg(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(timeout=30)
        killed_at = time.monotonic()
        # the last heartbeat was at most 30 s before the kill; the automation waits three beats after it
        wait_state(server, run2, {"CRASHED"}, 240)  # 120 s idle; room for a loaded machine
        crashed_after = time.monotonic() - killed_at
        print(f"fkd serve stopped by SIGTERM in {stopped_in:.1f} s; a killed run Crashed {crashed_after:.0f} s after")
        (record,) = list_runs(str(out2))
        resumed = subprocess.run(
            [str(BIN / "fkd"), "annotate", str(src), str(out2), "--run-id", record["run_id"], "--model", model_path],
            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
            capture_output=True,
            text=True,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        final = read_run(str(out2), record["run_id"])
        assert (final["status"], final["attempts"], final["counts"]["images"]) == ("completed", 2, 900)
    finally:
        stop(serve.proc)


def _prefect(*args: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The ``prefect`` CLI of this environment, its output captured as text."""
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True)


def _check_pool_deployments(server) -> None:
    """What ``prefect deploy --all`` made of prefect.yaml and the fkd settings."""
    with api_client(server) as c:
        deps = {(d["entrypoint"], d["name"]): d for d in c.post("/deployments/filter", json={}).json()}
    nightly = deps[("fkd_flows.annotate:annotate", "nightly-incremental-pool")]
    assert nightly["parameters"] == {"source": "s3://images/incoming", "out": "s3://keypoints/out", "incremental": True}
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["30 3 * * *"]
    assert nightly["pull_steps"] == [] and nightly["work_pool_name"] == "fkd-cpu"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    for flow in ("annotate", "ingest", "train", "evaluate"):
        assert deps[(f"fkd_flows.{flow}:{flow}", "on-demand-pool")]["work_pool_name"] == "fkd-cpu"


def _run_on_the_pool(server, env: dict, work: Path, tmp_path: Path, sample_dir: Path, model_path: str) -> None:
    """A worker where fkd is installed, started outside the checkout, runs the on-demand deployment."""
    worker = spawn(
        [str(BIN / "prefect"), "worker", "start", "--pool", "fkd-cpu"],
        env=env,
        cwd=work,
        stdout=open(tmp_path / "worker.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        out = tmp_path / "pool-out"
        params = [f"source={sample_dir / 'photos'}", f"out={out}", f"model={model_path}"]
        started = _prefect(
            "deployment", "run", "annotate/on-demand-pool", *(a for p in params for a in ("--param", p)), env=env
        )
        assert started.returncode == 0, started.stdout + started.stderr
        run = re.search(r"flow-run/([0-9a-f-]{36})", started.stdout).group(1)
        wait_state(server, run, {"COMPLETED"}, 240)
        (record,) = list_runs(str(out))
        assert record["status"] == "completed" and record["counts"]["faces"] == 7
    finally:
        stop(worker)


def test_prefect_yaml_deploys_from_fkd_settings_and_a_worker_runs_it_without_a_checkout(
    server, tmp_path, sample_dir, model_path
):
    env = client_env(server, tmp_path / "home") | {
        "FKD_NIGHTLY_SOURCE": "s3://images/incoming",
        "FKD_NIGHTLY_OUT": "s3://keypoints/out",
        "FKD_NIGHTLY_CRON": "30 3 * * *",
    }
    pool = _prefect("work-pool", "create", "fkd-cpu", "--type", "process", env=env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    work = tmp_path / "not-a-checkout"
    work.mkdir()
    prefect_yaml = str(ROOT / "prefect.yaml")
    deployed = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", prefect_yaml, env=env, cwd=work)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    _check_pool_deployments(server)
    # a setting that is not set fails the deploy, naming it
    unset = {k: v for k, v in env.items() if k != "FKD_NIGHTLY_OUT"}
    failed = _prefect(
        "--no-prompt",
        "deploy",
        "--name",
        "nightly-incremental-pool",
        "--prefect-file",
        prefect_yaml,
        env=unset,
        cwd=work,
    )
    assert failed.returncode != 0 and "nightly_out is not set" in failed.stdout + failed.stderr
    _run_on_the_pool(server, env, work, tmp_path, sample_dir, model_path)
    # `fkd serve` does not take over a deployment of one of its names that lives on a work pool
    taken = _prefect(
        "--no-prompt",
        "deploy",
        "fkd_flows.annotate:annotate",
        "--name",
        "on-demand",
        "--pool",
        "fkd-cpu",
        env=env,
        cwd=work,
    )
    assert taken.returncode == 0, taken.stdout[-2000:] + taken.stderr[-2000:]
    refused = subprocess.run(
        [str(BIN / "fkd"), "serve"], env=env, cwd=work, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "exists on work pool 'fkd-cpu'" in refused.stderr
    assert "Traceback" not in refused.stderr
    with api_client(server) as c:
        c.delete(f"/deployments/{deployment_id(server, 'annotate/on-demand')}")
