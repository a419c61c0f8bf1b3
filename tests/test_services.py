"""The services a test session starts end with it, however it ends (tests/services.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

CHILD_TESTS = """
import sys, time
from pathlib import Path

import pytest

from tests.services import spawn

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def service():
    # a service with a child of its own, whose fixture has no teardown at all: only tests/services.py stops them
    proc = spawn(["sh", "-c", f"sleep 600 & echo $! > {HERE / 'child.pid'}; wait"])
    (HERE / "service.pid").write_text(str(proc.pid))
    yield proc


def test_runs_until_stopped(service):
    (HERE / "ready").write_text("1")
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_or_killed_test_session_leaves_no_service_running(tmp_path, sig):
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.services", "-p", "no:cacheprovider", "-o", "timeout=0"]
    cmd += ["--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_child.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    service = grandchild = None
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0].decode()[-2000:]
            time.sleep(0.05)
        service = int((tmp_path / "service.pid").read_text())
        while not (tmp_path / "child.pid").exists() or not (tmp_path / "child.pid").read_text().strip():
            time.sleep(0.01)
        grandchild = int((tmp_path / "child.pid").read_text())
        assert _alive(service)
        child.send_signal(getattr(signal, sig))
        child.wait(timeout=60)
        if sig != "SIGKILL":  # pytest unwound as after Ctrl-C, and said so
            assert child.returncode == pytest.ExitCode.INTERRUPTED, child.stdout.read().decode()[-2000:]
        deadline = time.monotonic() + 15
        while _alive(service) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(service), f"a service outlived a test session stopped by {sig}"
        if sig != "SIGKILL":  # its whole process group went (after SIGKILL only the kernel acts: on the service)
            assert not _alive(grandchild), f"a service's child outlived a test session stopped by {sig}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for pid in (service, grandchild):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
