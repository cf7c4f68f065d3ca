"""MySQL / MariaDB: open InnoDB transactions from information_schema.innodb_trx.

Sessions run in UTC (``time_zone = '+00:00'``) so the clock, ``trx_started`` and TIMESTAMP
columns all read as UTC; TIMESTAMP columns are instants and are read as UTC-aware values.

Two traps make a plain ``SELECT ... FROM innodb_trx`` unsafe, and both are handled here:

- InnoDB serves ``innodb_trx`` from a cache that is refreshed only after 0.1 s *without readers*:
  a monitor polling it keeps it stale indefinitely, hiding new transactions. We open a snapshot
  transaction of our own first and tag our query with a fresh token; a reading is accepted only
  when it shows our transaction running that very query (``trx_query``), which proves the cache
  was filled after our transaction started (a thread id alone does not: pooled connections reuse
  it). Otherwise the start is unknown and the horizon makes no progress.
- ``NOW()``/``CURRENT_TIMESTAMP`` are the *statement's* start, taken before InnoDB registers the
  transaction (e.g. while the statement waits for a metadata lock). Statements running in other
  sessions (``information_schema.processlist``, not cached) hold timestamp horizons back to their
  start, and :attr:`clock_margin` covers the short gap for statements that have just finished.

Types: ``JSON`` and ``SET`` land as the server's text (``'a,c'``), ``ENUM`` as its label,
``BIT(n)`` as an integer (unsigned 64-bit for ``BIT(64)``), ``YEAR`` as a 16-bit integer, and
spatial columns (``GEOMETRY``, ``POINT``...) as their standard WKB (``ST_AsBinary``; the SRID is
not part of it).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .base import EngineDialect, Explain, Source, SourceError, TableInfo, register
from .watermarks import TimestampKind

UTC = dt.timezone.utc
#: ``{tag}``: a fresh token per reading, echoed in our own row's trx_query when the cache is fresh
OPEN_TRANSACTIONS = "SELECT /* ia-horizon {tag} */ trx_mysql_thread_id, trx_started, trx_query FROM information_schema.innodb_trx"
RUNNING_STATEMENTS = sa.text(
    "SELECT CONCAT('statement of thread ', ID), UTC_TIMESTAMP(6) - INTERVAL (TIME + 1) SECOND "
    "FROM information_schema.processlist "
    "WHERE ID <> CONNECTION_ID() AND COMMAND IN ('Query', 'Execute')"
)
#: how long to wait for the innodb_trx cache to be refreshed after our snapshot started
FRESH_WAIT = 3.0


#: the spatial types, as information_schema.columns names them
SPATIAL = {"geometry", "point", "linestring", "polygon", "multipoint", "multilinestring", "multipolygon",
           "geometrycollection"}
SPATIAL_COLUMNS = sa.text(
    "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.columns "
    "WHERE TABLE_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME = :table"
)
#: ``Column.info`` key marking a spatial column (reflected without a type)
SPATIAL_INFO = "incremental_assets.spatial"


@register("mysql", "mariadb")
class MySQLDialect(EngineDialect):
    engine_kwargs = {"connect_args": {"init_command": "SET time_zone = '+00:00'"}}
    clock_margin = dt.timedelta(seconds=1)

    def reflected(self, conn: sa.Connection, table: sa.Table, indexes: list[dict]) -> tuple[sa.Table, list[dict]]:
        # SQLAlchemy reflects MySQL tables from SHOW CREATE TABLE and leaves a backtick in a name
        # doubled as it is quoted there (col`q comes back as col``q, which no query finds): take
        # the true names from information_schema, in the same ordinal order
        if not any("`" in c.name for c in table.columns):
            return table, indexes
        true = conn.exec_driver_sql(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) "
            "AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (table.schema, table.name),
        ).scalars().all()
        if len(true) != len(table.columns):
            return table, indexes
        names = dict(zip([c.name for c in table.columns], true))
        columns = [
            sa.Column(names[c.name], c.type, primary_key=c.primary_key, nullable=c.nullable, quote=True)
            for c in table.columns
        ]
        fixed = sa.Table(table.name, sa.MetaData(), *columns, schema=table.schema)
        indexes = [{**ix, "column_names": [names.get(n, n) for n in ix.get("column_names") or []]} for ix in indexes]
        return fixed, indexes

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        return conn.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar().replace(tzinfo=UTC)

    def is_timezone_aware(self, sa_type: sa.types.TypeEngine) -> bool:
        return isinstance(sa_type, sa.TIMESTAMP) or super().is_timezone_aware(sa_type)

    def fractional_digits(self, sa_type) -> int:
        return min(getattr(sa_type, "fsp", None) or 0, 6)  # DATETIME(fsp); plain DATETIME: seconds

    def refine_table(self, conn: sa.Connection, table: sa.Table) -> None:
        """Spatial columns (which reflection leaves without a type) land as WKB binary."""
        for name, data_type in conn.execute(SPATIAL_COLUMNS, {"schema": table.schema, "table": table.name}):
            if str(data_type).lower() in SPATIAL and name in table.c:
                table.c[name].type = sa.LargeBinary()
                table.c[name].info[SPATIAL_INFO] = str(data_type).upper()

    def result_column(self, column: sa.Column) -> sa.ColumnElement:
        if column.info.get(SPATIAL_INFO):
            return sa.func.ST_AsBinary(column, type_=sa.LargeBinary)
        if isinstance(column.type, (sa.JSON, mysql.SET)):
            # the server's text: SQLAlchemy would parse JSON, and drivers make a SET a Python set
            return sa.cast(column, sa.String())
        return column

    def bind_timestamp(self, kind: TimestampKind, value: dt.datetime):
        # the session is UTC: aware bounds are sent as UTC wall-clock text
        return sa.literal(kind.to_column_value(value).replace(tzinfo=None), type_=sa.DateTime())

    def open_transactions(self, conn: sa.Connection):
        try:
            me = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
            query = sa.text(OPEN_TRANSACTIONS.format(tag=uuid.uuid4().hex))
            conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            try:
                deadline = time.monotonic() + FRESH_WAIT
                while True:
                    rows = conn.execute(query).all()
                    if any(thread == me and text == query.text for thread, _, text in rows):
                        break  # the cache was filled while this very query of our transaction ran
                    if time.monotonic() > deadline:
                        return [("a transaction hidden by a stale information_schema.innodb_trx cache", None)]
                    time.sleep(0.15)  # the cache refreshes only after 0.1 s without readers
            finally:
                conn.exec_driver_sql("ROLLBACK")
        except sa.exc.DBAPIError as exc:
            raise SourceError(
                "cannot read information_schema.innodb_trx to find a safe horizon; "
                "grant the PROCESS privilege to the source user"
            ) from exc
        # trx_started is floored to whole seconds: earlier than the true start, which is the safe side
        return [(f"transaction of thread {thread}", start.replace(tzinfo=UTC)) for thread, start, _ in rows if thread != me]

    def estimate_rows(self, conn: sa.Connection, source: Source, info: TableInfo, lo: Any, hi: Any) -> float | None:
        """The optimizer's estimates (``EXPLAIN``'s ``rows``: dives into the watermark's index for a
        range, the table's statistics, ``information_schema.TABLES.TABLE_ROWS``, for the whole).
        InnoDB caps a range's estimate at half the table: a range estimated that high is taken
        as the table less the ranges on either side of it, which are smaller and estimated well."""
        def rows(query: sa.Select) -> float:
            found = [r._mapping.get("rows") for r in conn.execute(Explain("EXPLAIN", query))]
            return max((float(r) for r in found if r is not None), default=0.0)

        table = rows(source.select_rows(info))
        if lo is None and hi is None:
            return table
        direct = rows(source.select_rows(info, lo, hi))
        if direct < 0.45 * table:
            return direct
        outside = sum(rows(source.select_rows(info, a, b)) for a, b in ((None, lo), (hi, None)) if (a, b) != (None, None))
        return max(direct, table - outside)

    def missing_privileges(self, conn: sa.Connection) -> str | None:
        try:
            conn.execute(sa.text("SELECT COUNT(*) FROM information_schema.innodb_trx"))
        except sa.exc.DBAPIError:
            user = conn.execute(sa.text("SELECT CURRENT_USER()")).scalar() or "the source user"
            name, _, host = str(user).partition("@")
            return (f"user {user} cannot read information_schema.innodb_trx (other sessions' transactions): "
                    f"GRANT PROCESS ON *.* TO '{name}'@'{host or '%'}';")
        return None

    def timestamp_holds(self, conn: sa.Connection):
        # statements first: one still running now may not be in InnoDB yet when we read innodb_trx
        running = [(who, start.replace(tzinfo=UTC)) for who, start in conn.execute(RUNNING_STATEMENTS)]
        return running + self.open_transactions(conn)
