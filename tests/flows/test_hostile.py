"""Hostile inputs and concurrency: nothing hangs, nothing is claimed twice, no lock outlives its run."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fkd_core.errors import RunConflict
from fkd_core.lease import Lease, default_holder
from fkd_core.parquet_io import IMAGES_SCHEMA, output_tables
from fkd_flows.annotate import annotate
from tests.flows.conftest import BIN, SECRET

pytestmark = pytest.mark.flows


def _images(out) -> dict[str, dict]:
    tbl = output_tables(str(out))["images"].to_table()
    rows: dict[str, dict] = {}
    for row in tbl.to_pylist():
        assert row["image_uri"] not in rows or rows[row["image_uri"]]["run_id"] != row["run_id"], "duplicate row"
        rows.setdefault(row["image_uri"], row)
    return rows


def _all_rows(out) -> list[dict]:
    return output_tables(str(out))["images"].to_table().to_pylist()


def _copy(sample_dir, dst: Path, n: int) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(sample_dir / "images"))[:n]
    for name in names:
        (dst / name).write_bytes((sample_dir / "images" / name).read_bytes())
    return names


@pytest.mark.timeout(120)
def test_a_fifo_and_a_url_chain_in_a_name_are_one_files_error_and_that_file_only(tmp_path, sample_dir, model_path):
    src = tmp_path / "in"
    names = _copy(sample_dir, src, 3)
    os.mkfifo(src / "x.jpg")  # opening it would block forever
    # fsspec would read `a::b.jpg` as a URL chain and annotate the sibling file `a` instead
    (src / "a").write_bytes(b"not the file you asked for")
    (src / "a::b.jpg").write_bytes((sample_dir / "photos" / "obamas.jpg").read_bytes())
    doc = annotate(source=str(src), out=str(tmp_path / "out"), model=model_path, run_id="r")
    assert doc["status"] == "completed"
    rows = _images(tmp_path / "out")
    fifo = rows[str(src / "x.jpg")]
    assert fifo["status"] == "error" and fifo["error"] == "not a regular file (a FIFO)"
    chained = rows[str(src / "a::b.jpg")]
    assert chained["status"] == "ok" and chained["n_faces"] == 2
    assert chained["bytes"] == (src / "a::b.jpg").stat().st_size
    assert all(rows[str(src / n)]["status"] == "ok" for n in names)


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_a_url_chain_in_a_key_on_a_bucket_is_just_a_name(tmp_path, s3fs_clean, sample_dir, model_path):
    s3fs_clean.mkdir("fkd-hostile")
    s3fs_clean.put_file(str(sample_dir / "photos" / "obamas.jpg"), "fkd-hostile/in/a::b.jpg")
    s3fs_clean.pipe_file("fkd-hostile/in/a", b"sibling")
    # a key holding a whole chain: read literally, never as memory://x.jpg (a decoy there) or a failing chain
    s3fs_clean.put_file(str(sample_dir / "photos" / "obamas.jpg"), "fkd-hostile/in/b.jpg::memory://x.jpg")
    fsspec.filesystem("memory").pipe_file("/x.jpg", (sample_dir / "photos" / "the_beatles.jpg").read_bytes())
    doc = annotate(source="s3://fkd-hostile/in", out=str(tmp_path / "out"), model=model_path, run_id="r")
    assert doc["status"] == "completed"
    rows = _images(tmp_path / "out")
    obamas = hashlib.sha256((sample_dir / "photos" / "obamas.jpg").read_bytes()).hexdigest()
    for key in ("a::b.jpg", "b.jpg::memory://x.jpg"):
        row = rows[f"s3://fkd-hostile/in/{key}"]
        assert row["status"] == "ok" and row["n_faces"] == 2 and row["sha256"] == obamas, (key, row)
    # a store read is cut off at its deadline (here far shorter than the request), recorded as the file's reason
    from fkd_core.errors import ImageError
    from fkd_core.storage import read_bytes

    with pytest.raises(ImageError, match=r"read took longer than 0.0001 s"):
        read_bytes("s3://fkd-hostile/in/a::b.jpg", max_seconds=0.0001)
    assert read_bytes("s3://fkd-hostile/in/a::b.jpg") == (sample_dir / "photos" / "obamas.jpg").read_bytes()


def test_identical_bad_files_get_identical_reasons_without_addresses(tmp_path, model_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("one.jpg", "two.jpg", "three.png"):
        (src / name).write_bytes(b"\x00" * 100)
    annotate(source=str(src), out=str(tmp_path / "out"), model=model_path, run_id="r")
    reasons = {r["error"] for r in _all_rows(tmp_path / "out")}
    assert len(reasons) == 1 and "0x" not in reasons.pop()


def test_every_file_is_annotated_or_skipped_with_its_reason(tmp_path, sample_dir, model_path):
    src = tmp_path / "in"
    _copy(sample_dir, src, 2)
    jpeg = (sample_dir / "photos" / "obamas.jpg").read_bytes()
    (src / "photo_without_extension").write_bytes(jpeg)
    (src / "photo.jfif").write_bytes(jpeg)
    gif = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").save(gif, format="GIF")
    (src / "frame.gif").write_bytes(gif.getvalue())
    tiff = io.BytesIO()
    page = Image.open(io.BytesIO(jpeg)).convert("L")
    page.save(tiff, format="TIFF", save_all=True, append_images=[Image.new("L", page.size)])  # 2 pages
    (src / "pages.tif").write_bytes(tiff.getvalue())
    (src / "README.md").write_text("not an image")
    (src / "inner").mkdir()
    (src / "inner" / "x.jpg").write_bytes(jpeg)
    (src / "alias.jpg").symlink_to(src / "inner" / "x.jpg")  # a link that stays inside: read like any file
    linked = tmp_path / "elsewhere"
    _copy(sample_dir, linked, 1)
    (src / "linked").symlink_to(linked, target_is_directory=True)
    (tmp_path / "private.jpg").write_bytes(jpeg)
    (src / "p.jpg").symlink_to(tmp_path / "private.jpg")  # `SRC/p.jpg -> /etc/passwd`, with a JPEG to be sure
    doc = annotate(source=str(src), out=str(tmp_path / "out"), model=model_path, run_id="r")
    rows = _images(tmp_path / "out")
    for name in ("photo_without_extension", "photo.jfif", "frame.gif", "alias.jpg", "inner/x.jpg"):
        assert rows[str(src / name)]["status"] == "ok", (name, rows[str(src / name)])
    assert rows[str(src / "pages.tif")]["status"] == "ok"  # the first page, which has the faces
    assert rows[str(src / "pages.tif")]["n_faces"] == 2
    # nothing outside the source is opened: the links that leave it are listed as skipped, with where they lead
    skipped = pq.read_table(tmp_path / "out" / "runs" / "r.skipped.parquet").to_pylist()
    assert skipped == [
        {"uri": str(src / "README.md"), "reason": "not an image (no image extension, no image signature)"},
        {"uri": str(src / "linked"), "reason": f"link leaves the source (-> {linked})"},
        {"uri": str(src / "p.jpg"), "reason": f"link leaves the source (-> {tmp_path / 'private.jpg'})"},
    ]
    assert doc["skipped_files"] == 3 and doc["images_planned"] == len(rows) == 8  # 2 + 4 + 2 (a link inside)
    # following links out of the source is an explicit option
    doc = annotate(source=str(src), out=str(tmp_path / "out2"), model=model_path, run_id="r", follow_links_out=True)
    rows = _images(tmp_path / "out2")
    assert rows[str(src / "p.jpg")]["status"] == "ok" and any(u.startswith(str(src / "linked") + "/") for u in rows)
    assert doc["skipped_files"] == 1 and doc["images_planned"] == len(rows) == 10


def test_incremental_retries_errors_and_redoes_replaced_files_only(tmp_path, sample_dir, model_path):
    src = tmp_path / "in"
    names = _copy(sample_dir, src, 3)
    (src / "partial.jpg").write_bytes((sample_dir / "photos" / "obamas.jpg").read_bytes()[:500])  # an upload cut off
    out = str(tmp_path / "out")
    annotate(source=str(src), out=out, model=model_path, incremental=True, run_id="first")
    assert _images(out)[str(src / "partial.jpg")]["status"] == "error"
    (src / "partial.jpg").write_bytes((sample_dir / "photos" / "obamas.jpg").read_bytes())  # the upload finished
    replaced = src / names[0]
    replaced.write_bytes((sample_dir / "images" / names[1]).read_bytes())  # a new picture under the same name
    touched = src / names[2]  # the same size, other bytes and time: only its version tells
    data = bytearray(touched.read_bytes())
    data[-3] ^= 0xFF
    touched.write_bytes(bytes(data))
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = annotate(source=str(src), out=out, model=model_path, incremental=True, run_id="second")
    redone = {r["image_uri"] for r in _all_rows(out) if r["run_id"] == "second"}
    assert redone == {str(src / "partial.jpg"), str(replaced), str(touched)}
    assert second["skipped_existing"] == 1
    third = annotate(source=str(src), out=out, model=model_path, incremental=True, run_id="third")
    assert third["images_planned"] == 0 and third["skipped_existing"] == 4


def test_a_run_id_keeps_its_identity(tmp_path, sample_dir, model_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _copy(sample_dir, a, 2)
    _copy(sample_dir, b, 2)
    out = str(tmp_path / "out")
    annotate(source=str(a), out=out, model=model_path, run_id="r")
    before = (tmp_path / "out" / "runs" / "r.json").read_text()
    with pytest.raises(RunConflict, match=f"run r was started with source {a}"):
        annotate(source=str(b), out=out, model=model_path, run_id="r")
    assert json.loads((tmp_path / "out" / "runs" / "r.json").read_text())["source"] == str(a)
    assert (tmp_path / "out" / "runs" / "r.json").read_text() == before


def test_a_foreign_file_in_the_output_breaks_neither_queries_nor_incremental_runs(tmp_path, sample_dir, model_path):
    src = tmp_path / "in"
    _copy(sample_dir, src, 2)
    out = tmp_path / "out"
    annotate(source=str(src), out=str(out), model=model_path, incremental=True, run_id="one")
    (out / "images" / "README.md").write_text("# what is in here")
    (out / "images" / "run_id=one" / "notes.txt").write_text("hand-written notes")
    again = annotate(source=str(src), out=str(out), model=model_path, incremental=True, run_id="two")
    assert again["images_planned"] == 0
    # a part written before source_version existed: read with the column null, and matched by size
    old_file = src / "old.jpg"
    old_file.write_bytes((sample_dir / "photos" / "obamas.jpg").read_bytes())
    old_schema = pa.schema([f for f in IMAGES_SCHEMA if f.name != "source_version"])
    old_row = {"image_uri": str(old_file), "status": "ok", "error": None, "width": 1, "height": 1, "n_faces": 0,
               "bytes": old_file.stat().st_size, "sha256": None, "created_at": dt.datetime.now(dt.UTC)}  # fmt: skip
    (out / "images" / "run_id=old").mkdir()
    pq.write_table(pa.Table.from_pylist([old_row], old_schema), out / "images" / "run_id=old" / "part-00000.parquet")
    third = annotate(source=str(src), out=str(out), model=model_path, incremental=True, run_id="three")
    assert third["images_planned"] == 0 and third["skipped_existing"] == 3
    sql = "select count(*) n, count(source_version) v from images"
    q = subprocess.run([str(BIN / "fkd"), "query", str(out), sql, "--format", "json"], capture_output=True, text=True)
    assert q.returncode == 0 and json.loads(q.stdout)[0] == {"n": 3, "v": 2}, q.stderr[-2000:]


def _hold_and_die(locks: str, name: str, ttl: float, ready, host: str | None = None) -> None:
    holder = default_holder(run_id="killed") | ({"host": host} if host else {})
    lease = Lease(locks, name, holder, ttl=ttl)
    assert lease.try_acquire()
    ready.set()
    time.sleep(3600)  # until SIGKILLed: the lease is never released


@pytest.mark.timeout(180)
def test_a_killed_incremental_runs_lock_expires_and_the_next_run_says_what_it_waits_for(
    tmp_path, sample_dir, model_path, caplog
):
    src = tmp_path / "in"
    _copy(sample_dir, src, 2)
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    # the killed holder ran on another machine: its death cannot be seen from here, so its lease must expire
    holder = ctx.Process(target=_hold_and_die, args=(str(out / "locks"), "incremental", 10.0, ready, "other-host"))
    holder.start()
    assert ready.wait(60)
    holder.kill()  # an OOM kill: nothing is released
    holder.join()
    t0 = time.monotonic()
    run_logs = logging.getLogger("prefect.flow_runs")  # where a flow's run logger writes; it does not propagate
    run_logs.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):  # the tests run Prefect at WARNING
            doc = annotate(source=str(src), out=str(out), model=model_path, incremental=True, lease_seconds=4)
    finally:
        run_logs.removeHandler(caplog.handler)
    assert doc["status"] == "completed" and doc["counts"]["images"] == 2
    assert time.monotonic() - t0 < 60
    waits = [r.getMessage() for r in caplog.records if "waiting for the incremental lease" in r.getMessage()]
    assert waits and "run killed on other-host" in waits[0] and "until" in waits[0]
    # and the run left no live lock behind: the next one starts at once
    t1 = time.monotonic()
    annotate(source=str(src), out=str(out), model=model_path, incremental=True, lease_seconds=4)
    assert time.monotonic() - t1 < 30


def test_a_lock_whose_holder_died_on_this_machine_is_taken_over_at_once(tmp_path, sample_dir, model_path):
    """A run SIGKILLed here is resumed at once under its id: its lease names a process that no longer exists."""
    src = tmp_path / "in"
    _copy(sample_dir, src, 2)
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_and_die, args=(str(out / "locks"), "run-r", 600.0, ready))
    holder.start()
    assert ready.wait(60)
    holder.kill()
    holder.join()
    t0 = time.monotonic()
    assert annotate(source=str(src), out=str(out), model=model_path, run_id="r")["status"] == "completed"
    assert time.monotonic() - t0 < 60  # not the 600 s of its lease


def _hold(locks: str, name: str, ready, done) -> None:
    lease = Lease(locks, name, default_holder(run_id="r"), ttl=60)
    assert lease.try_acquire()
    lease.start_renewing()
    ready.set()
    done.wait(120)
    lease.release()


def test_a_run_id_already_in_progress_elsewhere_is_refused(tmp_path, sample_dir, model_path):
    src = tmp_path / "in"
    _copy(sample_dir, src, 2)
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(out / "locks"), "run-r", ready, done))
    other.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunConflict, match="run r is already in progress"):
            annotate(source=str(src), out=str(out), model=model_path, run_id="r")
        assert not (out / "runs" / "r.json").exists()  # it planned nothing
    finally:
        done.set()
        other.join(60)
    assert annotate(source=str(src), out=str(out), model=model_path, run_id="r")["status"] == "completed"


@pytest.mark.timeout(300)
def test_two_incremental_runs_from_two_clis_without_a_shared_server_annotate_each_image_once(
    tmp_path, sample_dir, model_path
):
    src = tmp_path / "in"
    names = _copy(sample_dir, src, 40)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # each CLI starts its own server
    cmd = [
        str(BIN / "fkd"),
        "annotate",
        str(src),
        str(out),
        "--incremental",
        "--shard-size",
        "10",
        "--model",
        model_path,
    ]
    env["PREFECT_LOGGING_LEVEL"] = "INFO"
    # a third holder keeps the incremental lease while both start, so the two really overlap and both wait
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(out / "locks"), "incremental", ready, done))
    holder.start()
    assert ready.wait(60)
    procs, logs = [], [tmp_path / f"cli{i}.log" for i in range(2)]
    try:
        for i, log in enumerate(logs):
            home = tmp_path / f"home{i}"
            home.mkdir()
            with open(log, "w") as err:
                procs.append(subprocess.Popen(cmd, env=env | {"PREFECT_HOME": str(home)}, stdout=subprocess.DEVNULL,
                                              stderr=err))  # fmt: skip
        # release the lease only once both runs say they wait for it: they overlap for certain
        deadline = time.monotonic() + 180
        while not all("waiting for the incremental lease" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                x.read_text()[-2000:] for x in logs
            ]
            time.sleep(0.5)
    finally:
        done.set()
        holder.join(60)
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    rows = _all_rows(out)
    assert sorted(r["image_uri"] for r in rows) == sorted(str(src / n) for n in names)  # each once, none missing


@pytest.mark.s3
def test_refused_credentials_name_the_location_and_the_variables_never_the_secret(tmp_path, s3_server, model_path):
    import boto3

    from tests.conftest import free_port
    from tests.flows.conftest import stop, wait_http

    port = free_port()
    # a second moto server that checks credentials (the first action, making the bucket, is let through)
    strict = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/moto-api/")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="guarded")
        env = os.environ | {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
            "AWS_SECRET_ACCESS_KEY": SECRET,
        }
        env.pop("PREFECT_API_URL", None)
        run = subprocess.run(
            [str(BIN / "fkd"), "annotate", "s3://guarded/in", str(tmp_path / "out"), "--model", model_path],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        stop(strict)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "access denied to s3://guarded/in" in lines[0]
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "AWS_ENDPOINT_URL" in lines[0]
    assert SECRET not in run.stderr + run.stdout


def test_a_decode_budget_bounds_the_bytes_in_flight_across_threads():
    import threading

    from fkd_core.image_io import DecodeBudget, decode_gray, decoded_bytes

    frame = np.zeros((600, 500, 4), np.uint16)
    frame[100:300, 100:300] = 65535
    buf = io.BytesIO()
    import cv2

    ok, png = cv2.imencode(".png", frame)
    assert ok
    buf.write(png.tobytes())
    data = buf.getvalue()
    per_image = decoded_bytes(Image.open(io.BytesIO(data)))
    budget = DecodeBudget(2 * per_image)  # room for two decodes at once, never three
    results = []
    threads = [threading.Thread(target=lambda: results.append(decode_gray(data, budget=budget))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and budget.used == 0
    assert budget.peak <= 2 * per_image and budget.peak >= per_image
    gray = results[0].gray
    assert gray.dtype == np.uint8 and gray[200, 200] == 255 and gray[0, 0] == 0


def _prefect_servers_of(pid: int) -> list:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "prefect.server.api.server:create_app" in " ".join(c.cmdline())]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_cli_run_leaves_no_prefect_server_running(tmp_path, sample_dir, model_path, sig):
    """Without PREFECT_API_URL `fkd annotate` starts a temporary Prefect server; however the run ends, the server
    ends with it (Prefect's own stops only at a clean exit), and the run record says what happened."""
    import psutil

    from tests.flows.conftest import stop

    out = tmp_path / "out"
    cmd = [str(BIN / "fkd"), "annotate", str(sample_dir / "images"), str(out), "--run-id", "s", "--shard-size", "2"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"FKD_MODEL": model_path}
    # SIGINT as a terminal's Ctrl-C sends it: the process group, with SIGINT not ignored as in a background job
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts = out / "images" / "run_id=s"
    try:
        deadline = time.monotonic() + 180
        while not (parts.is_dir() and any(p.suffix == ".parquet" for p in parts.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a shard was written"
            time.sleep(0.05)
        (server,) = _prefect_servers_of(proc.pid)
        os.killpg(proc.pid, getattr(signal, sig)) if sig == "SIGINT" else proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
    finally:
        stop(proc)
    # a signal's usual exit status: 128 + 2 after Ctrl-C, death by the signal otherwise
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": -signal.SIGTERM, "SIGKILL": -signal.SIGKILL}[sig]
    try:  # the kernel or fkd stops it: Linux's parent-death signal covers SIGKILL too
        server.wait(timeout=20)
    except psutil.TimeoutExpired:
        server.kill()
        raise AssertionError(f"the temporary Prefect server outlived a run stopped by {sig}") from None
    record = json.loads((out / "runs" / "s.json").read_text())
    if sig == "SIGKILL":
        assert record["status"] == "running"  # it could not say so; its heartbeat stops (test_annotate)
    else:
        how = {"SIGINT": "SIGINT (Ctrl-C)", "SIGTERM": "SIGTERM"}[sig]
        assert (record["status"], record["error"]) == (
            "interrupted",
            f"interrupted by {how}; rerun the run id to resume",
        )
        assert "Traceback" not in proc.stderr.read().decode()


def _own_mounts(script: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``script`` in a mount namespace of its own (as the user it runs as), where it may mount a small or
    read-only tmpfs that vanishes with it; skip where this kernel or sandbox allows no such namespace."""
    import shutil

    probe = shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a full or read-only file system")
    return subprocess.run(["unshare", "-rm", "sh", "-ec", script], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.timeout(300)
def test_an_unwritable_output_or_prefect_home_is_one_line_before_any_server_starts(tmp_path, sample_dir, model_path):
    """The worker image with a volume its user cannot write: one line naming the place and exit 2, at once (Prefect
    would retry starting its server in a home it cannot create, without end)."""
    ro, profiled = tmp_path / "ro", tmp_path / "profiled"
    ro.mkdir()
    profiled.mkdir()
    (tmp_path / "profiles.toml").write_text(
        'active = "default"\n[profiles.default]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"FKD_MODEL": model_path}
    fkd = f"{BIN / 'fkd'} annotate {sample_dir / 'images'}"
    script = f"""mount -t tmpfs -o ro,size=1m tmpfs {ro}
        t0=$(date +%s)
        {fkd} {ro}/out 2>&1 && exit 9 || echo "exit $?"
        PREFECT_HOME={ro}/prefect {fkd} {tmp_path}/out 2>&1 && exit 9 || echo "exit $?"
        PREFECT_HOME={ro}/prefect timeout 60 {BIN / "fkd"} serve 2>&1 | tail -1
        echo "took $(( $(date +%s) - t0 )) s"
        mount -t tmpfs tmpfs {profiled}
        cp {tmp_path}/profiles.toml {profiled}/
        mount -o remount,ro {profiled}
        PREFECT_HOME={profiled} {sys.executable} -c "from fkd_flows.tempserver import check_prefect_home as c; c()" \\
            && echo "a read-only home whose profile names an API is no refusal" """
    lines = _own_mounts(script, env).stdout.splitlines()
    assert lines[:4] == [
        f"fkd: output {ro}/out is not writable (its parent {ro}): Read-only file system (errno 30)",
        "exit 2",
        f"fkd: PREFECT_HOME {ro}/prefect is not writable (its parent {ro}): Read-only file system (errno 30); set "
        "PREFECT_HOME to a writable directory, or PREFECT_API_URL to a Prefect server",
        "exit 2",
    ], lines
    assert lines[4] == lines[2], lines  # `fkd serve` (Prefect's own server there) refuses it the same way
    assert int(lines[5].split()[1]) < 90, lines
    assert lines[6:] == ["a read-only home whose profile names an API is no refusal"], (
        lines
    )  # a few seconds of imports each; no server, no retries
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_an_output_that_fills_up_or_turns_read_only_mid_run_is_one_line_and_leaves_no_temporary_file(
    tmp_path, sample_dir, model_path, fault
):
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"FKD_MODEL": model_path}
    run = f"{BIN / 'fkd'} annotate {sample_dir / 'images'} {disk}/out --shard-size 4 --run-id f"
    if fault == "full":  # room for the plan and a few shards, not for all 15
        script = f"mount -t tmpfs -o size=60k tmpfs {disk}\n{run} 2>{tmp_path}/err >/dev/null || echo $? >{tmp_path}/rc"
    else:  # the volume is remounted read-only once two shards are written
        script = f"""mount -t tmpfs -o size=50m tmpfs {disk}
            (if {run} 2>{tmp_path}/err >/dev/null; then echo 0; else echo $?; fi >{tmp_path}/rc) &
            while [ "$(ls {disk}/out/images/run_id=f 2>/dev/null | wc -l)" -lt 2 ]; do sleep 0.02; done
            mount -o remount,ro {disk}
            wait"""
    script += f"\ncp -r {disk}/out {tmp_path}/seen"  # what the mount held, kept before it vanishes
    done = _own_mounts(script, env)
    assert (tmp_path / "rc").read_text().strip() == "2", done.stderr[-2000:]
    errno_text = {"full": "No space left on device (errno 28)", "read-only": "Read-only file system (errno 30)"}[fault]
    err = (tmp_path / "err").read_text().splitlines()
    assert re.fullmatch(rf"fkd: cannot write {disk}/out/faces/run_id=f/part-\d+\.parquet: {re.escape(errno_text)}",
                        err[-1]), err[-5:]  # fmt: skip
    assert "Traceback" not in "\n".join(err)
    seen = tmp_path / "seen"
    assert not [p for p in seen.rglob("*") if p.name.endswith(".tmp")], "a temporary file stayed behind"
    parts = {p.name for p in (seen / "images" / "run_id=f").iterdir()}
    assert parts and len(parts) < 15 and parts == {p.name for p in (seen / "faces" / "run_id=f").iterdir()}
    record = json.loads((seen / "runs" / "f.json").read_text())
    if fault == "full":  # rewritten in the record's own blocks, as are the leases' tombstones
        assert record["status"] == "failed" and errno_text in record["error"]
        locks = [json.loads(p.read_text()) for p in (seen / "locks").glob("*.json")]
        assert locks and all(rec.get("released") is True for rec in locks), "the run's lock outlived it"
    else:  # nothing could be written: the record stays running, and its heartbeat stops (test_annotate)
        assert record["status"] == "running"
