"""Parquet schemas (the data contracts of docs/design.md), the Parquet writer, and dataset readers."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fkd_core.storage import exists, url_to_fs, write_bytes
from fkd_core.types import NUM_KEYPOINTS

KP_TYPE = pa.list_(pa.float32(), NUM_KEYPOINTS)
TS_TYPE = pa.timestamp("us", tz="UTC")

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("person", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("crop_size", pa.int16(), nullable=False),
        pa.field("crop", pa.binary(), nullable=False),  # crop_size**2 bytes, grayscale uint8, row-major
        pa.field("keypoints_x", KP_TYPE, nullable=False),  # canonical-crop pixels
        pa.field("keypoints_y", KP_TYPE, nullable=False),
        pa.field("box_x", pa.float32(), nullable=False),  # detector(-like) box in original pixels
        pa.field("box_y", pa.float32(), nullable=False),
        pa.field("box_w", pa.float32(), nullable=False),
        pa.field("box_h", pa.float32(), nullable=False),
        pa.field("box_source", pa.string(), nullable=False),  # "haar" or "keypoints"
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | no_face | error
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("n_faces", pa.int16(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("created_at", TS_TYPE, nullable=False),
        # the listed file's version (local: size and mtime; object store: ETag): --incremental redoes a replaced file
        pa.field("source_version", pa.string()),
    ]
)

FACES_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("face_index", pa.int16(), nullable=False),
        pa.field("box_x", pa.int32(), nullable=False),
        pa.field("box_y", pa.int32(), nullable=False),
        pa.field("box_w", pa.int32(), nullable=False),
        pa.field("box_h", pa.int32(), nullable=False),
        pa.field("keypoints_x", KP_TYPE, nullable=False),  # original image pixels, iBUG 300-W order
        pa.field("keypoints_y", KP_TYPE, nullable=False),
        # how far to trust the face (fkd_core.trust; docs/design.md "Trust per face")
        pa.field("det_score", pa.float32()),  # the cascade's level weight for the box
        pa.field("yaw", pa.float32(), nullable=False),  # head turn: 0 frontal, +-1 nose in line with an eye corner
        pa.field("face_prob", pa.float32()),  # P(the box holds an upright face); null without trust heads
        pa.field("quality", pa.float32()),  # P(NME > 0.10), lower is better; null without trust heads
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("created_at", TS_TYPE, nullable=False),
    ]
)


def keypoint_column(values: Sequence[np.ndarray] | np.ndarray) -> pa.FixedSizeListArray:
    """(N, 68) floats -> fixed_size_list<float32>[68] array."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1, NUM_KEYPOINTS)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel(), pa.float32()), NUM_KEYPOINTS)


