"""SQLite replica: text for what SQLite cannot hold exactly, one writer at a time.

- Timestamps are fixed-width ISO text (``2024-01-31 10:00:00.123456``, ``+00:00`` appended for
  instants), so text order is time order and the version guard compares correctly.
- Decimals are plain text in a column declared ``DECIMAL_TEXT(p,s)``: a ``NUMERIC`` column would
  turn them into 15-digit floats (the name gives TEXT affinity and keeps precision and scale).
- Every transaction starts with ``BEGIN IMMEDIATE`` (SQLAlchemy's recipe for the pysqlite driver):
  the write lock is the per-table lock, and DDL is transactional.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy import event

from .base import ReplicaDialect, SqlType, decimal_text, duration_micros, on_conflict_upsert, register, timestamp_text

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_DECLARED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_ ]*?)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\s*$")


@register("sqlite")
class SQLiteReplica(ReplicaDialect):
    engine_kwargs = {"connect_args": {"timeout": 30}}
    flag_column_sql = "BOOLEAN NOT NULL DEFAULT 0"
    name_rule = "compares column names without regard to ASCII case"

    def name_key(self, name: str) -> str:
        return name.translate(_ASCII_LOWER)

    def configure_engine(self, engine: sa.Engine) -> None:
        @event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("ia_read_only") else "BEGIN IMMEDIATE")

    def column_type(self, t: pa.DataType, *, key_bytes: int | None = None) -> str:
        if pa.types.is_boolean(t):
            return "BOOLEAN"
        if pa.types.is_uint64(t):
            return "DECIMAL_TEXT(20,0)"  # beyond SQLite's 64-bit signed integers
        if pa.types.is_integer(t):
            return {8: "SMALLINT", 16: "SMALLINT", 32: "INT"}.get(t.bit_width, "BIGINT")
        if pa.types.is_floating(t):
            return "DOUBLE" if t.bit_width == 64 else "REAL"
        if pa.types.is_decimal(t):
            return f"DECIMAL_TEXT({t.precision},{t.scale})"
        if pa.types.is_string(t):
            return "TEXT"
        if pa.types.is_binary(t):
            return "BLOB"
        if pa.types.is_date(t):
            return "DATE"
        if pa.types.is_timestamp(t):
            return "TIMESTAMPTZ" if t.tz is not None else "DATETIME"
        if pa.types.is_time(t):
            return "TIME"
        if pa.types.is_duration(t):
            return "BIGINT"  # microseconds
        raise ValueError(f"type {t} has no SQLite mapping")

    def alter_type_sql(self, name: str, column: str, type_sql: str, *, not_null: bool, using: str | None = None) -> str | None:
        if not_null:
            return None  # a key column: SQLite cannot drop it; the table must be made again
        # SQLite changes no column's type: a new column takes the values (kept as stored), the old one goes
        old = column[:-1] + '__old"' if column.endswith('"') else column + "__old"
        value = old if using is None else using.replace(column, old)
        return (f"ALTER TABLE {name} RENAME COLUMN {column} TO {old}; ALTER TABLE {name} ADD COLUMN {column} {type_sql}; "
                f"UPDATE {name} SET {column} = {value}; ALTER TABLE {name} DROP COLUMN {old}")

    def utc_instants_sql(self, column: str) -> str:
        return f"{column} || '+00:00'"  # how instants are written here (NULL stays NULL)

    def orders_versions_of(self, t: pa.DataType) -> bool:
        # decimals and uint64 are stored as text here, which compares character by character
        return not (pa.types.is_decimal(t) or pa.types.is_uint64(t))

    def sql_type_of_declared(self, declared: str) -> SqlType:
        """A declared SQLite column type (free text) as a :class:`SqlType`, by SQLite's affinity rules."""
        m = _DECLARED.match(declared or "")
        name = (m.group(1) if m else declared).upper().strip()
        p = int(m.group(2)) if m and m.group(2) else None
        s = int(m.group(3)) if m and m.group(3) else (0 if p is not None else None)
        if name == "DECIMAL_TEXT":
            return SqlType("decimal", precision=p, scale=s, text=declared)
        if name in ("BOOLEAN", "BOOL"):
            return SqlType("bool", text=declared)
        if "INT" in name:
            return SqlType("int", bits=64, text=declared)
        if name in ("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE"):
            return SqlType("timestamp", tz=True, text=declared)
        if name in ("DATETIME", "TIMESTAMP"):
            return SqlType("timestamp", tz=False, text=declared)
        if name == "DATE":
            return SqlType("date", text=declared)
        if name == "TIME":
            return SqlType("time", text=declared)
        if any(a in name for a in ("CHAR", "CLOB", "TEXT")):
            return SqlType("text", text=declared)
        if "BLOB" in name:
            return SqlType("binary", text=declared)
        if name == "":
            return SqlType("any", text="(no type)")
        if any(a in name for a in ("REAL", "FLOA", "DOUB")):
            return SqlType("float", bits=64, text=declared)
        if name in ("NUMERIC", "DECIMAL"):
            # NUMERIC affinity: exact only to 15 digits, but it is the table's owner's choice
            return SqlType("decimal", precision=p, scale=s, text=declared)
        return SqlType("other", text=declared)

    def reflect_columns(self, conn, insp, schema, table):
        rows = conn.exec_driver_sql(
            "SELECT name, type FROM pragma_table_info(?, ?) ORDER BY cid", (table, schema or "main")
        ).all()
        return {name: self.sql_type_of_declared(declared) for name, declared in rows}

    def python_values(self, array: pa.ChunkedArray) -> list:
        t = array.type
        if pa.types.is_timestamp(t):
            return timestamp_text(array).to_pylist()
        if pa.types.is_decimal(t):
            return decimal_text(array)
        if pa.types.is_uint64(t):
            return pc.cast(array, pa.string()).to_pylist()
        if pa.types.is_date(t) or pa.types.is_time(t):
            return pc.cast(array, pa.string()).to_pylist()
        if pa.types.is_duration(t):
            return duration_micros(array).to_pylist()
        return array.to_pylist()

    def distinct_sql(self, pairs):
        if not pairs:
            return "1 = 0"
        return "(" + " OR ".join(f"{a} IS NOT {b}" for a, b in pairs) + ")"

    def upsert_sql(self, target, source, columns, key, version, q):
        return on_conflict_upsert(target, source, columns, key, version, q)
