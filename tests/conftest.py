"""Test-wide setup: an isolated, offline Prefect home, and paths to the bundled sample."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

# Must be set before prefect is imported anywhere.
_PREFECT_HOME = tempfile.mkdtemp(prefix="fkd-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE / "keypoints.csv"
