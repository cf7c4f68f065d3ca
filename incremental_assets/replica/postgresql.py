"""PostgreSQL replica: COPY into a temporary staging table, then INSERT ... ON CONFLICT.

Rows whose keys cannot be in the table yet (an empty table, or an integer key past its range) are
copied straight into it instead. Batches go to the server as CSV written by Arrow's C++ writer (no
per-row Python), through psycopg 3's ``cursor.copy``. Every non-NULL text value is quoted (Arrow's
"needed" style quotes all strings), so an empty string stays an empty string and an unquoted empty
field is NULL; numbers, dates and times, whose text is never empty, go unquoted, which leaves the
server ~10% less to parse. Merges of one table queue on a transaction-scoped advisory lock.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa

from .base import MergePlan, ReplicaDialect, on_conflict_upsert, register, utc_wall_clock

_CSV = pacsv.WriteOptions(include_header=False, quoting_style="needed")
COPY_BATCH_ROWS = 100_000


def _copy_ready(array: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A column as COPY's CSV reads it back exactly (Arrow's text is fine for everything else)."""
    t = array.type
    if pa.types.is_binary(t):  # bytea hex input
        return pa.array([None if b is None else "\\x" + b.hex() for b in array.to_pylist()], pa.string())
    if pa.types.is_duration(t):
        return pc.binary_join_element_wise(pc.cast(pc.cast(array, pa.int64()), pa.string()), "microseconds", " ")
    if pa.types.is_null(t):
        return pc.cast(array, pa.string())
    if pa.types.is_timestamp(t):
        return utc_wall_clock(array)  # read in the session's zone, UTC during a merge
    return array


def _csv(batch: pa.RecordBatch) -> memoryview:
    ready = pa.table([_copy_ready(pa.chunked_array([c])) for c in batch.columns], names=batch.schema.names)
    buf = io.BytesIO()
    pacsv.write_csv(ready, buf, _CSV)
    return buf.getbuffer()


def _copy(conn: sa.Connection, table: str, columns: list[str], rows: pa.Table) -> None:
    """COPY ``rows`` (in ``columns`` order) into ``table`` within the merge's transaction."""
    raw = conn.connection.driver_connection  # psycopg.Connection
    batches = rows.to_batches(max_chunksize=COPY_BATCH_ROWS)
    # the next batch's CSV is written (GIL released) while the server parses the current one
    with ThreadPoolExecutor(1) as pool, raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT csv)") as copy:
            pending = pool.submit(_csv, batches[0]) if batches else None
            for i in range(len(batches)):
                data = pending.result()
                pending = pool.submit(_csv, batches[i + 1]) if i + 1 < len(batches) else None
                copy.write(data)


def _outside(lo: int, hi: int, low: int | None, high: int | None) -> bool:
    """Whether [lo, hi] misses every key of a table whose keys span [low, high] (None: no rows)."""
    return low is None or hi < low or lo > high


@register("postgresql")
class PostgreSQLReplica(ReplicaDialect):
    flag_column_sql = "boolean NOT NULL DEFAULT false"

    def column_type(self, t: pa.DataType, *, key_bytes: int | None = None) -> str:
        if pa.types.is_boolean(t):
            return "boolean"
        if pa.types.is_integer(t):
            signed_bits = t.bit_width + (1 if pa.types.is_unsigned_integer(t) else 0)
            if signed_bits <= 16:
                return "smallint"
            if signed_bits <= 32:
                return "integer"
            if signed_bits <= 64:
                return "bigint"
            return "numeric(20,0)"
        if pa.types.is_floating(t):
            return "double precision" if t.bit_width == 64 else "real"
        if pa.types.is_decimal(t):
            return f"numeric({t.precision},{t.scale})"
        if pa.types.is_string(t):
            return "text"
        if pa.types.is_binary(t):
            return "bytea"
        if pa.types.is_date(t):
            return "date"
        if pa.types.is_timestamp(t):
            return "timestamp with time zone" if t.tz is not None else "timestamp without time zone"
        if pa.types.is_time(t):
            return "time without time zone"
        if pa.types.is_duration(t):
            return "interval"
        raise ValueError(f"type {t} has no PostgreSQL mapping")

    def create_staging_sql(self, plan: MergePlan) -> list[str]:
        return [
            f"CREATE TEMPORARY TABLE {plan.staging} ON COMMIT DROP AS "
            f"SELECT {self.staging_select_list(plan)} FROM {plan.target} WHERE 1 = 0"
        ]

    def clear_staging_sql(self, plan: MergePlan) -> str:
        return f"TRUNCATE {plan.staging}"

    def lock(self, conn: sa.Connection, name: str) -> None:
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (name,))

    def begin_merge(self, conn: sa.Connection) -> None:
        # UTC: COPY reads the naive UTC text of instants; no JIT: compiling the merge's big
        # joins costs more than it saves (0.3-0.5 s per statement at a million rows)
        conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'", execution_options={"no_parameters": True})
        conn.exec_driver_sql("SET LOCAL jit = off", execution_options={"no_parameters": True})

    def load_staging(self, conn: sa.Connection, plan: MergePlan, table: pa.Table, execute) -> None:
        _copy(conn, plan.staging, [plan.q(c) for c in plan.staging_columns], table)

    def all_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        """Also true when an integer key's staged range lies wholly outside the keys of the target
        and of its tombstones: the next slice of an ever-growing id (index endpoint reads only)."""
        key = staged.column(plan.key[0])
        if len(plan.key) > 1 or not pa.types.is_integer(key.type):
            return super().all_new(conn, plan, staged, execute)
        k = plan.q(plan.key[0])
        ends = ", ".join(f"(SELECT {f}({k}) FROM {t})" for t in (plan.target, plan.tombstones) for f in ("MIN", "MAX"))
        t_min, t_max, d_min, d_max = execute(conn, f"SELECT {ends}").one()
        lo, hi = (v.as_py() for v in pc.min_max(key).values())
        return _outside(lo, hi, t_min, t_max) and _outside(lo, hi, d_min, d_max)

    def insert_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        # straight into the target: no key to compare, so staging would only be written and read back
        _copy(conn, plan.target, [plan.q(c) for c in plan.columns], staged)
        return False

    def upsert_sql(self, target, source, columns, key, version, q):
        # a stored row identical to the new one, byte for byte (a replayed slice), is left alone:
        # rewriting it would only add a dead row version, an index entry and WAL (about half the
        # time of such a merge). ``*=`` compares binary images, so values that are equal but
        # differ (1.0 and 1.00, '1 day' and '24 hours', 0 and -0) are still written.
        data = [c for c in columns if c not in key]
        stored = ", ".join(f"t.{q(c)}" for c in data)
        new = ", ".join(f"excluded.{q(c)}" for c in data)
        # cast to record: a bare ROW() *= ROW() would be compared column by column, and no column
        # type has a *= operator of its own
        unchanged = f"ROW({stored})::record *= ROW({new})::record"
        return on_conflict_upsert(target, source, columns, key, version, q, and_where=f"NOT {unchanged}")
