"""`pip install .` outside the checkout: the wheel carries the model and cascades, and annotates from anywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.flows
def test_the_wheel_annotates_outside_the_checkout(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT)]
        + ["-w", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("fkd-*.whl"))
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    work = tmp_path / "elsewhere"  # no checkout here, and the installed copy comes first on the path
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    env.pop("FKD_MODEL", None)
    code = "import fkd_core.checkpoint as c, fkd_core.detect as d; print(c.DEFAULT_MODEL, d.CASCADE_DIR)"
    where = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        check=True,
    )
    model, cascades = map(Path, where.stdout.split())
    assert model.is_file() and model.is_relative_to(site) and cascades.is_relative_to(site)
    photos = ROOT / "data" / "sample" / "photos"
    run = subprocess.run(
        [sys.executable, "-m", "flows.cli", "annotate", str(photos), str(work / "out")],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["status"] == "completed" and doc["counts"]["images"] == 3 and doc["counts"]["faces"] == 7
