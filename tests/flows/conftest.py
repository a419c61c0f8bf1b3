"""Fixtures for flow tests: one Prefect test harness per session, and real local services started by PID."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.services import spawn

BIN = Path(sys.executable).parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15 package
SECRET = "fkd-sentinel-secret-7f3a"  # moto accepts any credentials; the tests check this never leaks


def pytest_collection_modifyitems(items):
    """Every test under tests/flows runs Prefect (flows, the CLI, served deployments): it is a ``flows`` test, so
    ``pytest -m "not flows"`` runs the library's tests alone, in seconds."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.flows)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(600))  # servers and whole runs; the library's tests get 120 s


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the session, started only when a test that runs flows asks for it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _flows_use_the_harness(request):
    if request.node.get_closest_marker("flows") is not None:
        request.getfixturevalue("prefect_harness")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process group we started, by PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1; sets the standard AWS variables so s3fs (and subprocesses) use it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = spawn(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    try:
        wait_http(f"{endpoint}/moto-api/")
        yield endpoint
    finally:
        stop(proc)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3fs_clean(s3_server):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""
    port = free_port()
    logdir = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        procs.append(
            spawn(
                [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                stdout=open(logdir / "scheduler.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
        for i in range(2):
            procs.append(
                spawn(
                    [
                        str(BIN / "dask"),
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--name",
                        f"w{i}",
                        "--memory-limit",
                        "4GB",
                    ],
                    stdout=open(logdir / f"worker{i}.log", "w"),
                    stderr=subprocess.STDOUT,
                )
            )
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            stop(p)


_PG_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}  # no PG* variables from the caller
# initdb, pg_ctl and postgres refuse to run as root: run them as the postgres user, with only _PG_ENV
_AS_POSTGRES = {"user": "postgres", "group": "postgres", "extra_groups": [], "env": _PG_ENV}


def _as_postgres(
    cmd: list[str], cwd: Path, timeout: float = 120, password: str | None = None
) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as the ``postgres`` user (initdb, pg_ctl and postgres refuse to run as root),
    with ``password`` as PGPASSWORD for the client tools."""
    kw = dict(_AS_POSTGRES)
    if password is not None:
        kw["env"] = {**_PG_ENV, "PGPASSWORD": password}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has already exited
    except (FileNotFoundError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except (FileNotFoundError, ValueError):
            pass
    return kids


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (password auth, SCRAM, as docs/operations.md sets one up;
    sockets in its own temp dir) with a ``prefect`` database; yields its SQLAlchemy URL for Prefect, password
    included. Stopped by PID and removed at teardown.

    The postmaster is started directly (not by ``pg_ctl start``, which detaches it) so that it is our child:
    we reap it, and ``stop`` can kill its whole process group, backends included."""
    missing = [n for n in ("initdb", "postgres", "pg_ctl", "pg_isready", "createdb") if not (PG_BIN / n).is_file()]
    if missing:
        pytest.fail(
            f"PostgreSQL 15 binaries {missing} not found in {PG_BIN}: install Debian's postgresql-15 package "
            "(apt-get install postgresql-15)",
            pytrace=False,
        )
    port = free_port()
    base = Path(tempfile.mkdtemp(prefix="fkd-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    password = secrets.token_hex(12)
    pwfile = base / "password"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, "postgres", "postgres")
    pwfile.chmod(0o600)
    proc = None
    pid = None
    try:
        out = _as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256"]
            + [f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=base,
        )
        pwfile.unlink()
        assert out.returncode == 0, f"initdb failed:\n{out.stdout}\n{out.stderr}"
        with open(base / "postgres.log", "w") as log:
            proc = spawn(
                [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base)]
                + ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
                cwd=base,
                stdout=log,
                stderr=subprocess.STDOUT,
                stop_signal=signal.SIGINT,  # PostgreSQL's fast shutdown, should pytest die first
                **_AS_POSTGRES,
            )
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "2"],
                env=_PG_ENV,
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (base / "postgres.log").read_text()[-3000:]
                pytest.fail(f"PostgreSQL did not start on 127.0.0.1:{port}:\n{log_text}", pytrace=False)
            time.sleep(0.2)
        pid = int((data / "postmaster.pid").read_text().split()[0])
        assert pid == proc.pid
        createdb = [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"]
        out = _as_postgres(createdb, cwd=base, password=password)
        assert out.returncode == 0, f"createdb failed:\n{out.stdout}\n{out.stderr}"
        yield f"postgresql+asyncpg://postgres:{password}@127.0.0.1:{port}/prefect"
    finally:
        if proc is not None:
            if proc.poll() is None:
                _as_postgres([str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "30"], base)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            if pid is not None and _pid_alive(pid):
                # pg_ctl could not stop it: kill the postmaster by the PID in postmaster.pid, and its children
                # (each backend is its own process group leader, so killing the postmaster's group misses them)
                children = _children(pid)
                os.kill(pid, signal.SIGKILL)
                for child in children:
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            stop(proc)  # reaps the postmaster
        shutil.rmtree(base, ignore_errors=True)


def start_prefect_server(
    tmp_path: Path, env: dict[str, str], db_url: str | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on 127.0.0.1 and a free port, with its own PREFECT_HOME under ``tmp_path``
    and its database at ``db_url`` (SQLite in that home when None). Returns the process and its API URL once
    /api/health answers; the caller stops it with ``stop``. Output goes to ``tmp_path / "server.log"``."""
    port = free_port()
    home = tmp_path / "prefect-server-home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    env.pop("PREFECT_API_URL", None)  # the server is not a client of another API
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    if db_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = db_url
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    with open(tmp_path / "server.log", "w") as log:
        proc = spawn(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api_url}/health", timeout=120)
    except BaseException:
        stop(proc)
        tail = (tmp_path / "server.log").read_text()[-3000:]
        raise RuntimeError(f"prefect server did not become healthy; server.log ends:\n{tail}") from None
    return proc, api_url
