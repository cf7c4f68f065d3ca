"""MySQL / MariaDB: open InnoDB transactions from information_schema.innodb_trx.

Sessions run in UTC (``time_zone = '+00:00'``) so the clock, ``trx_started`` and TIMESTAMP
columns all read as UTC.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from .base import EngineDialect, SourceError, register

UTC = dt.timezone.utc
OPEN_TRANSACTIONS = sa.text(
    "SELECT CONCAT('thread ', trx_mysql_thread_id), trx_started FROM information_schema.innodb_trx "
    "WHERE trx_mysql_thread_id <> CONNECTION_ID()"
)


@register("mysql", "mariadb")
class MySQLDialect(EngineDialect):
    engine_kwargs = {"connect_args": {"init_command": "SET time_zone = '+00:00'"}}

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        return conn.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar().replace(tzinfo=UTC)

    def open_transactions(self, conn: sa.Connection):
        try:
            rows = conn.execute(OPEN_TRANSACTIONS).all()
        except sa.exc.DBAPIError as exc:
            raise SourceError(
                "cannot read information_schema.innodb_trx to find a safe horizon; "
                "grant the PROCESS privilege to the source user"
            ) from exc
        # trx_started is floored to whole seconds: earlier than the true start, which is the safe side
        return [(who, start.replace(tzinfo=UTC)) for who, start in rows]
