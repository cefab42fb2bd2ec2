"""Rewrites a label store as pyarrow, Polars and DuckDB write a table they read, keeping its
`ldl.*` metadata the way each tool keeps metadata, so the Rust reader can be checked on stores
written outside Rust: python rewrite_label_store.py STORE OUT_DIR (writes pyarrow.parquet,
polars.parquet and duckdb.parquet into OUT_DIR and prints their paths)."""

import pathlib
import sys

import duckdb
import polars as pl
import pyarrow.parquet as pq


def main(store, out):
    out = pathlib.Path(out)
    footer = pq.read_metadata(store).metadata
    keys = {k.decode(): v.decode() for k, v in footer.items() if k.startswith(b"ldl.")}
    assert keys, "the store has no ldl.* metadata"

    # pyarrow: the table's schema carries the keys (the writer puts them there).
    table = pq.read_table(store)
    assert table.schema.metadata and b"ldl.k" in table.schema.metadata, table.schema.metadata
    pq.write_table(table, out / "pyarrow.parquet")

    # Polars: its own list items (`element`, nullable) and strings; the keys as its metadata.
    pl.read_parquet(store).write_parquet(out / "polars.parquet", metadata=keys)

    # DuckDB: plain lists and no Arrow schema; the keys by COPY's KV_METADATA.
    def quoted(s):
        return "'" + s.replace("'", "''") + "'"

    kv = ", ".join(f"{quoted(k)}: {quoted(v)}" for k, v in keys.items())
    target = out / "duckdb.parquet"
    duckdb.connect().execute(
        f"COPY (SELECT * FROM read_parquet({quoted(str(store))})) TO {quoted(str(target))} "
        f"(FORMAT parquet, KV_METADATA {{{kv}}})"
    )
    for name in ["pyarrow", "polars", "duckdb"]:
        print(out / f"{name}.parquet")


if __name__ == "__main__":
    main(*sys.argv[1:])
