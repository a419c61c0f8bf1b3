"""Size of a faces file: plain zstd Parquet against fkd's writer (BYTE_STREAM_SPLIT floats, no float dictionary).

    python benchmarks/bench_parquet.py [--n 1400]

Annotates N training frames (the local runner, the shipped model), reads the run's faces back as one table and
writes it both ways into memory; reports both sizes, the ratio, and that the values read back are identical.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT.parent / "shared" / "data" / "facial-keypoints" / "training"


def main() -> None:
    from fkd_core.parquet_io import FACES_SCHEMA, dataset, write_table
    from fkd_flows.annotate import annotate

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1400)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for p in sorted(IMAGES.iterdir())[: args.n]:
            (src / p.name).symlink_to(p)
        annotate(source=str(src), out=f"{tmp}/out", run_id="bench", shard_size=args.n)
        faces = dataset(f"{tmp}/out/faces", schema=FACES_SCHEMA, partitioning="runs").to_table(
            columns=FACES_SCHEMA.names
        )
        plain = io.BytesIO()
        pq.write_table(faces, plain, compression="zstd")
        write_table(faces, f"{tmp}/fkd.parquet", FACES_SCHEMA, {"model_id": "bench"})
        fkd_bytes = Path(f"{tmp}/fkd.parquet").read_bytes()
        back = pq.read_table(io.BytesIO(fkd_bytes))
        same = back.drop_columns([]).cast(FACES_SCHEMA).equals(faces.cast(FACES_SCHEMA))
        meta = {k.decode(): v.decode() for k, v in (back.schema.metadata or {}).items() if k.startswith(b"fkd.")}
    size_plain, size_fkd = len(plain.getvalue()), len(fkd_bytes)
    print(
        json.dumps(
            {
                "frames": args.n,
                "faces": faces.num_rows,
                "plain_zstd_mb": round(size_plain / 1e6, 3),
                "fkd_mb": round(size_fkd / 1e6, 3),
                "fkd_over_plain": round(size_fkd / size_plain, 3),
                "identical_values": same,
                "metadata": meta,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
