"""SQLite: a single writer, text timestamps, no view of other sessions' transactions.

A horizon is taken while briefly holding the write lock (``BEGIN IMMEDIATE``), so no writer is
mid-transaction at that instant; timestamps are compared as text in SQLite's own format.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

from typing import Any

import sqlalchemy as sa

from .base import EngineDialect, Source, TableInfo, register
from .watermarks import TimestampKind

UTC = dt.timezone.utc


def sqlite_text(value: dt.datetime) -> str:
    """SQLite's own timestamp text (``CURRENT_TIMESTAMP`` style), so bounds compare as the data does."""
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    return text + (f".{value.microsecond:06d}" if value.microsecond else "")


@register("sqlite")
class SQLiteDialect(EngineDialect):
    engine_kwargs = {"connect_args": {"timeout": 30}}
    splits_ordered_reads = False  # timestamps are text, compared as text

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        text = conn.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar()
        return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)

    def open_transactions(self, conn: sa.Connection):
        raw = conn.connection.driver_connection
        if raw.in_transaction:
            return []
        try:  # waits up to the busy timeout for a running writer to finish
            raw.execute("BEGIN IMMEDIATE")
            raw.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return [("a writer holding the database lock", None)]
            # read-only file: nobody else can write through it either
        return []

    def estimate_rows(self, conn: sa.Connection, source: Source, info: TableInfo, lo: Any, hi: Any) -> float | None:
        """SQLite keeps no row statistics: a count, read from the watermark's index for a range
        (a local file: a few milliseconds per hundred thousand rows); unknown for a range of a
        table without one (that count would scan the table)."""
        if (lo is not None or hi is not None) and not info.watermark_indexed:
            return None
        return float(conn.execute(sa.select(sa.func.count()).select_from(source.select_rows(info, lo, hi).subquery())).scalar())

    def bind_timestamp(self, kind: TimestampKind, value: dt.datetime):
        text = sqlite_text(kind.to_column_value(value)) if not kind.timezone_aware else value.astimezone(UTC).isoformat()
        return sa.literal(text, type_=sa.String)

    def result_column(self, column: sa.Column):
        if isinstance(column.type, (sa.DateTime, sa.Date, sa.Numeric)) and not isinstance(column.type, (sa.Integer, sa.Float)):
            # read as stored: SQLAlchemy's parser rejects some valid SQLite texts, and float-affinity
            # decimals would lose digits
            return sa.type_coerce(column, sa.String)
        return column
