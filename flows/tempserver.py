"""The temporary Prefect API server a CLI run uses when no ``PREFECT_API_URL`` is set, owned by fkd.

Prefect would start one itself, but it stops it only from an ``atexit`` hook; a run stopped by SIGTERM (which
Prefect's engine re-raises after recording the crash) or killed outright never runs that hook, and the server
lives on. fkd starts the same server (uvicorn on Prefect's app, on 127.0.0.1, its database in ``PREFECT_HOME``)
as a child that the kernel stops when fkd's process ends, however it ends (Linux's parent-death signal), and
stops it itself on every normal exit. It is in a session of its own, so Ctrl-C in a terminal reaches fkd (which
records the run as interrupted) and not the server the run reports to.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fkd_core.errors import UserError
from fkd_core.storage import check_writable

# Run in the child before uvicorn: ask the kernel for SIGTERM when the parent dies, and exit at once if it
# already has (it may die between fork and prctl). Elsewhere than Linux there is no prctl: fkd's own stop stays.
_CHILD = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != parent:
    sys.exit(0)
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_prefect_home() -> None:
    """Without a Prefect API to report to, refuse in one line a ``PREFECT_HOME`` that cannot be created or written:
    a temporary server could not keep its database there, and Prefect would retry starting it without end.

    Checked first from the environment, before Prefect is imported (which warns about such a home, and goes on);
    only if that check fails are Prefect's own settings (its profile, ``prefect.toml``) asked whether an API URL
    or another home is set there."""
    if os.environ.get("PREFECT_API_URL"):
        return
    home = os.path.expanduser(os.environ.get("PREFECT_HOME") or "~/.prefect")
    try:
        check_writable(home, f"PREFECT_HOME {home}")
        return
    except UserError as e:
        refusal = e
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Prefect warns that it cannot create the home we are about to name
        from prefect.settings import get_current_settings

        settings = get_current_settings()
    if settings.api.url:
        return
    if os.path.realpath(settings.home) != os.path.realpath(home):
        try:
            check_writable(str(settings.home), f"PREFECT_HOME {settings.home}")
            return
        except UserError as e:
            refusal = e
    raise UserError(
        f"{refusal}; set PREFECT_HOME to a writable directory, or PREFECT_API_URL to a Prefect server"
    ) from None


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Yield the API URL runs report to: the configured one, or a temporary server's, started here and stopped
    when the block ends (or, on Linux, when this process dies). A server that cannot start is a
    :class:`~fkd_core.errors.UserError` naming why, after one try."""
    import httpx
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield settings.api.url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }
    env.pop("PREFECT_API_URL", None)
    args = ["--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    log = tempfile.TemporaryFile()  # the server's output, for the reason should it fail; gone with the file
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(os.getpid()), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + settings.server.ephemeral.startup_timeout_seconds
        with httpx.Client(timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    tail = log.read()[-4000:].decode(errors="replace").strip().splitlines()[-1:]
                    raise UserError(
                        f"the temporary Prefect server exited with code {proc.returncode} before it answered"
                        f"{': ' + tail[0] if tail else ''}; PREFECT_HOME is {settings.home}"
                    )
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise UserError(
                        f"the temporary Prefect server on {url} did not answer within "
                        f"{settings.server.ephemeral.startup_timeout_seconds:g} s "
                        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to a running server"
                    )
                time.sleep(0.1)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_to_server()
        stop(proc)
        log.close()


def _drain_to_server(timeout: float = 10.0) -> None:
    """Send the logs and events still queued for the server before it stops (Prefect would flush them at exit,
    to a server that is gone by then)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout, at_exit=False)
        except Exception:  # a log line that cannot be delivered must not fail the run
            pass


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
