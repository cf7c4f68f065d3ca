"""SQL Server / Azure SQL: native change tracking, read to Microsoft's recipe.

One read is one ``SNAPSHOT`` isolation transaction that reads
``CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(t))`` and ``CHANGE_TRACKING_CURRENT_VERSION()``, then
either the whole table (first run, or a last version below the minimum valid one) or
``CHANGETABLE(CHANGES t, @last) AS ct LEFT JOIN t`` on the key, the key taken from ``ct`` so
deletes keep it. Before that, one catalog query tells apart the reasons a read cannot work (table
missing, no VIEW CHANGE TRACKING permission, tracking off for the database or the table, snapshot
isolation not allowed) so each gets a message with the statement that fixes it.

:func:`~incremental_assets.tracking.enable_change_tracking` runs those statements itself (it needs
ALTER permission on the database and the table); ``disable`` turns tracking off for the table
only. The database's retention and auto cleanup do what the installed engines' cleanup does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mssql as ms
from sqlalchemy.engine import make_url

from ..sources.base import Source, TableInfo, TableRef
from .base import (
    SYS_CHANGE_OPERATION,
    SYS_CHANGE_VERSION,
    ChangeSet,
    ChangeTrackingError,
    Tracker,
    db_error,
    open_change_set,
    register,
    result_columns,
)

_PREPARER = ms.dialect().identifier_preparer

DIAGNOSE = sa.text(
    "SELECT OBJECT_ID(:name) AS object_id, DB_NAME() AS database_name, "
    "CASE WHEN EXISTS (SELECT 1 FROM sys.change_tracking_databases WHERE database_id = DB_ID()) "
    "THEN 1 ELSE 0 END AS database_tracked, "
    "CASE WHEN EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = OBJECT_ID(:name)) "
    "THEN 1 ELSE 0 END AS table_tracked, "
    "(SELECT snapshot_isolation_state FROM sys.databases WHERE database_id = DB_ID()) AS snapshot_isolation_state, "
    "HAS_PERMS_BY_NAME(:name, 'OBJECT', 'VIEW CHANGE TRACKING') AS can_view_changes, "
    "(SELECT retention_period FROM sys.change_tracking_databases WHERE database_id = DB_ID()) AS retention_period, "
    "(SELECT retention_period_units_desc FROM sys.change_tracking_databases WHERE database_id = DB_ID()) AS retention_units, "
    "(SELECT is_auto_cleanup_on FROM sys.change_tracking_databases WHERE database_id = DB_ID()) AS auto_cleanup"
)
VERSIONS = sa.text(
    "SELECT CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(:name)) AS min_valid_version, "
    "CHANGE_TRACKING_CURRENT_VERSION() AS current_version"
)
#: snapshot_isolation_state: 1 is ON (0 OFF, 2 and 3 in transition)
SNAPSHOT_ON = 1
UNITS = {"MINUTES": 60, "HOURS": 3600, "DAYS": 86400}


def object_name(ref: TableRef) -> str:
    """The table as ``OBJECT_ID`` and ``CHANGETABLE`` take it: each part in brackets."""
    q = _PREPARER.quote_identifier
    return f"{q(ref.schema)}.{q(ref.name)}" if ref.schema else q(ref.name)


def retention_clause(retention: dt.timedelta | None) -> str:
    if retention is None:
        return "CHANGE_RETENTION = 2 DAYS"
    seconds = int(retention.total_seconds())
    for unit, size in (("DAYS", 86400), ("HOURS", 3600)):
        if seconds % size == 0:
            return f"CHANGE_RETENTION = {seconds // size} {unit}"
    return f"CHANGE_RETENTION = {max(1, -(-seconds // 60))} MINUTES"


def enable_database_sql(database: str | None, retention: dt.timedelta | None = None) -> str:
    target = _PREPARER.quote_identifier(database) if database else "CURRENT"
    return f"ALTER DATABASE {target} SET CHANGE_TRACKING = ON ({retention_clause(retention)}, AUTO_CLEANUP = ON)"


def snapshot_sql(database: str | None) -> str:
    target = _PREPARER.quote_identifier(database) if database else "CURRENT"
    return f"ALTER DATABASE {target} SET ALLOW_SNAPSHOT_ISOLATION ON"


def enable_table_sql(ref: TableRef) -> str:
    return f"ALTER TABLE {object_name(ref)} ENABLE CHANGE_TRACKING"


def disable_table_sql(ref: TableRef) -> str:
    return f"ALTER TABLE {object_name(ref)} DISABLE CHANGE_TRACKING"


def grant_sql(ref: TableRef) -> str:
    return f"GRANT SELECT, VIEW CHANGE TRACKING ON {object_name(ref)} TO <source user>"


def select_changes(source: Source, info: TableInfo, last: int) -> sa.Select:
    """``CHANGETABLE(CHANGES t, @last) AS ct LEFT JOIN t``: keys from ``ct``, the rest from ``t``."""
    keys = info.primary_key
    changes = (
        sa.func.CHANGETABLE(
            sa.literal_column(f"CHANGES {object_name(info.ref)}"), sa.bindparam("last_version", last, sa.BigInteger)
        )
        .table_valued(
            *[sa.column(k, info.table.c[k].type) for k in keys],
            sa.column(SYS_CHANGE_VERSION, sa.BigInteger),
            sa.column(SYS_CHANGE_OPERATION, sa.String(1)),
        )
        .alias("ct")
    )
    table = info.table
    return sa.select(
        *result_columns(source, info, keys, changes),
        changes.c[SYS_CHANGE_VERSION].label(SYS_CHANGE_VERSION),
        changes.c[SYS_CHANGE_OPERATION].label(SYS_CHANGE_OPERATION),
    ).select_from(changes.outerjoin(table, sa.and_(*[table.c[k] == changes.c[k] for k in keys])))


def _database(source: Source, diagnosis: dict | None = None) -> str | None:
    if diagnosis and diagnosis.get("database_name"):
        return diagnosis["database_name"]
    return make_url(source.url).database


def problem(source: Source, ref: TableRef, diagnosis: dict[str, Any]) -> ChangeTrackingError | None:
    """Why a read of ``ref`` cannot work, with the statement that fixes it; None when it can."""
    where = f"table {str(ref)!r} in source {source.name!r}"
    database = _database(source, diagnosis)
    if diagnosis["object_id"] is None:
        return ChangeTrackingError(f"{where} not found (or the source user cannot see it)")
    if diagnosis["can_view_changes"] == 0:
        return ChangeTrackingError(
            f"{where}: the source user lacks the VIEW CHANGE TRACKING permission; run: {grant_sql(ref)}"
        )
    if not diagnosis["table_tracked"]:
        steps = []
        if not diagnosis["database_tracked"]:
            steps.append(enable_database_sql(database))
        steps.append(enable_table_sql(ref))
        if diagnosis["snapshot_isolation_state"] != SNAPSHOT_ON:
            steps.append(snapshot_sql(database))
        return ChangeTrackingError(f"change tracking is not enabled on {where}; enable it with: " + "; ".join(steps))
    if diagnosis["snapshot_isolation_state"] != SNAPSHOT_ON:
        return ChangeTrackingError(
            f"{where}: snapshot isolation is not allowed in database {database!r}, and change tracking is read "
            f"in a snapshot transaction; run: {snapshot_sql(database)}"
        )
    return None


def _retention(diagnosis: dict[str, Any]) -> dt.timedelta | None:
    period, units = diagnosis.get("retention_period"), diagnosis.get("retention_units")
    if period is None or units is None:
        return None
    return dt.timedelta(seconds=int(period) * UNITS.get(str(units).upper(), 86400))


@register("mssql")
class MSSQLTracker(Tracker):
    native = True

    def _diagnose(self, conn: sa.Connection, ref: TableRef) -> dict[str, Any]:
        return dict(conn.execute(DIAGNOSE, {"name": object_name(ref)}).mappings().one())

    def enable(self, source, info, *, retention) -> str:
        ref, done = info.ref, []
        try:
            with source.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # ALTER DATABASE refuses a transaction
                diagnosis = self._diagnose(conn, ref)
                database = _database(source, diagnosis)
                steps = []
                if not diagnosis["database_tracked"]:
                    steps.append(enable_database_sql(database, retention))
                if diagnosis["snapshot_isolation_state"] != SNAPSHOT_ON:
                    steps.append(snapshot_sql(database))
                if not diagnosis["table_tracked"]:
                    steps.append(enable_table_sql(ref))
                for sql in steps:
                    try:
                        conn.exec_driver_sql(sql, execution_options={"no_parameters": True})
                    except sa.exc.DBAPIError as exc:
                        raise ChangeTrackingError(
                            f"{db_error(source, ref, 'enabling change tracking on', exc)}; run as a user with ALTER "
                            f"permission: " + "; ".join(steps)
                        ) from None
                    done.append(sql)
        except ChangeTrackingError:
            raise
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "enabling change tracking on", exc) from None
        if not done:
            return f"change tracking on {str(ref)!r} was already enabled"
        return f"change tracking enabled on {str(ref)!r} in source {source.name!r}: " + "; ".join(done)

    def disable(self, source, ref, *, forget) -> str:
        try:
            with source.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                if not self._diagnose(conn, ref)["table_tracked"]:
                    return f"change tracking was not enabled on {str(ref)!r}"
                conn.exec_driver_sql(disable_table_sql(ref), execution_options={"no_parameters": True})
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "disabling change tracking on", exc) from None
        return f"change tracking disabled on {str(ref)!r} (the database's change tracking setting is left as it is)"

    def status(self, source, ref) -> dict[str, Any]:
        try:
            with source.connect() as conn:
                diagnosis = self._diagnose(conn, ref)
                min_valid, current = conn.execute(VERSIONS, {"name": object_name(ref)}).one()
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "reading the change tracking status of", exc) from None
        trouble = problem(source, ref, diagnosis)
        return {
            "table": str(ref),
            "native": True,
            "enabled": bool(diagnosis["table_tracked"]),
            "current_version": None if current is None else int(current),
            "min_valid_version": None if min_valid is None else int(min_valid),
            "retention": _retention(diagnosis),
            "auto_cleanup": None if diagnosis.get("auto_cleanup") is None else bool(diagnosis["auto_cleanup"]),
            "snapshot_isolation": diagnosis["snapshot_isolation_state"] == SNAPSHOT_ON,
            "problems": [str(trouble)] if trouble else [],
        }

    def cleanup(self, source, ref, *, retention) -> str:
        return f"table {str(ref)!r}: SQL Server cleans up change tracking itself (retention and AUTO_CLEANUP of the database)"

    @contextmanager
    def read(self, source, info, last, *, on_expired, batch_size) -> Iterator[ChangeSet]:
        ref = info.ref
        with source.connect() as conn:
            try:
                trouble = problem(source, ref, self._diagnose(conn, ref))
                if trouble:
                    raise trouble
                conn.rollback()
                conn.execution_options(isolation_level="SNAPSHOT")
                min_valid, current = conn.execute(VERSIONS, {"name": object_name(ref)}).one()
            except ChangeTrackingError:
                conn.rollback()
                raise
            except sa.exc.DBAPIError as exc:
                conn.rollback()
                text = str(getattr(exc, "orig", exc))
                if "3952" in text or "snapshot isolation" in text.lower():
                    raise ChangeTrackingError(
                        f"table {str(ref)!r} in source {source.name!r}: snapshot isolation is not allowed; run: "
                        f"{snapshot_sql(_database(source))}"
                    ) from None
                raise db_error(source, ref, "reading the changes of", exc) from None
            try:
                if min_valid is None:
                    raise ChangeTrackingError(
                        f"change tracking is not enabled on table {str(ref)!r} in source {source.name!r}; enable it with: "
                        f"{enable_table_sql(ref)}"
                    )
                current, min_valid = int(current or 0), int(min_valid)
                with open_change_set(
                    conn, source, ref, info, last=last, current=current, min_valid=min_valid, on_expired=on_expired,
                    batch_size=batch_size, changes=lambda: select_changes(source, info, last),
                ) as changes:
                    yield changes
            finally:
                conn.rollback()
