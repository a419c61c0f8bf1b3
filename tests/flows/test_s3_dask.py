"""Buckets on a real local S3 (moto server) and scale-out on a real local Dask cluster."""

import json
import os

import numpy as np
import pytest

from fkd_core.image_io import list_images
from fkd_core.parquet_io import output_tables
from fkd_flows.annotate import annotate
from fkd_flows.ingest import ingest
from tests.flows.test_annotate import faces_by_image

pytestmark = pytest.mark.flows

NAMES = None


def _upload(fs, bucket: str, sample_dir) -> list[str]:
    fs.mkdir(bucket)
    names = sorted(os.listdir(sample_dir / "images"))[:24]
    for n in names:
        fs.put_file(str(sample_dir / "images" / n), f"{bucket}/in/{n}")
    fs.put_file(str(sample_dir / "photos" / "obamas.jpg"), f"{bucket}/in/photos/obamas.jpg")
    fs.pipe_file(f"{bucket}/in/broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    return names


def _local_copy(tmp_path, sample_dir, names):
    d = tmp_path / "in"
    (d / "photos").mkdir(parents=True)
    for n in names:
        (d / n).write_bytes((sample_dir / "images" / n).read_bytes())
    (d / "photos" / "obamas.jpg").write_bytes((sample_dir / "photos" / "obamas.jpg").read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def _rows(out):
    t = output_tables(str(out))
    images = t["images"].to_table()
    key = lambda u: u.split("/in/", 1)[1]  # noqa: E731
    img = {
        key(u): (s, n, b, h)
        for u, s, n, b, h in zip(
            *(images.column(c).to_pylist() for c in ("image_uri", "status", "n_faces", "bytes", "sha256")), strict=True
        )
    }
    faces = {(key(u), i): v for (u, i), v in faces_by_image(t["faces"].to_table()).items()}
    return img, faces


def _assert_same(a, b):
    img_a, faces_a = a
    img_b, faces_b = b
    assert img_a == img_b
    assert faces_a.keys() == faces_b.keys()
    for k in faces_a:
        assert faces_a[k][0] == faces_b[k][0]
        assert np.allclose(faces_a[k][1], faces_b[k][1], atol=1e-3), k


@pytest.mark.s3
def test_annotate_bucket_to_bucket_equals_the_local_run(tmp_path, s3fs_clean, sample_dir, model_path, caplog, capsys):
    names = _upload(s3fs_clean, "fkd-in", sample_dir)
    s3fs_clean.mkdir("fkd-out")  # buckets are the operator's to make: fkd refuses a missing one
    assert len(list_images("s3://fkd-in/in")) == 26
    s3_doc = annotate(source="s3://fkd-in/in", out="s3://fkd-out/ann", model=model_path, shard_size=10, run_id="s3")
    assert s3_doc["counts_this_attempt"]["images"] == 26
    assert s3fs_clean.exists("fkd-out/ann/runs/s3.json")
    assert s3fs_clean.exists("fkd-out/ann/images/run_id=s3/part-00002.parquet")
    local = tmp_path / "local"
    annotate(
        source=str(_local_copy(tmp_path, sample_dir, names)),
        out=str(local),
        model=model_path,
        shard_size=10,
        run_id="s3",
    )
    s3_rows, local_rows = _rows("s3://fkd-out/ann"), _rows(local)
    assert s3_rows[0]["broken.jpg"][0] == "error" and s3_rows[0]["photos/obamas.jpg"][1] == 2
    _assert_same(s3_rows, local_rows)
    # credentials come from the standard AWS variables and appear nowhere in logs or run records
    from tests.flows.conftest import SECRET

    captured = capsys.readouterr()
    record = s3fs_clean.cat_file("fkd-out/ann/runs/s3.json").decode()
    assert SECRET not in caplog.text + captured.out + captured.err + record + json.dumps(s3_doc, default=str)


@pytest.mark.s3
def test_ingest_reads_csv_and_images_from_a_bucket(tmp_path, s3fs_clean, sample_dir, sample_csv):
    s3fs_clean.mkdir("fkd-train")
    s3fs_clean.put(str(sample_dir / "images"), "fkd-train/images", recursive=True)
    s3fs_clean.put_file(str(sample_csv), "fkd-train/keypoints.csv")
    report = ingest(
        csv="s3://fkd-train/keypoints.csv", images="s3://fkd-train/images", out="s3://fkd-train/out", shard_size=30
    )
    assert report["rows_kept"] == 60 and report["rows_refused"] == 0
    from fkd_core.parquet_io import read_examples

    crops, kp, ids = read_examples("s3://fkd-train/out/examples")
    local = ingest(csv=str(sample_csv), images=str(sample_dir / "images"), out=str(tmp_path / "o"))
    lcrops, lkp, lids = read_examples(str(tmp_path / "o" / "examples"))
    assert ids == lids and np.array_equal(crops, lcrops) and np.allclose(kp, lkp)
    assert local["boxes_from_haar"] == report["boxes_from_haar"]


@pytest.mark.dask
def test_annotate_on_dask_equals_the_local_run(tmp_path, dask_cluster, sample_dir, model_path, monkeypatch):
    import fkd_flows.progress

    reported = []  # images the board had counted from workers' events, at each tick
    tick = fkd_flows.progress.ProgressBoard.tick
    monkeypatch.setattr(
        fkd_flows.progress.ProgressBoard, "tick", lambda self: (reported.append(self.counter.value), tick(self))[1]
    )
    src = str(sample_dir / "images")
    doc = annotate(
        source=src,
        out=str(tmp_path / "dask"),
        model=model_path,
        shard_size=10,
        run_id="d",
        dask_address=dask_cluster,
    )
    assert doc["shards_run_now"] == 6
    # the shards ran in the workers' processes, and their progress came back as Dask events
    assert max(reported) == 60
    annotate(source=src, out=str(tmp_path / "local"), model=model_path, shard_size=10, run_id="d")
    a, b = output_tables(str(tmp_path / "dask")), output_tables(str(tmp_path / "local"))
    ia, ib = a["images"].to_table().sort_by("image_uri"), b["images"].to_table().sort_by("image_uri")
    for col in ("image_uri", "status", "n_faces", "width", "height", "bytes", "sha256"):
        assert ia.column(col).to_pylist() == ib.column(col).to_pylist(), col
    fa, fb = faces_by_image(a["faces"].to_table()), faces_by_image(b["faces"].to_table())
    assert fa.keys() == fb.keys() and len(fa) >= 60
    _debug(fa, fb)
    # same boxes; keypoints equal to 0.02 px: a Dask worker's ONNX Runtime may use another thread count, so
    # its sums run in another order (seen: 0.005 px after both stages), far below any real difference
    assert all(fa[k][0] == fb[k][0] and np.allclose(fa[k][1], fb[k][1], atol=0.02) for k in fa)
    # every worker built the model once, when the run registered it, before its first shard came
    from distributed import Client

    from fkd_flows.annotate import shard_threads

    with Client(dask_cluster) as c:
        built = c.run(lambda: __import__("fkd_core.predict").predict._cached.cache_info())
        loaded = [e for _, e in c.get_events("fkd") if e.get("action") == "model-loaded"]
        # a shard's reading and decoding threads are the worker's thread count (1 here), not the machine's cores
        threads = c.submit(shard_threads, pure=False).result()
    assert len(built) == 2 and all(info.currsize >= 1 and info.misses == info.currsize for info in built.values())
    assert {e["worker"] for e in loaded} == set(built)
    assert threads == 1 and shard_threads() == 0


def _debug(fa, fb):
    for k in fa:
        if fa[k][0] != fb[k][0] or not np.allclose(fa[k][1], fb[k][1], atol=0.02):
            print(k, fa[k][0], fb[k][0], np.abs(fa[k][1] - fb[k][1]).max())


@pytest.mark.s3
def test_buckets_are_never_created_and_an_empty_prefix_is_a_run_with_nothing_to_do(s3fs_clean, sample_dir, model_path):
    import subprocess

    from fkd_core.errors import BucketNotFound
    from tests.flows.conftest import BIN

    s3fs_clean.mkdir("fkd-src")
    s3fs_clean.put_file(str(sample_dir / "photos" / "obamas.jpg"), "fkd-src/incoming/obamas.jpg")
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    cli = subprocess.run(
        [str(BIN / "fkd"), "annotate", "s3://fkd-src/incoming", "s3://nobucket/out", "--model", model_path],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.strip() == (
        "fkd: output bucket s3://nobucket does not exist (for s3://nobucket/out); fkd never creates buckets"
    )
    missing_source = subprocess.run(
        [str(BIN / "fkd"), "annotate", "s3://nosource/in", "s3://fkd-src/out", "--model", model_path],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing_source.returncode == 2 and "source bucket s3://nosource does not exist" in missing_source.stderr
    s3fs_clean.invalidate_cache()
    assert not s3fs_clean.exists("nobucket") and not s3fs_clean.exists("nosource")
    assert not s3fs_clean.exists("fkd-src/out")  # nothing written for a run that could not start
    with pytest.raises(BucketNotFound, match="s3://nobucket"):
        annotate(source="s3://fkd-src/incoming", out="s3://nobucket/out", model=model_path)
    # an empty prefix in an existing bucket: object stores have no directories, so nothing to do is not an error
    doc = annotate(source="s3://fkd-src/nothing-yet", out="s3://fkd-src/out", model=model_path, run_id="quiet")
    assert doc["status"] == "completed" and doc["counts"]["images"] == 0
    # but a prefix that lists nothing (a mistyped s3://images/incomin) says so instead of "succeeding" quietly
    assert doc["warnings"] == [
        "source s3://fkd-src/nothing-yet lists nothing: check the path or prefix; this run annotates nothing"
    ]
    s3fs_clean.invalidate_cache()
    assert json.loads(s3fs_clean.cat_file("fkd-src/out/runs/quiet.json"))["status"] == "completed"
    assert "nobucket" not in s3fs_clean.ls("")
    # below the checks too: writing into a missing bucket fails, it does not make the bucket
    from fkd_core.storage import write_json

    with pytest.raises(FileNotFoundError):
        write_json({"a": 1}, "s3://nobucket2/out/runs/x.json")
    s3fs_clean.invalidate_cache()
    assert not s3fs_clean.exists("nobucket2")


@pytest.mark.s3
def test_the_operations_guide_s3_compatible_store_example_runs_as_written(tmp_path, s3fs_clean, sample_dir):
    """docs/operations.md's block for S3-compatible stores, run line for line against the moto server: its
    `export`s name exactly the variables the moto fixture sets (to moto's values), the rest runs in bash."""
    import re
    import subprocess
    from pathlib import Path

    from prefect.settings import PREFECT_API_URL

    from tests.flows.conftest import BIN

    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = text.split("## Object stores", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    exports = [line for line in block.splitlines() if line.startswith("export ")]
    exported = {m.group(1) for line in exports for m in re.finditer(r"(\w+)=", line.split("#")[0])}
    assert exported == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("export ")]
    assert commands and all(line.startswith("fkd ") for line in commands)

    s3fs_clean.mkdir("images")  # the operator's buckets: fkd never makes them
    s3fs_clean.mkdir("keypoints")
    photos = sorted(p.name for p in (sample_dir / "photos").iterdir())
    for name in photos:
        s3fs_clean.put_file(str(sample_dir / "photos" / name), f"images/incoming/{name}")
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(commands)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"\bok\b.*\b{len(photos)}\b", out.stdout), out.stdout
    s3fs_clean.invalidate_cache()
    images = output_tables("s3://keypoints/out")["images"].to_table()
    assert sorted(u.rsplit("/", 1)[1] for u in images.column("image_uri").to_pylist()) == photos
    assert set(images.column("status").to_pylist()) == {"ok"}
