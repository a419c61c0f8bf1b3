"""DuckDB over annotate output (local or any fsspec store), for ``fkd query`` and analysts."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from fkd_core.errors import UserError
from fkd_core.parquet_io import keypoints_from_column, output_tables
from fkd_core.types import Box


def connect(out: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views ``images`` and ``faces`` over ``out``.

    The tables are scanned through pyarrow datasets, so ``s3://`` works without DuckDB's httpfs extension
    (which would have to be downloaded at run time).
    """
    con = duckdb.connect()
    for name, ds in output_tables(out).items():
        con.register(name, ds)
    return con


class NoSuchImage(UserError):
    """No image, or more than one, matches the name asked for."""


@dataclass
class ImageFaces:
    """One image's faces as the latest run that annotated it wrote them."""

    uri: str
    run_id: str
    boxes: list[Box]
    keypoints: list[np.ndarray]  # (68, 2) image pixels per face
    quality: list[float | None]
    face_prob: list[float | None]

    def labels(self) -> list[str]:
        """``#i q 0.03 face 0.98`` per face (``#i`` alone without trust columns)."""
        return [
            f"#{i} q {q:.2f} face {p:.2f}" if q is not None and p is not None else f"#{i}"
            for i, (q, p) in enumerate(zip(self.quality, self.face_prob, strict=True))
        ]


def image_faces(out: str, image: str, run_id: str | None = None) -> ImageFaces:
    """The faces of the image whose URI is ``image`` or ends with it, from the latest run (or run ``run_id``) under
    ``out``; a name matching no image, or several, is a :class:`NoSuchImage` saying so."""
    con = connect(out)
    cond = "run_id = $run" if run_id else "true"
    run = {"run": run_id} if run_id else {}
    sql = f"select distinct image_uri from images where (image_uri = $img or image_uri like '%' || $img) and {cond}"
    uris = [r[0] for r in con.sql(sql, params={"img": image, **run}).fetchall()]
    if not uris:
        raise NoSuchImage(f"no image matching {image!r} in {out}")
    if len(uris) > 1:
        raise NoSuchImage(f"{image!r} matches {len(uris)} images, e.g. {uris[:3]}")
    uri = uris[0]
    latest = con.sql(f"select max(run_id) from images where image_uri = $u and {cond}", params={"u": uri, **run})
    latest = latest.fetchall()[0][0]
    faces = con.sql(
        "select * from faces where image_uri = $u and run_id = $r order by face_index", params={"u": uri, "r": latest}
    ).to_arrow_table()
    cols = ("box_x", "box_y", "box_w", "box_h")
    boxes = [Box(*r) for r in zip(*(faces.column(c).to_pylist() for c in cols), strict=True)]
    kx, ky = keypoints_from_column(faces.column("keypoints_x")), keypoints_from_column(faces.column("keypoints_y"))
    names = set(faces.column_names)
    trust = {c: faces.column(c).to_pylist() if c in names else [None] * len(boxes) for c in ("quality", "face_prob")}
    kps = [np.stack([x, y], axis=1) for x, y in zip(kx, ky, strict=True)]
    return ImageFaces(uri, latest, boxes, kps, trust["quality"], trust["face_prob"])
