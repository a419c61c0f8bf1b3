"""Test-wide setup: an isolated, offline Prefect home, and paths to the bundled sample."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.services"]  # services the tests start end with the session, however it ends

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
def model_path() -> str:
    """The shipped checkpoint (FKD_TEST_MODEL overrides it, for work on a model that is not committed yet)."""
    from fkd_core.checkpoint import DEFAULT_MODEL

    path = os.environ.get("FKD_TEST_MODEL", str(DEFAULT_MODEL))
    assert Path(path).is_file(), f"no checkpoint at {path}"
    return str(Path(path).resolve())


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE / "keypoints.csv"


@pytest.fixture
def corrupt_dir(tmp_path, sample_dir):
    """Three good photos plus every kind of bad file the annotate flow must survive."""
    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("obamas.jpg", "mona_lisa.jpg"):
        shutil.copy(sample_dir / "photos" / name, d / name)
    shutil.copy(sample_dir / "images" / sorted(os.listdir(sample_dir / "images"))[0], d / "frame.jpg")
    good = (sample_dir / "photos" / "obamas.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 50])
    (d / "empty.jpg").write_bytes(b"")
    (d / "not_an_image.png").write_text("hello")
    (d / "garbage.jpg").write_bytes(os.urandom(5000))
    import numpy as np

    from tests.core.test_image_io import _png_header_only

    (d / "bomb.png").write_bytes(_png_header_only(60_000, 60_000))
    blank = np.full((200, 300), 128, np.uint8)
    import cv2

    cv2.imwrite(str(d / "blank.png"), blank)
    return d
