#!/usr/bin/env python3
"""Opens a label store (docs/label-store.md) with pyarrow (pyarrow.parquet and pyarrow.dataset),
DuckDB (read_parquet) and Polars (scan_parquet), and checks in each tool:

- the schema: column names, in order, and types as documented (nullability where the tool shows it);
- the `ldl.*` key-value metadata;
- the rows per source, and that `std`, `entropy`, `mutual_information` are null exactly on the rows
  whose source is not a Monte-Carlo one (`<teacher>.mc`), and that nothing else is null;
- that the chosen rows have the expected hard label and, bit for bit, the expected probability
  vector (float32 stores: the values the Rust reader read; float16 stores (`"dtype": "float16"`):
  the float16 rounding of the float32 values, as the writer stores them).

Usage: check_label_store.py STORE EXPECTED_JSON

EXPECTED_JSON, as tests/python_interop.rs writes it:
    {"k": 4,
     "metadata": {"ldl.format_version": "1", "ldl.k": "4", "ldl.dataset_fingerprint": "...", ...},
     "metadata_json": {"ldl.classes": [...], "ldl.teachers": {"teacher": "<fp>"},
                       "ldl.temperature": 1.0, ...},
     "rows_per_source": {"teacher": 160, "teacher.mc": 160},
     "rows": [{"source": "teacher", "index": 0, "label": 2,
               "probs": [0.25, ...], "probs_bits": [1048576000, ...]}, ...]}
`metadata` values are compared as strings, `metadata_json` values after parsing the file's string
as JSON; every documented key (REQUIRED_KEYS) must be in one of them. `probs_bits` (the float32 bit
patterns) are authoritative; `probs` is for people reading the file.

Prints one line per tool on success; on any mismatch prints every one found, naming the tool, and
exits 1 (2 for bad arguments).
"""

import json
import sys
import traceback

import numpy as np

MC_SUFFIX = ".mc"
COLUMNS = ["index", "label", "source", "probs", "std", "entropy", "mutual_information"]
OPTIONAL = ["std", "entropy", "mutual_information"]  # null except on `.mc` rows
REQUIRED_KEYS = [
    "ldl.format_version",
    "ldl.k",
    "ldl.classes",
    "ldl.dataset_fingerprint",
    "ldl.teachers",
    "ldl.temperature",
    "ldl.teacher_checkpoints",
    "ldl.program_version",
]


def documented_types(k, dtype="float32"):
    vec = f"fixed_size_list<{dtype}, {k}>"
    return {
        "index": "uint32",
        "label": "uint32",
        "source": "utf8",
        "probs": vec,
        "std": vec,
        "entropy": "float32",
        "mutual_information": "float32",
    }


class View:
    """What one tool sees of the store, in tool-independent terms."""

    def __init__(self, tool):
        self.tool = tool
        self.columns = []  # names, in order
        self.types = {}  # name -> normalised type
        self.nullable = None  # name -> bool, where the tool shows it
        self.metadata = {}  # str -> str
        self.rows_per_source = {}  # source -> rows
        self.nulls = {}  # source -> {column: null count}
        self.chosen = {}  # (source, index) -> list of (label, float32 probs)
        self.notes = []  # tool-specific failures found while building the view


