"""PostgreSQL replica: COPY into a temporary staging table, then INSERT ... ON CONFLICT.

Batches go to the server as CSV written by Arrow's C++ writer (no per-row Python), through
psycopg 3's ``cursor.copy``. Every non-NULL value is quoted so an empty string stays an empty
string and an unquoted empty field is NULL. Merges of one table queue on a transaction-scoped
advisory lock.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa

from .base import MergePlan, ReplicaDialect, on_conflict_upsert, register, utc_wall_clock

_CSV = pacsv.WriteOptions(include_header=False, quoting_style="all_valid")
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
        cols = ", ".join(plan.q(c) for c in plan.staging_columns)
        raw = conn.connection.driver_connection  # psycopg.Connection, inside the merge's transaction
        batches = table.to_batches(max_chunksize=COPY_BATCH_ROWS)
        # the next batch's CSV is written (GIL released) while the server parses the current one
        with ThreadPoolExecutor(1) as pool, raw.cursor() as cur:
            with cur.copy(f"COPY {plan.staging} ({cols}) FROM STDIN (FORMAT csv)") as copy:
                pending = pool.submit(_csv, batches[0]) if batches else None
                for i in range(len(batches)):
                    data = pending.result()
                    pending = pool.submit(_csv, batches[i + 1]) if i + 1 < len(batches) else None
                    copy.write(data)

    def upsert_sql(self, target, source, columns, key, version, q):
        return on_conflict_upsert(target, source, columns, key, version, q)
