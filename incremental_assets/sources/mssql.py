"""SQL Server / Azure SQL: MIN_ACTIVE_ROWVERSION() and the active transactions DMVs."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from .base import EngineDialect, SourceError, register

UTC = dt.timezone.utc

NOW = sa.text("SELECT SYSUTCDATETIME()")
ROWVERSION_HORIZON = sa.text("SELECT MIN_ACTIVE_ROWVERSION()")
OPEN_TRANSACTIONS = sa.text(
    "SELECT CONCAT('session ', st.session_id) AS who, "
    "DATEADD(millisecond, DATEDIFF_BIG(millisecond, SYSDATETIME(), SYSUTCDATETIME()), at.transaction_begin_time) AS started_utc "
    "FROM sys.dm_tran_session_transactions AS st "
    "JOIN sys.dm_tran_active_transactions AS at ON at.transaction_id = st.transaction_id "
    "WHERE st.session_id <> @@SPID AND EXISTS ("
    "SELECT 1 FROM sys.dm_tran_database_transactions AS dt "
    "WHERE dt.transaction_id = st.transaction_id AND dt.database_id = DB_ID())"
)


@register("mssql")
class MSSQLDialect(EngineDialect):
    def db_now(self, conn: sa.Connection) -> dt.datetime:
        return conn.execute(NOW).scalar().replace(tzinfo=UTC)

    def open_transactions(self, conn: sa.Connection):
        try:
            rows = conn.execute(OPEN_TRANSACTIONS).all()
        except sa.exc.DBAPIError as exc:
            raise SourceError(
                "cannot read sys.dm_tran_active_transactions to find a safe horizon; "
                "GRANT VIEW SERVER STATE (VIEW DATABASE STATE on Azure SQL) to the source user"
            ) from exc
        # transaction_begin_time is a legacy datetime (3 ms steps): widen by one step
        return [(who, start.replace(tzinfo=UTC) - dt.timedelta(milliseconds=4)) for who, start in rows]

    def rowversion_horizon(self, conn: sa.Connection) -> int:
        return int.from_bytes(bytes(conn.execute(ROWVERSION_HORIZON).scalar()), "big")