def compare(view, expected):
    """Every difference between a tool's view and the expected store, as messages."""
    out = []
    k = expected["k"]
    dtype = expected.get("dtype", "float32")
    types = documented_types(k, dtype)
    if view.columns != COLUMNS:
        out.append(f"columns {view.columns}, documented {COLUMNS}")
    for name, want in types.items():
        got = view.types.get(name)
        if got is not None and got != want:
            out.append(f"column `{name}` has type {got}, documented {want}")
    if view.nullable is not None:
        for name in COLUMNS:
            want = name in OPTIONAL
            if name in view.nullable and view.nullable[name] != want:
                out.append(
                    f"column `{name}` is {'nullable' if view.nullable[name] else 'not nullable'}, "
                    f"documented {'nullable' if want else 'not nullable'}"
                )

    meta = view.metadata
    for key, want in expected["metadata"].items():
        if meta.get(key) != want:
            out.append(f"metadata `{key}` is {meta.get(key)!r}, expected {want!r}")
    for key, want in expected["metadata_json"].items():
        try:
            got = json.loads(meta[key])
        except (KeyError, TypeError, ValueError) as e:
            out.append(f"metadata `{key}` is {meta.get(key)!r}: not JSON ({e!r})")
            continue
        if got != want:
            out.append(f"metadata `{key}` is {meta[key]!r}, expected {json.dumps(want)!r}")
    if "ldl.classes" in meta:
        try:
            classes = json.loads(meta["ldl.classes"])
        except ValueError:
            classes = None
        if not isinstance(classes, list) or len(classes) != k:
            out.append(f"metadata `ldl.classes` is {meta['ldl.classes']!r}: not a list of K = {k} names")

    if view.rows_per_source != expected["rows_per_source"]:
        out.append(f"rows per source {view.rows_per_source}, expected {expected['rows_per_source']}")
    for source, rows in sorted(view.rows_per_source.items()):
        nulls = view.nulls.get(source, {})
        for col in COLUMNS:
            got = nulls.get(col)
            want = rows if (col in OPTIONAL and not source.endswith(MC_SUFFIX)) else 0
            if got != want:
                out.append(
                    f"source `{source}`: column `{col}` has {got} null(s) in {rows} rows, expected {want}"
                )

    for row in expected["rows"]:
        key = (row["source"], row["index"])
        found = view.chosen.get(key, [])
        where = f"row (source `{key[0]}`, index {key[1]})"
        if len(found) != 1:
            out.append(f"{where}: found {len(found)} time(s), expected once")
            continue
        label, probs = found[0]
        if label != row["label"]:
            out.append(f"{where}: label {label}, expected {row['label']}")
        # A tool may widen float16 to float32 (DuckDB does); narrowing back is exact.
        float_t, bits_t = (np.float16, np.uint16) if dtype == "float16" else (np.float32, np.uint32)
        want = np.array(row["probs_bits"], dtype=bits_t).view(float_t)
        probs = np.asarray(probs, dtype=float_t)
        if probs.shape != want.shape:
            out.append(f"{where}: {probs.shape[0]} probabilities, expected {want.shape[0]}")
            continue
        differ = np.nonzero(probs.view(bits_t) != want.view(bits_t))[0]
        if differ.size:
            detail = ", ".join(
                f"class {c}: {float(probs[c])!r} (bits {int(probs.view(bits_t)[c]):#x}), "
                f"Rust wrote {float(want[c])!r} (bits {int(want.view(bits_t)[c]):#x})"
                for c in differ[:4]
            )
            out.append(f"{where}: probabilities differ from Rust's in {differ.size} class(es): {detail}")
    return view.notes + out


# ---------------------------------------------------------------------------------------------
# pyarrow


def arrow_type(t):
    import pyarrow as pa

    if pa.types.is_uint32(t):
        return "uint32"
    if pa.types.is_string(t):
        return "utf8"
    if pa.types.is_float32(t):
        return "float32"
    if pa.types.is_float16(t):
        return "float16"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{arrow_type(t.value_type)}, {t.list_size}>"
    return f"arrow {t}"


def view_of_arrow_table(view, table, chosen_keys):
    """Fills counts, nulls and chosen rows of `view` from a pyarrow Table."""
    import pyarrow.compute as pc

    source = table.column("source")
    for s in sorted(pc.unique(source).to_pylist(), key=str):
        part = table.filter(pc.equal(source, s))
        view.rows_per_source[s] = part.num_rows
        view.nulls[s] = {c: part.column(c).null_count for c in COLUMNS}
    index = table.column("index")
    for s, i in chosen_keys:
        rows = table.filter(pc.and_(pc.equal(source, s), pc.equal(index, i)))
        view.chosen[(s, i)] = [
            (rows.column("label")[r].as_py(), rows.column("probs")[r].values.to_numpy())
            for r in range(rows.num_rows)
        ]


