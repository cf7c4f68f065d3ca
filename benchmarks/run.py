"""Benchmark: incremental_assets against baselines, PostgreSQL -> Parquet, in one run.

    .venv/bin/python benchmarks/run.py                  # quick check (200k rows)
    .venv/bin/python benchmarks/run.py --rows 2000000   # the reference size

Builds ``bench_orders_<rows>`` (9 mixed columns, ``modified`` timestamptz indexed: the watermark)
in the database ``bench`` of the local PostgreSQL (created if missing), then measures each case
in its own subprocess (wall time, rows/s, peak RSS of that process via ``wait4`` in a launcher) and prints a
table with each time's ratio to ``COPY (SELECT ...) TO STDOUT (FORMAT binary)``; the table is
saved to ``benchmarks/results/latest.md`` with the date and the machine. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
VENV_BIN = Path(sys.executable).parent
CLI = VENV_BIN / "incremental-assets"
COLUMNS = "id, qty, amount, score, note, code, active, modified, day"
SPACING_SECONDS = 3  # between consecutive rows' watermarks: 2M rows span ~70 days
SPREAD_DAYS = 730  # the span of the same rows in the table of a case with a window a day for two years
SCATTERED_DAYS = 365  # the same, for a table whose rows are stored in another order than the watermark's


# ------------------------------------------------------------------------------------------------
# database


def pg_conninfo(args, database: str) -> str:
    return f"host={args.host} port={args.port} user={args.user} dbname={database}"


def pg_uri(args, database: str) -> str:
    return f"postgresql://{args.user}@{args.host}:{args.port}/{database}"


def sa_url(args, database: str) -> str:
    return f"postgresql+psycopg://{args.user}@{args.host}:{args.port}/{database}"


def build_table(args, rows: int) -> str:
    import psycopg

    with psycopg.connect(pg_conninfo(args, "postgres"), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.database,)).fetchone():
            conn.execute(f'CREATE DATABASE "{args.database}"')
    table = f"bench_orders_{rows}"
    with psycopg.connect(pg_conninfo(args, args.database), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, qty int, amount numeric(12,2), score float8, "
            "note text, code varchar(40), active bool, modified timestamptz NOT NULL, day date)"
        )
        # watermarks end 2 minutes ago; microseconds vary; values are deterministic but for now()
        conn.execute(
            f"INSERT INTO {table} SELECT g, ((g * 7919) % 100000)::int, ((g * 13) % 10000000) / 100.0, "
            "(g % 9973) / 7.0, 'note ' || md5(g::text), 'code-' || (g % 5000), g % 3 = 0, "
            f"now() - interval '2 minutes' - (({rows} - g) * interval '{SPACING_SECONDS} seconds') "
            "- (g % 1000000) * interval '1 microsecond', date '2024-01-01' + (g % 700)::int "
            f"FROM generate_series(1::bigint, {rows}) AS g"
        )
        conn.execute(f"CREATE INDEX ON {table} (modified)")
        conn.execute(f"VACUUM ANALYZE {table}")
    return table


def build_spread_table(args, table: str, days: int, *, scattered: bool = False) -> str:
    """``table``'s rows with watermarks spread over ``days`` days to 2 minutes ago, with the same
    indexes: stored in watermark order, as rows appended as they come are, or ``scattered``
    (the watermarks a fixed permutation of the ids: rows written at random times)."""
    import psycopg

    spread = f"{table}_{days}d" + ("_scattered" if scattered else "")
    seconds = days * 86400 / args.rows
    # 7919 is prime and no factor of the row counts used: a permutation of 0 .. rows - 1
    position = f"(id * 7919) % {args.rows}" if scattered else "id"
    with psycopg.connect(pg_conninfo(args, args.database), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {spread}")
        conn.execute(f"CREATE TABLE {spread} (LIKE {table} INCLUDING ALL)")
        conn.execute(
            f"INSERT INTO {spread} SELECT id, qty, amount, score, note, code, active, "
            f"now() - interval '2 minutes' - (({args.rows} - {position}) * interval '{seconds} seconds') "
            f"- (id % 1000000) * interval '1 microsecond', day FROM {table} ORDER BY id"
        )
        conn.execute(f"VACUUM ANALYZE {spread}")
    return spread


def pg_facts(args) -> dict:
    import psycopg

    with psycopg.connect(pg_conninfo(args, args.database)) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    return {"pg": version}


def first_watermark(args, table: str) -> dt.datetime:
    import psycopg

    with psycopg.connect(pg_conninfo(args, args.database)) as conn:
        return conn.execute(f"SELECT min(modified) FROM {table}").fetchone()[0].astimezone(dt.timezone.utc)


def update_fraction(args, table: str, every: int) -> int:
    import psycopg

    with psycopg.connect(pg_conninfo(args, args.database), autocommit=True) as conn:
        cur = conn.execute(f"UPDATE {table} SET modified = clock_timestamp() WHERE id % {every} = 0")
        return cur.rowcount


# ------------------------------------------------------------------------------------------------
# cases (each runs in a child process: `run.py --child CASE ...`, printing one JSON line)


def child_copy(args, table: str, out: Path) -> dict:
    import psycopg

    t0 = time.perf_counter()
    nbytes = 0
    with psycopg.connect(pg_conninfo(args, args.database)) as conn, open(os.devnull, "wb") as sink:
        with conn.cursor().copy(f"COPY (SELECT {COLUMNS} FROM {table}) TO STDOUT (FORMAT binary)") as copy:
            for chunk in copy:
                sink.write(chunk)
                nbytes += len(chunk)
    return {"seconds": time.perf_counter() - t0, "rows": None, "note": f"{nbytes / 1e6:.0f} MB of COPY data"}


def _parquet_writer(path, schema):
    import pyarrow.parquet as pq

    return pq.ParquetWriter(path, schema, compression="zstd", version="2.6", store_schema=True)


def child_adbc(args, table: str, out: Path) -> dict:
    import adbc_driver_postgresql.dbapi as pg
    import pyarrow as pa

    t0 = time.perf_counter()
    rows = 0
    with pg.connect(pg_uri(args, args.database)) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT {COLUMNS} FROM {table}")  # no parameters: ADBC streams through COPY
        reader = cur.fetch_record_batch()
        schema = pa.schema([pa.field(f.name, _adbc_plain(f.type)) for f in reader.schema])
        writer = _parquet_writer(out / "adbc.parquet", schema)
        for batch in reader:
            columns = [c.storage.cast(pa.decimal128(12, 2)) if f.name == "amount" else c for f, c in zip(batch.schema, batch.columns)]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
            rows += batch.num_rows
        writer.close()
    return {"seconds": time.perf_counter() - t0, "rows": rows}


def _adbc_plain(t):
    import pyarrow as pa

    return pa.decimal128(12, 2) if isinstance(t, pa.BaseExtensionType) else t


def child_pandas(args, table: str, out: Path) -> dict:
    import pandas as pd
    import pyarrow as pa
    import sqlalchemy as sa

    t0 = time.perf_counter()
    rows = 0
    engine = sa.create_engine(sa_url(args, args.database))
    writer = schema = None
    with engine.connect().execution_options(stream_results=True, max_row_buffer=100_000) as conn:
        for frame in pd.read_sql(sa.text(f"SELECT {COLUMNS} FROM {table}"), conn, chunksize=100_000):
            batch = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                schema = batch.schema.remove_metadata()
                writer = _parquet_writer(out / "pandas.parquet", schema)
            writer.write_table(batch.cast(schema))
            rows += len(frame)
    writer.close()
    engine.dispose()
    return {"seconds": time.perf_counter() - t0, "rows": rows}


def child_connectorx(args, table: str, out: Path) -> dict:
    import connectorx as cx

    t0 = time.perf_counter()
    reader = cx.read_sql(pg_uri(args, args.database), f"SELECT {COLUMNS} FROM {table}", return_type="arrow_stream",
                         batch_size=100_000)
    rows = _into_parquet(reader, out / "connectorx.parquet")
    return {"seconds": time.perf_counter() - t0, "rows": rows, "note": "amount lands as float64 (connectorx has no decimal)"}


def _into_parquet(batches, path: Path) -> int:
    """Write a stream of batches into one zstd Parquet file; its rows."""
    rows, writer = 0, None
    for batch in batches:
        if writer is None:
            writer = _parquet_writer(path, batch.schema)
        writer.write_batch(batch)
        rows += batch.num_rows
    writer.close()
    return rows


def child_engine(args, table: str, out: Path, url: str | None = None) -> dict:
    """The engine alone: one slice of the whole table into a local Parquet landing."""
    t0 = time.perf_counter()
    from incremental_assets import use_system_memory_pool

    use_system_memory_pool()  # as the project's entry points do, before pyarrow loads
    from incremental_assets.copying import slice_stem
    from incremental_assets.landing import open_landing_store
    from incremental_assets.sources import Source

    source = Source("bench", url or sa_url(args, args.database))
    info = source.describe_table(table, watermark_column="modified")
    horizon = source.safe_horizon(info).value
    store = open_landing_store(str(out / "landing"), "parquet")
    t1 = time.perf_counter()
    files = store.write_slice(table, "all", slice_stem(info.kind, None, horizon), info.schema,
                              source.read_slice(info, None, horizon, batch_size=args.batch_size),
                              max_rows_per_file=1_000_000)
    source.dispose()
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "rows": sum(f.rows for f in files),
            "note": f"read+write {t2 - t1:.2f}s, {len(files)} file(s), {sum(f.bytes for f in files) / 1e6:.0f} MB"}


# ------------------------------------------------------------------------------------------------
# MariaDB: the generic path (SQLAlchemy streaming) through each driver, beside the C client and
# ConnectorX


def mariadb_url(args, driver: str = "pymysql") -> str:
    return f"mysql+{driver}://{args.mariadb_user}@{args.mariadb_host}:{args.mariadb_port}/{args.mariadb_database}"


def mariadb_connect(args):
    import pymysql

    return pymysql.connect(host=args.mariadb_host, port=args.mariadb_port, user=args.mariadb_user,
                           database=args.mariadb_database, autocommit=True)


def build_mariadb_table(args, rows: int) -> str:
    """The benchmark's 9 columns in MariaDB (``modified`` as DATETIME(6), indexed), from the
    server's own sequence engine."""
    table = f"bench_orders_{rows}"
    conn = mariadb_connect(args)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, qty int, amount decimal(12,2), score double, "
                "note text, code varchar(40), active bool, modified datetime(6) NOT NULL, day date, KEY (modified))"
            )
            cur.execute(
                f"INSERT INTO {table} SELECT seq, (seq * 7919) % 100000, ((seq * 13) % 10000000) / 100.0, "
                "(seq % 9973) / 7.0, concat('note ', md5(seq)), concat('code-', seq % 5000), seq % 3 = 0, "
                f"utc_timestamp(6) - interval 2 minute - interval (({rows} - seq) * {SPACING_SECONDS}) second "
                "- interval (seq % 1000000) microsecond, date '2024-01-01' + interval (seq % 700) day "
                f"FROM seq_1_to_{rows}"
            )
            cur.execute(f"ANALYZE TABLE {table}")
    finally:
        conn.close()
    return table


