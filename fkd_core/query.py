"""DuckDB over annotate output (local or any fsspec store), for ``fkd query`` and analysts."""

from __future__ import annotations

import duckdb

from fkd_core.parquet_io import output_tables


def connect(out: str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views ``images`` and ``faces`` over ``out``.

    The tables are scanned through pyarrow datasets, so ``s3://`` works without DuckDB's httpfs extension
    (which would have to be downloaded at run time).
    """
    con = duckdb.connect()
    for name, ds in output_tables(out).items():
        con.register(name, ds)
    return con