def view_pyarrow_parquet(store, expected, chosen_keys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    view = View(f"pyarrow {pa.__version__} (pyarrow.parquet)")
    pf = pq.ParquetFile(store)
    schema = pf.schema_arrow
    view.columns = schema.names
    view.types = {f.name: arrow_type(f.type) for f in schema}
    view.nullable = {f.name: f.nullable for f in schema}
    view.metadata = {
        k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items() if k.startswith(b"ldl.")
    }
    # The documented storage: zstd, BYTE_STREAM_SPLIT probabilities, one source per row group of
    # at most 8192 rows.
    md = pf.metadata
    names = [md.schema.column(c).path for c in range(md.num_columns)]
    src_col = names.index("source")
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows > 8192:
            view.notes.append(f"row group {g} has {rg.num_rows} rows, documented at most 8192")
        st = rg.column(src_col).statistics
        if st is None or not st.has_min_max or st.min != st.max:
            span = f"from {st.min!r} to {st.max!r}" if st is not None and st.has_min_max else "unknown"
            view.notes.append(f"row group {g} does not hold one source (its `source` statistics: {span})")
        for c in range(md.num_columns):
            col = rg.column(c)
            if col.compression != "ZSTD":
                view.notes.append(f"row group {g}, column {col.path_in_schema}: {col.compression}, documented zstd")
            vector = col.path_in_schema.split(".")[0] in ("probs", "std")
            dictionary = {"RLE_DICTIONARY", "PLAIN_DICTIONARY"} & set(col.encodings)
            # float16 vectors are PLAIN (DuckDB cannot decode BYTE_STREAM_SPLIT float16).
            split = expected.get("dtype", "float32") == "float32"
            if vector and (split != ("BYTE_STREAM_SPLIT" in col.encodings) or dictionary):
                view.notes.append(
                    f"row group {g}, column {col.path_in_schema}: encodings {col.encodings}, "
                    f"documented {'BYTE_STREAM_SPLIT' if split else 'PLAIN'} without dictionary"
                )
    table = pq.read_table(store)
    # Every distribution sums to 1 within 1e-4 (documented for `probs`; float16 stores add the
    # worst rounding of K values summing to 1: 2^-11 + K * 2^-25).
    k = expected["k"]
    tolerance = 1e-4 + (2.0**-11 + k * 2.0**-25 if expected.get("dtype") == "float16" else 0.0)
    probs = table.column("probs").combine_chunks().flatten().to_numpy().reshape(-1, k)
    sums = probs.astype(np.float64).sum(axis=1)
    bad = np.nonzero(~(np.abs(sums - 1.0) <= tolerance) | (probs < 0).any(axis=1))[0]
    if bad.size:
        view.notes.append(f"{bad.size} row(s) are not distributions, first file row {bad[0]}: {probs[bad[0]]}")
    view_of_arrow_table(view, table, chosen_keys)
    return view


def view_pyarrow_dataset(store, expected, chosen_keys):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    view = View(f"pyarrow {pa.__version__} (pyarrow.dataset)")
    dataset = ds.dataset(store, format="parquet")
    schema = dataset.schema
    view.columns = schema.names
    view.types = {f.name: arrow_type(f.type) for f in schema}
    view.nullable = {f.name: f.nullable for f in schema}
    # A dataset's schema drops the files' key-value metadata: read it from the (one) fragment.
    fragments = list(dataset.get_fragments())
    if len(fragments) != 1:
        view.notes.append(f"the dataset has {len(fragments)} files, expected the one store")
    view.metadata = {
        k.decode(): v.decode()
        for k, v in (fragments[0].metadata.metadata or {}).items()
        if k.startswith(b"ldl.")
    }
    # Counts and rows through the dataset's filters (pushed down to the row groups), not a full load.
    source = ds.field("source")
    for s in sorted(pc.unique(dataset.to_table(columns=["source"]).column("source")).to_pylist(), key=str):
        view.rows_per_source[s] = dataset.count_rows(filter=source == s)
        part = dataset.to_table(filter=source == s)
        view.nulls[s] = {c: part.column(c).null_count for c in COLUMNS}
    for s, i in chosen_keys:
        rows = dataset.to_table(columns=["label", "probs"], filter=(source == s) & (ds.field("index") == i))
        view.chosen[(s, i)] = [
            (rows.column("label")[r].as_py(), rows.column("probs")[r].values.to_numpy())
            for r in range(rows.num_rows)
        ]
    return view


# ---------------------------------------------------------------------------------------------
# DuckDB


def view_duckdb(store, expected, chosen_keys):
    import duckdb

    view = View(f"duckdb {duckdb.__version__} (read_parquet)")
    con = duckdb.connect()
    quoted = "'" + store.replace("'", "''") + "'"
    con.execute(f"CREATE VIEW store AS SELECT * FROM read_parquet({quoted})")
    described = con.execute("DESCRIBE store").fetchall()
    view.columns = [r[0] for r in described]
    # Parquet has no fixed-size list: DuckDB shows `FLOAT[]` (a list), or `FLOAT[K]` (an array)
    # where it reads the Arrow schema. Either is the documented type when every list has K values.
    for name, dtype, *_ in described:
        if dtype == "UINTEGER":
            t = "uint32"
        elif dtype == "VARCHAR":
            t = "utf8"
        elif dtype == "FLOAT":
            t = "float32"
        elif dtype.startswith("FLOAT[") and dtype.endswith("]"):
            lens = con.execute(
                f'SELECT DISTINCT len("{name}") FROM store WHERE "{name}" IS NOT NULL'
            ).fetchall()
            lens = sorted(r[0] for r in lens)
            # DuckDB has no half type: it widens float16 to FLOAT on read, so a float16 vector
            # shows as FLOAT[] too (the values are checked to be float16 below).
            if len(lens) == 1 and dtype in ("FLOAT[]", f"FLOAT[{lens[0]}]"):
                t = f"fixed_size_list<{expected.get('dtype', 'float32')}, {lens[0]}>"
            else:
                t = f"duckdb {dtype} holding lists of lengths {lens}"
        else:
            t = f"duckdb {dtype}"
        view.types[name] = t
    view.metadata = {
        k: v
        for k, v in con.execute(
            "SELECT decode(key), decode(value) FROM parquet_kv_metadata(?)", [store]
        ).fetchall()
        if k.startswith("ldl.")
    }
    nulls = ", ".join(f'count(*) - count("{c}")' for c in COLUMNS)
    for s, rows, *counts in con.execute(
        f"SELECT source, count(*), {nulls} FROM store GROUP BY source ORDER BY source"
    ).fetchall():
        view.rows_per_source[s] = rows
        view.nulls[s] = dict(zip(COLUMNS, counts))
    for s, i in chosen_keys:
        found = con.execute(
            'SELECT label, probs FROM store WHERE source = ? AND "index" = ?', [s, i]
        ).fetchall()
        # DuckDB hands FLOAT values to Python as doubles, exactly; back to float32 is exact.
        view.chosen[(s, i)] = [(label, np.array(p, dtype=np.float32)) for label, p in found]
    return view


# ---------------------------------------------------------------------------------------------
# Polars


def view_polars(store, expected, chosen_keys):
    import polars as pl

    view = View(f"polars {pl.__version__} (scan_parquet)")
    lf = pl.scan_parquet(store)
    schema = lf.collect_schema()
    view.columns = schema.names()

    def polars_type(t):
        if t == pl.UInt32:
            return "uint32"
        if t == pl.String:
            return "utf8"
        if t == pl.Float32:
            return "float32"
        if t == getattr(pl, "Float16", None):
            return "float16"
        if isinstance(t, pl.Array) and len(t.shape) == 1:
            return f"fixed_size_list<{polars_type(t.inner)}, {t.shape[0]}>"
        return f"polars {t}"

    view.types = {name: polars_type(t) for name, t in schema.items()}
    view.metadata = {
        k: v for k, v in pl.read_parquet_metadata(store).items() if k.startswith("ldl.")
    }
    counts = (
        lf.group_by("source")
        .agg([pl.len().alias("rows")] + [pl.col(c).null_count().alias(f"nulls_{c}") for c in COLUMNS])
        .sort("source")
        .collect()
    )
    for r in counts.iter_rows(named=True):
        view.rows_per_source[r["source"]] = r["rows"]
        view.nulls[r["source"]] = {c: r[f"nulls_{c}"] for c in COLUMNS}
    for s, i in chosen_keys:
        found = (
            lf.filter((pl.col("source") == s) & (pl.col("index") == i)).select("label", "probs").collect()
        )
        view.chosen[(s, i)] = [
            (found["label"][r], found["probs"][r].to_numpy()) for r in range(found.height)
        ]
    return view


TOOLS = [view_pyarrow_parquet, view_pyarrow_dataset, view_duckdb, view_polars]


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        print("usage: check_label_store.py STORE EXPECTED_JSON", file=sys.stderr)
        return 2
    store, expected_path = argv[1], argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    if not expected.get("rows"):
        print(f"{expected_path}: no chosen rows to compare", file=sys.stderr)
        return 2
    unchecked = [k for k in REQUIRED_KEYS if k not in expected["metadata"] and k not in expected["metadata_json"]]
    if unchecked:
        print(f"{expected_path}: no expected value for the documented metadata {unchecked}", file=sys.stderr)
        return 2
    chosen_keys = [(r["source"], r["index"]) for r in expected["rows"]]
    failures = 0
    for tool in TOOLS:
        try:
            view = tool(store, expected, chosen_keys)
            problems = compare(view, expected)
            name = view.tool
        except Exception:
            name = tool.__name__.removeprefix("view_")
            problems = ["raised:\n" + traceback.format_exc()]
        if problems:
            failures += 1
            for p in problems:
                print(f"FAIL {name}: {p}", file=sys.stderr)
        else:
            rows = sum(view.rows_per_source.values())
            print(
                f"ok {name}: schema and ldl.* metadata as documented, {rows} rows in "
                f"{len(view.rows_per_source)} sources {sorted(view.rows_per_source)}, "
                f"{len(chosen_keys)} chosen rows bit-equal to Rust's"
            )
    if failures:
        print(f"{store}: {failures} of {len(TOOLS)} tools disagree with the documentation or with Rust", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