def child_mariadb_connectorx(args, table: str, out: Path) -> dict:
    """ConnectorX's stream into Parquet. Its stream reads ahead of the writer without bound: a
    consumer that pauses finds the whole result in memory (2M rows: 301 MB)."""
    import connectorx as cx

    t0 = time.perf_counter()
    uri = f"mysql://{args.mariadb_user}@{args.mariadb_host}:{args.mariadb_port}/{args.mariadb_database}"
    rows = _into_parquet(cx.read_sql(uri, f"SELECT * FROM {table}", return_type="arrow_stream", batch_size=100_000),
                         out / "connectorx.parquet")
    return {"seconds": time.perf_counter() - t0, "rows": rows, "note": "decimal(12,2) lands as decimal(38,10)"}


def child_mariadb_client(args, table: str, out: Path) -> dict:
    """``mariadb --quick`` (the C client, row by row to text) into /dev/null: the server's and the
    wire's cost, as COPY is for PostgreSQL."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        subprocess.run(["mariadb", "--batch", "--quick", "-h", args.mariadb_host, "-P", str(args.mariadb_port),
                        "-u", args.mariadb_user, args.mariadb_database, "-e", f"SELECT {COLUMNS} FROM {table}"],
                       stdout=devnull, check=True)
    return {"seconds": time.perf_counter() - t0, "rows": args.mariadb_rows}


MERGE_ROWS = 1_000_000


def _merge_slice(args, table: str):
    """The first MERGE_ROWS rows of the table as one slice (what one landed file holds)."""
    import pyarrow as pa

    from incremental_assets.sources import Source

    source = Source("bench", sa_url(args, args.database))
    info = source.describe_table(table, watermark_column="modified")
    batches, rows = [], 0
    for batch in source.read_slice(info, None, None, batch_size=args.batch_size):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= MERGE_ROWS:
            break
    source.dispose()
    return pa.Table.from_batches(batches).slice(0, MERGE_ROWS)


def _with_ids(data, ids):
    import pyarrow as pa

    return data.set_column(data.schema.get_field_index("id"), pa.field("id", pa.int64(), nullable=False), ids)


MERGE_CASES = {
    # case: (what the table holds before, what is merged) -- as functions of the slice
    "merge_empty": (None, lambda d, pc: d),
    "merge_after": (lambda d, pc: d, lambda d, pc: _with_ids(d, pc.add(d.column("id"), 10 ** 12))),
    "merge_between": (lambda d, pc: _with_ids(d, pc.multiply(d.column("id"), 2)),
                      lambda d, pc: _with_ids(d, pc.add(pc.multiply(d.column("id"), 2), 1))),
    "merge_updates": (lambda d, pc: d, lambda d, pc: _changed(d, pc)),
}


def _changed(data, pc):
    """Every row of ``data`` changed: one more of ``qty``, an hour later ``modified``."""
    import datetime

    import pyarrow as pa

    for name, value in (("qty", pa.scalar(1, data.schema.field("qty").type)),
                        ("modified", pa.scalar(datetime.timedelta(hours=1), pa.duration("us")))):
        i = data.schema.get_field_index(name)
        data = data.set_column(i, data.schema.field(i), pc.add(data.column(name), value))
    return data


def _merge(args, table: str, case: str) -> dict:
    """Replica.merge of a 1M-row slice into a fresh PostgreSQL schema, after an untimed merge of
    what the table should already hold (see MERGE_CASES)."""
    from incremental_assets import use_system_memory_pool

    use_system_memory_pool()  # as the project's entry points do, before pyarrow loads
    import pyarrow.compute as pc
    import sqlalchemy as sa

    from incremental_assets.replica import Replica

    data = _merge_slice(args, table)
    before, merged = MERGE_CASES[case]
    schema = f"bench_merge_{os.getpid()}"
    admin = sa.create_engine(sa_url(args, args.database))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    replica = Replica(sa_url(args, args.database), schema=schema)
    try:
        if before is not None:
            replica.merge("orders", before(data, pc), ["id"], version_column="modified")
        slice_ = merged(data, pc)
        t0 = time.perf_counter()
        result = replica.merge("orders", slice_, ["id"], version_column="modified")
        seconds = time.perf_counter() - t0
    finally:
        replica.engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return {"seconds": seconds, "rows": slice_.num_rows,
            "note": f"{result.inserted} inserted, {result.updated} updated; {slice_.num_rows / seconds:,.0f} rows/s"}


CHANGES_STORED = 1_000_000
CHANGES_EACH = 10_000


def _changes_slice(stored: int, each: int):
    """What a change-tracked slice holds: ``each`` deletes and ``each`` updates of stored rows,
    spread over the table (every k-th id), at version 2."""
    import datetime

    import pyarrow as pa

    step = max(1, stored // (2 * each))
    ids = list(range(1, stored + 1, step))[: 2 * each]
    n = len(ids)
    return pa.table({
        "id": pa.array(ids, pa.int64()),
        "qty": pa.array([i % 1000 + 1 for i in ids], pa.int32()),
        "amount": pa.array([None] * n, pa.decimal128(12, 2)),
        "note": pa.array([f"changed {i}" for i in ids], pa.string()),
        "modified": pa.array([datetime.datetime(2025, 1, 1)] * n, pa.timestamp("us")),
        "version": pa.array([2] * n, pa.int64()),
        "op": pa.array(["D" if k % 2 else "U" for k in range(n)], pa.string()),
    })


def _fill_sql(engine: str, table: str, rows: int) -> list[str]:
    """Server-side SQL that fills the replica table with ``rows`` rows at version 1 (untimed)."""
    cols = "id, qty, amount, note, modified, version"
    if engine == "postgresql":
        return [f"INSERT INTO {table} ({cols}) SELECT g, g % 1000, (g % 100000) / 100.0, 'note ' || g, "
                f"timestamp '2024-01-01' + g * interval '1 second', 1 FROM generate_series(1, {rows}) g",
                f"ANALYZE {table}"]
    if engine == "mysql":
        return [f"INSERT INTO {table} ({cols}) SELECT seq, seq % 1000, (seq % 100000) / 100.0, concat('note ', seq), "
                f"timestamp '2024-01-01 00:00:00' + interval seq second, 1 FROM seq_1_to_{rows}",
                f"ANALYZE TABLE {table}"]
    return [f"WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < {rows}) "
            f"INSERT INTO {table} ({cols}) SELECT x, x % 1000, printf('%.2f', (x % 100000) / 100.0), 'note ' || x, "
            f"strftime('%Y-%m-%d %H:%M:%f', '2024-01-01', '+' || x || ' seconds'), 1 FROM g",
            f"ANALYZE {table}"]


def _merge_changes(args, engine: str) -> dict:
    """A change-tracked merge of CHANGES_EACH deletes + CHANGES_EACH updates into a replica table of
    CHANGES_STORED rows (filled untimed, server-side, and analyzed), on one engine."""
    from incremental_assets.replica import Replica

    data = _changes_slice(CHANGES_STORED, args.changes_each)
    schema = data.drop_columns(["op"]).schema
    name = f"bench_changes_{os.getpid()}"
    folder = Path(tempfile.mkdtemp(prefix="bench-changes-", dir=args.workdir))
    urls = {"postgresql": sa_url(args, args.database), "mysql": mariadb_url(args),
            "sqlite": f"sqlite:///{folder / 'replica.db'}"}
    replica = Replica(urls[engine])
    try:
        replica.ensure_table(name, schema, ["id"], version_column="version")
        with replica.engine.begin() as conn:
            for sql in _fill_sql(engine, replica._qualified(name), CHANGES_STORED):
                conn.exec_driver_sql(sql, execution_options={"no_parameters": True})
        t0 = time.perf_counter()
        result = replica.merge(name, data, ["id"], version_column="version", operation_column="op")
        seconds = time.perf_counter() - t0
    finally:
        with replica.engine.begin() as conn:
            for t in (name, name + "__deleted"):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {replica._qualified(t)}")
        replica.dispose()
        shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": seconds, "rows": data.num_rows,
            "note": f"{result.deleted} deleted, {result.updated} updated; into {CHANGES_STORED:,} stored rows"}


def merge_changes_cases(args) -> list[str]:
    """The replica section: deletes and updates into a big table on each engine (a key lookup per
    staged row: the time must not grow with the table)."""
    title = (f"Replica merges, {args.changes_each:,} deletes + {args.changes_each:,} updates (change tracking) into "
             f"{CHANGES_STORED:,} stored rows (ratio: time / PostgreSQL's time)")
    found = {}
    for label, child in (("PostgreSQL", "changes_postgresql"), ("MariaDB (PyMySQL)", "changes_mysql"),
                         ("SQLite", "changes_sqlite")):
        found[label] = best([run_child(args, child, "-") for _ in range(args.repeat)])
        r = found[label]
        print(f"  merge changes, {label}: " + (f"{r['seconds']:.2f}s" if "error" not in r else f"FAILED {r['error']}"), flush=True)
    pg = found["PostgreSQL"]
    pg_s = pg["seconds"] if "error" not in pg else None
    lines = [title, "", "| engine | time s | process s | rows | rows/s | peak RSS MB | ratio | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [fmt_row(label, r, pg_s, None) for label, r in found.items()]
    maria = found["MariaDB (PyMySQL)"]
    if pg_s and "error" not in maria:
        ok = maria["seconds"] <= 2 * pg_s
        lines += ["", f"- {'met' if ok else 'MISSED'}: MariaDB within 2x of PostgreSQL ({maria['seconds'] / pg_s:.2f}x)"]
    return lines


CHILDREN = {"copy": child_copy, "adbc": child_adbc, "pandas": child_pandas, "connectorx": child_connectorx,
            "engine": child_engine, "mariadb_client": child_mariadb_client,
            "mariadb_pymysql": lambda args, table, out: child_engine(args, table, out, mariadb_url(args, "pymysql")),
            "mariadb_mysqlclient": lambda args, table, out: child_engine(args, table, out, mariadb_url(args, "mysqldb")),
            "mariadb_connectorx": child_mariadb_connectorx,
            **{case: (lambda args, table, out, case=case: _merge(args, table, case)) for case in MERGE_CASES},
            **{f"changes_{e}": (lambda args, table, out, e=e: _merge_changes(args, e)) for e in ("postgresql", "mysql", "sqlite")}}


# Folders of finished cases are removed when the run ends, not as each case ends: on ext4, files
# created within a minute or so after many were deleted take up to 0.8 ms each to create instead of
# 0.03 ms (the allocator skips inodes freed recently), which would charge a case that writes many
# files (a daily window each) for the clean-up of the one before. With less than FREE_BYTES_KEPT
# free, they go at once.
_FINISHED: list[Path] = []
FREE_BYTES_KEPT = 4 << 30


def finished(folder: Path) -> None:
    if shutil.disk_usage(folder).free < FREE_BYTES_KEPT:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        _FINISHED.append(folder)


def remove_finished() -> None:
    while _FINISHED:
        shutil.rmtree(_FINISHED.pop(), ignore_errors=True)


def run_child(args, case: str, table: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{case}-", dir=args.workdir))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--child-table", table,
           "--child-out", str(out), *common_args(args)]
    try:
        result = measure(cmd)
    finally:
        finished(out)
    if result["code"] != 0:
        return {"error": result["stderr"].strip().splitlines()[-1] if result["stderr"].strip() else f"exit {result['code']}",
                **result}
    payload = json.loads(result["stdout"].strip().splitlines()[-1])
    return {**result, **payload}


def common_args(args) -> list[str]:
    return ["--host", args.host, "--port", str(args.port), "--user", args.user, "--database", args.database,
            "--batch-size", str(args.batch_size), "--mariadb-host", args.mariadb_host,
            "--mariadb-port", str(args.mariadb_port), "--mariadb-user", args.mariadb_user,
            "--mariadb-database", args.mariadb_database, "--mariadb-rows", str(args.mariadb_rows),
            "--changes-each", str(args.changes_each)]


# Starts the command from a small process of its own and reports the command's wall time, peak RSS
# and exit code on the file descriptor given first. A command forked from this process instead
# would report this process's RSS as its own peak (the kernel keeps the high-water mark of the
# memory a process had before exec, which for a fork is the parent's: 200 MB and more here once
# the later cases run).
_LAUNCHER = """
import os, sys, time
fd = int(sys.argv[1])
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(fd)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
os.write(fd, f"{wall} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}".encode())
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time and its own peak RSS (from a small launcher process: see above)."""
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(report_w), *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=str(PROJECT), pass_fds=(report_w,))
        os.close(report_w)
        report_w = None
        # read the pipes before waiting so that a chatty child never blocks
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        proc.wait()
        report = os.read(report_r, 200).decode().split()
    finally:
        os.close(report_r)
        if report_w is not None:
            os.close(report_w)
    if len(report) != 3:
        raise RuntimeError(f"the launcher of {cmd[0]} failed: {stderr.decode(errors='replace').strip()[-300:]}")
    wall, maxrss_kb, code = float(report[0]), int(report[1]), int(report[2])
    return {"wall": wall, "rss_mb": maxrss_kb / 1024, "code": code,
            "stdout": stdout.decode(errors="replace"), "stderr": stderr.decode(errors="replace")}


# ------------------------------------------------------------------------------------------------
# the project's CLI


class SyncSetup:
    """A DAGSTER_HOME and a configuration file for one table, in a temp folder.

    The instance is created first, untimed (``incremental-assets status``), as it is for a user
    who adds a table to a project whose instance exists; ``new_instance=True`` leaves the folder
    empty, so the first timed command also creates the instance's databases (once per home).
    """

    def __init__(self, args, table: str, *, new_instance: bool = False, granularity: str = "monthly"):
        self.table = table
        self.dir = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.workdir))
        self.home = self.dir / "dagster_home"
        self.home.mkdir()
        # monthly: coarse windows from the data's first month, so Dagster's bookkeeping per window
        # stays small; daily: the configuration's defaults (daily windows from 2024-01-01, far
        # before the data), as a new user's first configuration has them
        partitions = {"granularity": granularity}
        if granularity == "monthly":
            partitions["start"] = first_watermark(args, table).strftime("%Y-%m-01")
        config = {
            "sources": {"bench": {"url": sa_url(args, args.database)}},
            "landing": {"url": str(self.dir / "landing"), "format": "parquet"},
            "sensors": {"enabled": False},
            "tables": [{
                "name": table, "source": "bench", "table": table, "mode": "watermark",
                "watermark_column": "modified",
                "partitions": partitions,
                "batch_size": args.batch_size,
            }],
        }
        self.config = self.dir / "config.yaml"
        self.config.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home)}
        self.env.pop("INCREMENTAL_ASSETS_CONFIG", None)
        if not new_instance:
            prepared = measure([str(CLI), "--config", str(self.config), "status"], env=self.env)
            if prepared["code"] != 0:
                raise RuntimeError(f"incremental-assets status failed: {prepared['stderr'].strip()[-300:]}")

    def sync(self) -> dict:
        result = measure([str(CLI), "--config", str(self.config), "sync"], env=self.env)
        rows = sum(int(m) for m in re.findall(r"\] (\d+) row\(s\)", result["stdout"]))
        result["rows"] = rows
        result["seconds"] = result["wall"]
        result["note"] = self.run_note()
        if result["code"] != 0:
            result["error"] = (result["stderr"].strip() or result["stdout"].strip() or f"exit {result['code']}").splitlines()[-1]
        return result

    def run_note(self) -> str:
        """Where the time went, from the latest materialization's metadata (seconds inside the asset)."""
        try:
            import warnings

            warnings.filterwarnings("ignore")
            import dagster as dg

            os.environ["DAGSTER_HOME"] = str(self.home)  # the instance's storage is configured from it
            with dg.DagsterInstance.from_config(str(self.home)) as instance:
                records = instance.fetch_materializations(dg.AssetKey(["landing", self.table]), limit=1).records
                if not records:
                    return ""
                meta = {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
            return f"asset {meta.get('total_seconds', 0):.2f}s, of which copying {meta.get('copy_seconds', 0):.2f}s"
        except Exception as exc:  # noqa: BLE001 - a note only
            return f"(no metadata: {type(exc).__name__})"

    def landed_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(p).metadata.num_rows for p in (self.dir / "landing").rglob("*.parquet"))

    def cleanup(self):
        finished(self.dir)


