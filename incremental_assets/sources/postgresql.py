"""PostgreSQL: the horizon is held back to the oldest open transaction in the database.

Open transactions are found through ``pg_locks`` (every transaction holds an exclusive lock on its
own virtual transaction id, and ``pg_locks`` is readable by every role) joined to
``pg_stat_activity`` for their start. ``pg_stat_activity`` hides the start, and even the database,
of other roles' sessions unless the source user has ``pg_read_all_stats``: such a transaction has
an unknown start and stops the horizon (safe) instead of being silently ignored. Prepared (2PC)
transactions are listed from ``pg_prepared_xacts``; their start is unknown too.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from .base import EngineDialect, register

HIDDEN = "(start hidden: GRANT pg_read_all_stats TO the source user)"

OPEN_TRANSACTIONS = sa.text(
    "SELECT 'transaction of pid ' || l.pid::text "
    f"|| CASE WHEN a.xact_start IS NULL THEN ' {HIDDEN}' ELSE '' END, a.xact_start "
    "FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid "
    "WHERE l.locktype = 'virtualxid' AND l.mode = 'ExclusiveLock' AND l.granted "
    "AND l.pid <> pg_backend_pid() "
    "AND (a.datname = current_database() OR (a.datname IS NULL AND a.xact_start IS NULL)) "
    "AND a.backend_type IS DISTINCT FROM 'autovacuum worker' "
    "UNION ALL "
    "SELECT 'prepared transaction ' || quote_literal(gid), NULL "
    "FROM pg_prepared_xacts WHERE database = current_database()"
)


@register("postgresql")
class PostgreSQLDialect(EngineDialect):
    # now() is the transaction's start, stamped a few microseconds before the backend reports it
    clock_margin = dt.timedelta(milliseconds=100)

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        # clock_timestamp(), not now(): now() is frozen at our own transaction's start
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar().astimezone(dt.timezone.utc)

    def open_transactions(self, conn: sa.Connection):
        return [
            (who, None if start is None else start.astimezone(dt.timezone.utc))
            for who, start in conn.execute(OPEN_TRANSACTIONS)
        ]