def keypoints_from_column(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float32>[68] -> (N, 68) float32."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, NUM_KEYPOINTS)


def validate(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast ``table`` to ``schema`` (column order and types), refusing missing columns or nulls in required ones."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    table = table.select(schema.names).cast(schema)
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise ValueError(f"column {f.name!r} has nulls but is required")
    return table


def write_table(table: pa.Table, uri: str, schema: pa.Schema | None = None, meta: dict[str, str] | None = None) -> None:
    """Write one Parquet file so that readers never see a partial file.

    Local files are written beside and renamed into place; object stores publish a single PUT atomically.
    Floating-point columns (the keypoints above all) are stored with BYTE_STREAM_SPLIT and no dictionary, which
    zstd compresses far better than plain floats; every other column keeps its dictionary. The file's key-value
    metadata says which contract and which fkd wrote it (:func:`file_metadata`), plus ``meta`` (e.g. the model id).
    """
    if schema is not None:
        table = validate(table, schema)
    floats = [f for f in table.schema if _is_float(f.type)]
    encoding = {_leaf_path(f): "BYTE_STREAM_SPLIT" for f in floats}
    dictionary = [f.name for f in table.schema if f not in floats]
    table = table.replace_schema_metadata((table.schema.metadata or {}) | file_metadata(meta))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", use_dictionary=dictionary, column_encoding=encoding)
    write_bytes(sink.getvalue().to_pybytes(), uri)


SCHEMA_VERSION = "2"  # the data contracts' version: 2 added the faces' trust columns (det_score, yaw, ...)


def file_metadata(meta: dict[str, str] | None = None) -> dict[bytes, bytes]:
    """The key-value metadata fkd writes into every Parquet file: ``fkd.schema_version``, ``fkd.version`` and
    ``meta`` under ``fkd.<key>``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        fkd_version = version("fkd")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
        fkd_version = "unknown"
    kv = {"schema_version": SCHEMA_VERSION, "version": fkd_version} | (meta or {})
    return {f"fkd.{k}".encode(): str(v).encode() for k, v in kv.items()}


def _is_float(t: pa.DataType) -> bool:
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        return _is_float(t.value_type)
    return pa.types.is_floating(t)


def _leaf_path(f: pa.Field) -> str:
    """The Parquet column path of a flat or list field (``keypoints_x.list.element``)."""
    return f"{f.name}.list.element" if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type) else f.name


RUN_PARTITIONING = pads.partitioning(pa.schema([pa.field("run_id", pa.string())]), flavor="hive")


def dataset(uri: str, schema: pa.Schema | None = None, partitioning=None) -> pads.Dataset:
    """A lazily scanned Parquet dataset under a directory or prefix.

    ``partitioning="runs"`` reads the ``run_id=<id>/`` layout of annotate output with ``run_id`` as a string.

    A directory is read as its ``part-*.parquet`` files only (``run_id=*/part-*.parquet`` with ``"runs"``), so an
    interrupted writer's hidden temporary files, or anything else put there, are never read.
    """
    fs, path = url_to_fs(uri)
    if partitioning == "runs" or fs.isdir(path):
        # only fkd's own part files: a README.md or a stray file dropped into the directory is never read
        # one flat, fresh listing (no glob: a "[" in the path would match nothing, and s3fs globs level by level
        # from its listing cache), filtered by name
        base = path.rstrip("/")
        pattern = _RUN_PART if partitioning == "runs" else _PART
        files = sorted(f for f in fs.find(base) if pattern.fullmatch(f[len(base) + 1 :]))
        return pads.dataset(
            files,
            filesystem=fs,
            format="parquet",
            partitioning=RUN_PARTITIONING if partitioning == "runs" else partitioning,
            partition_base_dir=path.rstrip("/"),
            schema=schema,
            exclude_invalid_files=False,
        )
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning, schema=schema)


_PART = re.compile(r"part-\d+\.parquet")
_RUN_PART = re.compile(r"run_id=[^/]+/part-\d+\.parquet")


def read_examples(uri: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Canonical crops (N, C, C) uint8, keypoints (N, 68, 2) in crop pixels, and image ids of a split.

    Training needs random access to every example, so this materialises the split (about 20 KB a face).
    """
    import pyarrow.compute as pc

    ds = dataset(uri, schema=EXAMPLES_SCHEMA)
    flt = pc.field("split") == split if split else None
    tbl = ds.to_table(columns=["image_id", "crop_size", "crop", "keypoints_x", "keypoints_y"], filter=flt)
    tbl = tbl.sort_by("image_id")  # part order depends on scheduling; sorting makes training deterministic
    n = tbl.num_rows
    if n == 0:
        return np.zeros((0, 1, 1), np.uint8), np.zeros((0, NUM_KEYPOINTS, 2), np.float32), []
    sizes = set(tbl.column("crop_size").to_pylist())
    if len(sizes) != 1:
        raise ValueError(f"{uri}: examples have mixed crop sizes {sorted(sizes)}")
    c = sizes.pop()
    crops = np.frombuffer(b"".join(tbl.column("crop").to_pylist()), np.uint8).reshape(n, c, c)
    kp = np.stack(
        [keypoints_from_column(tbl.column("keypoints_x")), keypoints_from_column(tbl.column("keypoints_y"))], axis=-1
    )
    return crops, kp, tbl.column("image_id").to_pylist()


def output_tables(out: str) -> dict[str, pads.Dataset]:
    """The annotate output's ``images`` and ``faces`` tables (``run_id`` included) as lazy datasets."""
    from fkd_core.layout import AnnotateOutput

    tables, output = {}, AnnotateOutput(out)
    for name, schema in (("images", IMAGES_SCHEMA), ("faces", FACES_SCHEMA)):
        uri = output.table(name)
        full = pa.schema([*schema, pa.field("run_id", pa.string())])
        if exists(uri):
            tables[name] = dataset(uri, schema=full, partitioning="runs")
        elif exists(output.runs):  # only runs with nothing to do so far: empty tables
            tables[name] = pads.dataset(full.empty_table())
        else:
            raise FileNotFoundError(f"no {name}/ table under {out}: is it an fkd annotate output?")
    return tables
