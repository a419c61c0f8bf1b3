"""annotate's shard work without Prefect: statuses, tables, and keypoints that follow their faces."""

import datetime as dt

import cv2
import numpy as np
import pyarrow.parquet as pq

from fkd_core.annotate import ShardConfig, annotate_images, annotate_to_tables, tables
from fkd_core.geometry import CropPolicy
from fkd_core.image_io import list_images
from fkd_core.layout import AnnotateOutput
from fkd_core.model import NaimishNet
from fkd_core.parquet_io import FACES_SCHEMA, IMAGES_SCHEMA, write_table
from fkd_core.predict import Predictor
from fkd_core.storage import iter_read


class _Centre(NaimishNet):
    """A stand-in network that always answers the crop centre, so expected keypoints are known exactly."""

    def forward(self, x):
        return x.new_zeros(x.shape[0], 136)


def test_shard_statuses_and_keypoints_in_original_pixels(corrupt_dir, tmp_path):
    pred = Predictor(_Centre().eval(), CropPolicy(), backend="torch")
    uris = list_images(str(corrupt_dir))
    images = annotate_images(iter_read(uris), pred, ShardConfig(max_pixels=20_000_000))
    by_name = {im.uri.rsplit("/", 1)[-1]: im for im in images}
    assert [im.uri for im in images] == uris
    for bad in ("truncated.jpg", "empty.jpg", "not_an_image.png", "garbage.jpg", "bomb.png"):
        im = by_name[bad]
        assert im.status == "error" and im.error and im.boxes == [] and im.faces == []
    assert by_name["blank.png"].status == "no_face"
    obamas = by_name["obamas.jpg"]
    h, w = cv2.imread(str(corrupt_dir / "obamas.jpg")).shape[:2]
    assert obamas.status == "ok" and len(obamas.boxes) == 2 and (obamas.width, obamas.height) == (w, h)
    for box, kp in zip(obamas.boxes, [f.keypoints for f in obamas.faces], strict=True):
        # normalised (0, 0) is the centre of the crop square (box centre moved down by shift_y * h); keypoints
        # count pixels by index, whose centres sit half a pixel inside the continuous box edges
        assert np.allclose(kp, [box.cx - 0.5, box.cy + CropPolicy().shift_y * box.h - 0.5], atol=0.01)
    img_tbl, face_tbl = tables(images, "m-000000000000", dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert img_tbl.num_rows == len(uris) and face_tbl.num_rows == sum(len(im.boxes) for im in images)
    # the shard function takes bytes and returns tables; what it returns is what the contracts accept
    out = annotate_to_tables(iter_read(uris), pred, ShardConfig(max_pixels=20_000_000))
    c = out.counts
    assert (c.images, c.error, c.no_face, c.faces) == (len(uris), 5, 1, face_tbl.num_rows)
    for name, tbl, schema in (("faces", out.faces, FACES_SCHEMA), ("images", out.images, IMAGES_SCHEMA)):
        write_table(tbl, AnnotateOutput(str(tmp_path)).part(name, "r", 7), schema, {"model_id": pred.model_id})
        written = pq.read_table(tmp_path / name / "run_id=r" / "part-00007.parquet")
        assert written.schema.remove_metadata().equals(schema) and written.num_rows == tbl.num_rows
        assert written.schema.metadata[b"fkd.model_id"] == pred.model_id.encode()


def test_a_shard_told_to_stop_gives_up_at_its_next_file(sample_dir):
    """The run's stop is its own signal, not an error raised from the progress report: once it is set the shard
    reads no further file and raises ShardCancelled (so no part is written)."""
    import threading

    import pytest

    from fkd_core.annotate import ShardCancelled

    pred = Predictor(_Centre().eval(), CropPolicy(), backend="torch")
    uris = list_images(str(sample_dir / "images"))
    read: list[str] = []

    def reads():
        for u, d in iter_read(uris):
            read.append(u)
            yield u, d

    stop = threading.Event()
    reports: list[int] = []

    def progress(n: int, faces: int) -> None:
        reports.append(n)
        stop.set()  # the run stops while the first batch is reported

    with pytest.raises(ShardCancelled, match="the run is stopping"):
        annotate_to_tables(reads(), pred, ShardConfig(model_every=8, threads=1), progress, stop=stop)
    assert reports and len(read) < len(uris)  # it stopped well before the end
    assert len(annotate_images(iter_read(uris), pred, ShardConfig(model_every=8, threads=1))) == len(uris)
