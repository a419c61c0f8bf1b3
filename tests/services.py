"""Services the tests start (a Prefect server, moto, PostgreSQL, Dask, `fkd serve`) end with the test session,
however it ends.

- :func:`spawn` starts each in a process group of its own (so it is stopped with its children) and, where
  util-linux's ``setpriv`` exists, with a parent-death signal: the kernel stops it if pytest is killed outright.
- SIGTERM to pytest is turned into KeyboardInterrupt, as Ctrl-C is, so that fixtures' teardowns run.
- Whatever is still alive when pytest exits (a teardown that never ran) is stopped by its process group.

A pytest plugin (``-p tests.services``), loaded by the root conftest.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence

_STARTED: list[subprocess.Popen] = []


def spawn(cmd: Sequence[str], *, stop_signal: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` in a new session, sent ``stop_signal`` by the kernel should this
    process die first (SIGINT suits PostgreSQL: a fast shutdown), and stopped at exit if still running."""
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():  # the signal follows the forking thread
        cmd = [setpriv, f"--pdeathsig={signal.Signals(stop_signal).name}", *cmd]
    proc = subprocess.Popen(list(cmd), start_new_session=True, **kwargs)
    _STARTED.append(proc)
    return proc


def stop_all(grace: float = 10.0) -> list[int]:
    """Stop every spawned process still running, by process group: SIGTERM, then SIGKILL. Returns their PIDs."""
    alive = [p for p in _STARTED if p.poll() is None]
    for proc in alive:
        _signal_group(proc, signal.SIGTERM)
    for proc in alive:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=grace)
    _STARTED.clear()
    return [p.pid for p in alive]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def pytest_configure(config) -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    atexit.register(stop_all)


def pytest_unconfigure(config) -> None:
    stop_all()  # after every fixture's teardown: only what a teardown missed
