"""SQL Server / Azure SQL: MIN_ACTIVE_ROWVERSION() and the active transactions DMVs."""

from __future__ import annotations

import datetime as dt

from typing import Any

import sqlalchemy as sa

from .base import EngineDialect, Source, SourceError, TableInfo, register

UTC = dt.timezone.utc

NOW = sa.text("SELECT SYSUTCDATETIME()")
ROWVERSION_HORIZON = sa.text("SELECT MIN_ACTIVE_ROWVERSION()")
# transaction_begin_time and start_time are server-local: DATEADD takes no bigint (so no
# DATEDIFF_BIG), and one SYSDATETIMEOFFSET() call gives the exact offset (two clock reads differ)
TO_UTC = "DATEADD(minute, -DATEPART(TZOFFSET, SYSDATETIMEOFFSET()), {})"
OPEN_TRANSACTIONS = sa.text(
    "SELECT CONCAT('transaction of session ', st.session_id) AS who, "
    f"{TO_UTC.format('at.transaction_begin_time')} AS started_utc "
    "FROM sys.dm_tran_session_transactions AS st "
    "JOIN sys.dm_tran_active_transactions AS at ON at.transaction_id = st.transaction_id "
    "WHERE st.session_id <> @@SPID AND ("
    "EXISTS (SELECT 1 FROM sys.dm_tran_database_transactions AS dt "
    "WHERE dt.transaction_id = st.transaction_id AND dt.database_id = DB_ID()) "
    "OR EXISTS (SELECT 1 FROM sys.dm_exec_sessions AS s "
    "WHERE s.session_id = st.session_id AND s.database_id = DB_ID()))"
)
# a statement takes GETDATE()/SYSDATETIME() at its start, maybe before its transaction is listed
RUNNING_REQUESTS = sa.text(
    "SELECT CONCAT('statement of session ', r.session_id) AS who, "
    f"{TO_UTC.format('r.start_time')} AS started_utc "
    "FROM sys.dm_exec_requests AS r JOIN sys.dm_exec_sessions AS s ON s.session_id = r.session_id "
    "WHERE r.session_id <> @@SPID AND s.is_user_process = 1 AND r.database_id = DB_ID()"
)
#: the rows of a table, from its heap or clustered index's partitions (no scan)
TABLE_ROWS = sa.text(
    "SELECT SUM(p.rows) FROM sys.partitions AS p WHERE p.object_id = OBJECT_ID(:name) AND p.index_id IN (0, 1)"
)
#: whether the user may read the transaction DMVs the horizon reads
HAS_STATE_PERMISSION = sa.text(
    "SELECT CASE WHEN HAS_PERMS_BY_NAME(NULL, NULL, 'VIEW SERVER STATE') = 1 "
    "OR HAS_PERMS_BY_NAME(DB_NAME(), 'DATABASE', 'VIEW DATABASE STATE') = 1 THEN 1 ELSE 0 END"
)
PERMISSION_HINT = (
    "cannot read the transaction DMVs to find a safe horizon; "
    "GRANT VIEW SERVER STATE (VIEW DATABASE STATE on Azure SQL) to the source user"
)


@register("mssql")
class MSSQLDialect(EngineDialect):
    # GETDATE()/SYSDATETIME() defaults are the statement's start, possibly before its transaction
    # shows in the DMVs; rowversion watermarks (MIN_ACTIVE_ROWVERSION) have no such gap
    clock_margin = dt.timedelta(seconds=1)

    def fractional_digits(self, sa_type) -> int:
        if type(sa_type).__name__.upper() == "DATETIME":
            return 3  # datetime: steps of 1/300 s, so a millisecond is finer than any
        return super().fractional_digits(sa_type)

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        return conn.execute(NOW).scalar().replace(tzinfo=UTC)

    def _since(self, conn: sa.Connection, query: sa.TextClause):
        try:
            rows = conn.execute(query).all()
        except sa.exc.DBAPIError as exc:
            raise SourceError(PERMISSION_HINT) from exc
        # transaction_begin_time / start_time are legacy datetimes (3 ms steps): widen by one step
        return [(who, start.replace(tzinfo=UTC) - dt.timedelta(milliseconds=4)) for who, start in rows]

    def open_transactions(self, conn: sa.Connection):
        return self._since(conn, OPEN_TRANSACTIONS)

    def timestamp_holds(self, conn: sa.Connection):
        return self._since(conn, RUNNING_REQUESTS) + self.open_transactions(conn)

    def estimate_rows(self, conn: sa.Connection, source: Source, info: TableInfo, lo: Any, hi: Any) -> float | None:
        """The table's rows from ``sys.partitions`` for the whole table (an initial load's range
        up to now included); unknown for a range (the histogram is not read here)."""
        if lo is not None:
            return None
        table = info.table
        name = ".".join("[" + part.replace("]", "]]") + "]" for part in (table.schema, table.name) if part)
        rows = conn.execute(TABLE_ROWS, {"name": name}).scalar()
        return None if rows is None else float(rows)

    def missing_privileges(self, conn: sa.Connection) -> str | None:
        if conn.execute(HAS_STATE_PERMISSION).scalar():
            return None
        return PERMISSION_HINT

    def rowversion_horizon(self, conn: sa.Connection) -> int:
        return int.from_bytes(bytes(conn.execute(ROWVERSION_HORIZON).scalar()), "big")