# ------------------------------------------------------------------------------------------------
# main


def best(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    top = min(ok, key=lambda r: r["seconds"])
    top["rss_mb"] = max(r["rss_mb"] for r in ok)  # peak memory: the worst repetition
    return top


def machine_facts(args) -> dict:
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import adbc_driver_postgresql
    import pyarrow

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "adbc": adbc_driver_postgresql.__version__,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        **pg_facts(args),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fmt_row(name: str, r: dict | None, copy_s: float | None, rows_default: int | None) -> str:
    if r is None:
        return f"| {name} | not installed | | | | | |"
    if "error" in r:
        return f"| {name} | FAILED: {r['error'][:80]} | | | | | |"
    secs = r["seconds"]
    rows = r.get("rows") if r.get("rows") is not None else rows_default
    rate = f"{rows / secs:,.0f}" if rows and secs else ""
    ratio = f"{secs / copy_s:.2f}x" if copy_s else ""
    return (f"| {name} | {secs:.2f} | {r['wall']:.2f} | {rows if rows is not None else ''} | {rate} | "
            f"{r['rss_mb']:.0f} | {ratio} | {r.get('note', '')} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows in the benchmark table (default 200000)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions per case; the fastest is shown (default 1)")
    parser.add_argument("--batch-size", type=int, default=100_000, help="rows per Arrow batch (default 100000)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    parser.add_argument("--database", default="bench")
    parser.add_argument("--workdir", default=None, help="where temp folders go (default: the system's)")
    parser.add_argument("--output", default=str(HERE / "results" / "latest.md"))
    parser.add_argument("--skip-half", action="store_true", help="skip the memory-flatness run at half the rows")
    parser.add_argument("--skip-changes", action="store_true", help="skip the replica merges of deletes and updates")
    parser.add_argument("--only-changes", action="store_true", help="run only the replica merges of deletes and updates")
    parser.add_argument("--changes-each", type=int, default=CHANGES_EACH,
                        help=f"deletes, and as many updates, merged into the replica's {CHANGES_STORED:,} rows (default {CHANGES_EACH})")
    parser.add_argument("--mariadb-host", default="127.0.0.1")
    parser.add_argument("--mariadb-port", type=int, default=3306)
    parser.add_argument("--mariadb-user", default="root")
    parser.add_argument("--mariadb-database", default="test")
    parser.add_argument("--mariadb-rows", type=int, default=None,
                        help="rows of the MariaDB table (default a quarter of --rows); 0 skips MariaDB")
    parser.add_argument("--many-tables", metavar="COUNTS", default=None,
                        help="run only the many-tables case under dagster-daemon for these table counts, "
                             "e.g. 10,100,300 (benchmarks/many_tables.py; about 10 minutes for 300)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-table", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mariadb_rows is None:
        args.mariadb_rows = args.rows // 4

    if args.child:
        print(json.dumps(CHILDREN[args.child](args, args.child_table, Path(args.child_out or "."))))
        return 0

    if args.many_tables:
        return subprocess.call([sys.executable, str(HERE / "many_tables.py"), "--tables", args.many_tables,
                                "--host", args.host, "--port", str(args.port), "--user", args.user,
                                "--database", args.database])

    if args.only_changes:
        import psycopg

        with psycopg.connect(pg_conninfo(args, "postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (args.database,)).fetchone():
                conn.execute(f'CREATE DATABASE "{args.database}"')
        text = "\n".join(merge_changes_cases(args)) + "\n"
        print()
        print(text)
        return 0

    print(f"building bench_orders_{args.rows} ({args.rows:,} rows) in database {args.database!r}...", flush=True)
    t0 = time.perf_counter()
    table = build_table(args, args.rows)
    print(f"  built in {time.perf_counter() - t0:.1f}s", flush=True)
    facts = machine_facts(args)
    run_child(args, "copy", table)  # warm-up: the table's pages in cache for every case alike

    results: dict[str, dict | None] = {}

    def case(label: str, child: str):
        reps = [run_child(args, child, table) for _ in range(args.repeat)]
        results[label] = best(reps)
        r = results[label]
        print(f"  {label}: " + (f"{r['seconds']:.2f}s, {r['rss_mb']:.0f} MB" if "error" not in r else f"FAILED {r['error']}"), flush=True)

    case("COPY binary -> /dev/null (psycopg)", "copy")
    case("ADBC stream -> Parquet", "adbc")
    try:
        import pandas  # noqa: F401 - the dev extra installs it; the project does not need it

        case("pandas read_sql chunks -> Parquet", "pandas")
    except ImportError:
        results["pandas read_sql chunks -> Parquet"] = None
    try:
        import connectorx  # noqa: F401

        case("ConnectorX arrow stream -> Parquet", "connectorx")
    except ImportError:
        results["ConnectorX arrow stream -> Parquet"] = None
    results["dlt (pyarrow backend) -> Parquet"] = None  # not installed in .venv (see benchmarks/README.md)
    try:
        import dlt  # noqa: F401

        results["dlt (pyarrow backend) -> Parquet"] = {"error": "installed, but no dlt case is implemented"}
    except ImportError:
        pass
    case("engine: Source.read_slice -> LandingStore.write_slice", "engine")
    n = min(args.rows, MERGE_ROWS)
    merge_label = f"replica merge into PostgreSQL: {n:,} new keys between {n:,} stored ones"
    case(f"replica merge into PostgreSQL: {n:,} new keys into an empty table", "merge_empty")
    case(f"replica merge into PostgreSQL: {n:,} new keys after {n:,} stored ones", "merge_after")
    case(merge_label, "merge_between")
    case(f"replica merge into PostgreSQL: {n:,} stored keys, every row changed", "merge_updates")

    # the CLI: initial load, 1% incremental, nothing to copy
    initial, incremental, idle = [], [], []
    for _ in range(args.repeat):
        setup = SyncSetup(args, table)
        try:
            r = setup.sync()
            r["landed"] = setup.landed_rows()
            if r.get("rows") != args.rows and "error" not in r:
                r["error"] = f"landed {r.get('rows')} rows, expected {args.rows}"
            initial.append(r)
            print(f"  sync initial: {r['seconds']:.2f}s, {r['rss_mb']:.0f} MB, {r.get('rows')} rows", flush=True)
            changed = update_fraction(args, table, 100)
            time.sleep(1.3)  # the safe horizon (whole seconds, 100 ms margin) passes the new stamps
            r = setup.sync()
            if r.get("rows") != changed and "error" not in r:
                r["error"] = f"copied {r.get('rows')} rows, expected {changed}"
            r["note"] = f"{changed} rows changed; {r['note']}"
            incremental.append(r)
            print(f"  sync 1% incremental: {r['seconds']:.2f}s, {r.get('rows')} rows", flush=True)
            r = setup.sync()
            if "up to date" not in r["stdout"] and "error" not in r:
                r["error"] = "expected 'up to date': " + r["stdout"].strip()[:60]
            r["rows"] = 0
            r["note"] = "no Dagster run: the plan finds nothing to copy"
            idle.append(r)
            print(f"  sync nothing to copy: {r['seconds']:.2f}s", flush=True)
        finally:
            setup.cleanup()
    results["incremental-assets sync: initial load"] = best(initial)
    results["incremental-assets sync: 1% changed"] = best(incremental)
    results["incremental-assets sync: nothing to copy"] = best(idle)

    fresh = []
    for _ in range(args.repeat):
        setup = SyncSetup(args, table, new_instance=True)
        try:
            r = setup.sync()
            r["note"] = f"the command also creates the instance's databases; {r['note']}"
            fresh.append(r)
        finally:
            setup.cleanup()
    results["incremental-assets sync: initial load, new DAGSTER_HOME"] = best(fresh)
    print(f"  sync initial, new DAGSTER_HOME: {results['incremental-assets sync: initial load, new DAGSTER_HOME']['seconds']:.2f}s",
          flush=True)

    daily = []
    for _ in range(args.repeat):
        setup = SyncSetup(args, table, granularity="daily")
        try:
            r = setup.sync()
            windows = len({p.parent.name for p in (setup.dir / "landing").rglob("*.parquet")})
            r["note"] = f"{windows} daily windows with rows, so as many partitions (the default start is years before); {r['note']}"
            daily.append(r)
        finally:
            setup.cleanup()
    daily_label = "incremental-assets sync: initial load, daily windows (the default)"
    results[daily_label] = best(daily)
    print(f"  sync initial, daily windows: {results[daily_label]['seconds']:.2f}s", flush=True)

    # the same rows over two years (a table in use for a while), and over one year stored in
    # another order than the watermark's (rows written at random times), in a window per day
    for days, scattered, label in (
        (SPREAD_DAYS, False, f"rows over {SPREAD_DAYS} days"),
        (SCATTERED_DAYS, True, f"rows over {SCATTERED_DAYS} days stored in another order"),
    ):
        spread_table = build_spread_table(args, table, days, scattered=scattered)
        spread = []
        for _ in range(args.repeat):
            setup = SyncSetup(args, spread_table, granularity="daily")
            try:
                r = setup.sync()
                r["landed"] = setup.landed_rows()
                if r["landed"] != args.rows and "error" not in r:
                    r["error"] = f"landed {r['landed']} rows, expected {args.rows}"
                windows = len({p.parent.name for p in (setup.dir / "landing").rglob("*.parquet")})
                r["note"] = f"{windows} daily windows with rows; {r['note']}"
                spread.append(r)
            finally:
                setup.cleanup()
        spread_label = f"incremental-assets sync: initial load, daily windows, {label}"
        results[spread_label] = best(spread)
        print(f"  sync initial, daily windows, {label}: {results[spread_label]['seconds']:.2f}s", flush=True)
        _drop(args, spread_table)

    half = None
    if not args.skip_half:
        half_rows = args.rows // 2
        half_table = build_table(args, half_rows)
        runs = []
        for _ in range(args.repeat):
            setup = SyncSetup(args, half_table)
            try:
                runs.append(setup.sync())
            finally:
                setup.cleanup()
        half = best(runs)
        results[f"incremental-assets sync: initial load, {half_rows:,} rows"] = half
        print(f"  sync initial at half the rows: {half['seconds']:.2f}s, {half['rss_mb']:.0f} MB", flush=True)
        _drop(args, half_table)

    maria = mariadb_cases(args)
    changes = merge_changes_cases(args) if not args.skip_changes else []

    copy = results["COPY binary -> /dev/null (psycopg)"]
    copy_s = copy["seconds"] if copy and "error" not in copy else None
    lines = [
        f"# Benchmark: {args.rows:,} rows x 9 columns, PostgreSQL -> Parquet",
        "",
        f"{facts['date']}; {facts['nproc']} CPU ({facts['cpu']}), {facts['memory']} RAM, PostgreSQL {facts['pg']}, "
        f"Python {facts['python']}, pyarrow {facts['pyarrow']}, ADBC {facts['adbc']}; load average at start {facts['load']}; "
        f"batch size {args.batch_size:,}; best of {args.repeat}.",
        "",
        "`time` is the measured work inside the process for the baselines and the engine, and the whole "
        "process (interpreter, imports, Dagster) for `incremental-assets sync`; `process` is always the "
        "whole subprocess; peak RSS is that subprocess's own. Ratio: `time` / COPY's `time`.",
        "",
        "| case | time s | process s | rows | rows/s | peak RSS MB | ratio to COPY | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        lines.append(fmt_row(name, r, copy_s, args.rows))
    lines += ["", "Targets:", ""]
    init = results["incremental-assets sync: initial load"]
    inc = results["incremental-assets sync: 1% changed"]
    nothing = results["incremental-assets sync: nothing to copy"]
    checks = []
    if copy_s and "error" not in init:
        checks.append(("initial load <= 2x COPY, monthly windows", init["seconds"] <= 2 * copy_s, f"{init['seconds'] / copy_s:.2f}x"))
    per_day = results[daily_label]
    if copy_s and "error" not in per_day:
        checks.append(("initial load <= 2x COPY, daily windows", per_day["seconds"] <= 2 * copy_s, f"{per_day['seconds'] / copy_s:.2f}x"))
    if "error" not in init:
        checks.append(("peak RSS <= 250 MB", init["rss_mb"] <= 250, f"{init['rss_mb']:.0f} MB"))
    if half is not None and "error" not in half and "error" not in init:
        growth = init["rss_mb"] - half["rss_mb"]
        checks.append(("peak RSS flat (full vs half the rows: +<= 10%)", growth <= 0.1 * half["rss_mb"],
                       f"{half['rss_mb']:.0f} MB -> {init['rss_mb']:.0f} MB"))
    if "error" not in inc and "error" not in nothing:
        extra = inc["seconds"] - nothing["seconds"]
        checks.append(("1% incremental <= nothing-to-copy + 0.3 s", extra <= 0.3, f"+{extra:.2f}s"))
        checks.append(("nothing to copy <= 3 s", nothing["seconds"] <= 3, f"{nothing['seconds']:.2f}s"))
    merged = results.get(merge_label)
    if merged and "error" not in merged:
        rate = merged["rows"] / merged["seconds"]
        checks.append((f"replica merge >= 300k rows/s ({n:,} new keys between {n:,} stored ones)", rate >= 300_000, f"{rate:,.0f} rows/s"))
    for label, ok, value in checks:
        lines.append(f"- {'met' if ok else 'MISSED'}: {label} ({value})")
    lines += ["", *maria, "", *changes]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"saved to {out}")
    return 0


def mariadb_cases(args) -> list[str]:
    """The MariaDB section of the report: the C client and ConnectorX beside the engine through
    each driver."""
    title = f"MariaDB, {args.mariadb_rows:,} rows x 9 columns -> Parquet (ratio: time / the C client's time)"
    if not args.mariadb_rows:
        return []
    try:
        print(f"building bench_orders_{args.mariadb_rows} in MariaDB...", flush=True)
        table = build_mariadb_table(args, args.mariadb_rows)
    except Exception as exc:  # noqa: BLE001 - the PostgreSQL figures stand without it
        return [f"{title}: not measured, MariaDB unavailable ({type(exc).__name__}: {exc})"]
    cases = {"mariadb --quick -> /dev/null (C client)": "mariadb_client",
             "ConnectorX arrow stream -> Parquet": "mariadb_connectorx",
             "engine through PyMySQL (mysql+pymysql://)": "mariadb_pymysql",
             "engine through mysqlclient (mysql+mysqldb://)": "mariadb_mysqlclient"}
    found = {}
    try:
        run_child(args, "mariadb_client", table)  # warm-up
        for label, child in cases.items():
            try:
                __import__({"mariadb_mysqlclient": "MySQLdb", "mariadb_connectorx": "connectorx"}.get(child, "sys"))
            except ImportError:
                found[label] = None
                continue
            found[label] = best([run_child(args, child, table) for _ in range(args.repeat)])
            r = found[label]
            print(f"  {label}: " + (f"{r['seconds']:.2f}s" if "error" not in r else f"FAILED {r['error']}"), flush=True)
    finally:
        conn = mariadb_connect(args)
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()
    client = found["mariadb --quick -> /dev/null (C client)"]
    client_s = client["seconds"] if client and "error" not in client else None
    lines = [title, "", "| case | time s | process s | rows | rows/s | peak RSS MB | ratio | note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [fmt_row(label, r, client_s, args.mariadb_rows) for label, r in found.items()]
    return lines


def _drop(args, table: str) -> None:
    import psycopg

    with psycopg.connect(pg_conninfo(args, args.database), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        remove_finished()
