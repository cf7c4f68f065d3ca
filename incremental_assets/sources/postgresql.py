"""PostgreSQL: the horizon is held back to the oldest open transaction in the database."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from .base import EngineDialect, register

OPEN_TRANSACTIONS = sa.text(
    "SELECT 'pid ' || pid::text, xact_start FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND xact_start IS NOT NULL AND backend_type = 'client backend'"
)


@register("postgresql")
class PostgreSQLDialect(EngineDialect):
    def db_now(self, conn: sa.Connection) -> dt.datetime:
        # clock_timestamp(), not now(): now() is frozen at our own transaction's start
        return conn.execute(sa.text("SELECT clock_timestamp()")).scalar().astimezone(dt.timezone.utc)

    def open_transactions(self, conn: sa.Connection):
        # needs pg_read_all_stats (or superuser) to see other roles' transactions
        return [(who, start.astimezone(dt.timezone.utc)) for who, start in conn.execute(OPEN_TRANSACTIONS)]
