"""Installed change tracking: a change table and triggers, where the database has no change tracking.

:class:`InstalledTracker` holds what PostgreSQL, MySQL/MariaDB and SQLite share: enabling,
disabling, status and cleanup through the metadata table (``base.meta_table``), the change table's
definition, and the read of the net changes per key from it; the engine modules supply the SQL
that differs (triggers, snapshots, the current version) through its hooks.

Apart from ``base.py`` because it is one kind of tracker (SQL Server's needs none of it), and the
largest part of change tracking.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from ..sources.base import Source, SourceError, TableInfo, TableRef
from .base import META_TABLE, OPERATION, SEQUENCE, TIME, VERSION, Tracked, Tracker, ddl, derived_name, meta_table, qualified
from .changes import (
    SYS_CHANGE_OPERATION,
    SYS_CHANGE_VERSION,
    ChangeSet,
    ChangeTrackingError,
    check_columns,
    db_error,
    not_enabled,
    open_change_set,
    result_columns,
)

log = logging.getLogger("incremental_assets")


class InstalledTracker(Tracker):
    """Shared logic of the engines where change tracking is installed; the engine modules supply
    the SQL that differs (triggers, snapshots, the current version)."""

    @staticmethod
    def clock_version() -> int:
        """Microseconds since the epoch: a counter started there stays above every version an
        earlier, forgotten counter of the same table reached (unless it counted faster than 1/µs),
        so a reader's old version is never mistaken for a valid one."""
        return time.time_ns() // 1000

    #: the change table has a separate per-change sequence (else the version orders changes)
    separate_sequence = False

    # hooks ------------------------------------------------------------------------------------
    def resolve_schema(self, conn: sa.Connection, ref: TableRef) -> str | None:
        """The schema the table lives in (where the change and metadata tables go)."""
        return ref.schema

    def begin(self, conn: sa.Connection) -> None:
        """Start the transaction in which enable/disable install or remove everything."""

    def trigger_statements(self, conn: sa.Connection, tracked: Tracked, table: str, names: dict[str, str]) -> dict[str, str]:
        """CREATE TRIGGER statements by event (insert, update, delete), for engines with row triggers."""
        raise NotImplementedError

    def install(self, conn: sa.Connection, tracked: Tracked, info: TableInfo, names: dict[str, str]) -> None:
        """Create the triggers (and whatever else the engine needs) for ``tracked``."""
        for event, statement in self.trigger_statements(conn, tracked, info.ref.name, names).items():
            ddl(conn, f"DROP TRIGGER IF EXISTS {qualified(conn, tracked.schema, names[event])}")
            ddl(conn, statement)

    def uninstall(self, conn: sa.Connection, tracked: Tracked, names: dict[str, str], table_exists: bool) -> None:
        for event in ("insert", "update", "delete"):
            ddl(conn, f"DROP TRIGGER IF EXISTS {qualified(conn, tracked.schema, names[event])}")

    def installed(self, conn: sa.Connection, tracked: Tracked, names: dict[str, str]) -> list[str]:
        """Problems with the installed triggers (missing, disabled); empty when all is well."""
        raise NotImplementedError

    def restart_versions(self, conn: sa.Connection, meta: sa.Table, tracked: Tracked) -> None:
        """Make every version given out so far invalid (a (re-)enable, a detected truncation)."""
        raise NotImplementedError

    def before_snapshot(self, source: Source, conn: sa.Connection, meta: sa.Table, tracked: Tracked) -> None:
        """Engine checks done before the read's snapshot (e.g. detecting a TRUNCATE)."""

    def begin_snapshot(self, conn: sa.Connection, info: TableInfo, ct: sa.Table) -> None:
        raise NotImplementedError

    def versions(self, conn: sa.Connection, meta: sa.Table, tracked: Tracked) -> tuple[int, int]:
        """(current version, min valid version) read in the snapshot."""
        raise NotImplementedError

    def end_snapshot(self, conn: sa.Connection) -> None:
        conn.rollback()

    def identity(self, conn: sa.Connection, schema: str | None, table: str) -> str | None:
        """Something that changes when the table is truncated, where TRUNCATE fires no trigger."""
        return None

    def now_epoch(self) -> sa.ColumnElement:
        """The database clock in seconds since the epoch (for retention)."""
        raise NotImplementedError

    def cleanup_horizon(self, conn: sa.Connection) -> int | None:
        """The highest version cleanup may delete (every change at or below it is finished)."""
        return None

    def first_version(self) -> int:
        """Where a new metadata row's counter starts (engines that count)."""
        return 0

    def identifier_limit(self, conn: sa.Connection) -> int:
        return int(getattr(conn.dialect, "max_identifier_length", 63) or 63)

    # shared ------------------------------------------------------------------------------------
    def names(self, conn: sa.Connection, table: str) -> dict[str, str]:
        limit = min(self.identifier_limit(conn), 63)
        return {
            "change_table": derived_name(table, "__ct", limit),
            "index": derived_name(table, "__ct_v", limit),
            "function": derived_name(table, "__ct_fn", limit),
            "insert": derived_name(table, "__ct_i", limit),
            "update": derived_name(table, "__ct_u", limit),
            "delete": derived_name(table, "__ct_d", limit),
            "truncate": derived_name(table, "__ct_t", limit),
        }

    def change_table(self, info: TableInfo, schema: str | None, name: str, keys: Sequence[str]) -> sa.Table:
        columns = [sa.Column(k, info.table.c[k].type, nullable=False) for k in keys]
        if self.separate_sequence:
            columns.append(sa.Column(SEQUENCE, sa.BigInteger, primary_key=True, autoincrement=True))
            columns.append(sa.Column(VERSION, sa.BigInteger, nullable=False, index=False))
        else:
            columns.append(sa.Column(VERSION, sa.BigInteger, primary_key=True, autoincrement=False))
        columns.append(sa.Column(OPERATION, sa.String(1), nullable=False))
        columns.append(sa.Column(TIME, sa.Float(53), nullable=False))
        sa_schema = None if schema is None else TableRef(schema, name).sa_schema
        return sa.Table(name, sa.MetaData(), *columns, schema=sa_schema, **self.change_table_options(info))

    def change_table_options(self, info: TableInfo) -> dict[str, Any]:
        """Table options the change table copies from the tracked table (so keys compare alike)."""
        return {}

    def sequence_column(self) -> str:
        return SEQUENCE if self.separate_sequence else VERSION

    def load(self, conn: sa.Connection, meta: sa.Table, table: str) -> Tracked | None:
        if not sa.inspect(conn).has_table(META_TABLE, schema=meta.schema):
            return None
        row = conn.execute(sa.select(meta).where(meta.c.table_name == table)).mappings().first()
        if row is None:
            return None
        return Tracked(
            id=int(row["id"]),
            schema=meta.schema,
            table=table,
            change_table=row["change_table"],
            primary_key=json.loads(row["primary_key"]),
            enabled=bool(row["enabled"]),
            current_version=int(row["current_version"]),
            min_valid_version=int(row["min_valid_version"]),
            retention=None if row["retention_seconds"] is None else dt.timedelta(seconds=int(row["retention_seconds"])),
            identity=row["table_identity"],
        )

    def _located(self, conn: sa.Connection, ref: TableRef) -> tuple[str | None, sa.Table]:
        schema = self.resolve_schema(conn, ref)
        return schema, meta_table(schema)

    def enable(self, source: Source, info: TableInfo, *, retention: dt.timedelta | None) -> str:
        ref, keys = info.ref, info.primary_key
        check_columns(source, info, keys)
        try:
            with source.connect() as conn:
                self.begin(conn)
                schema, meta = self._located(conn, ref)
                names = self.names(conn, ref.name)
                meta.create(conn, checkfirst=True)
                tracked = self.load(conn, meta, ref.name)
                if tracked is not None and tracked.enabled:
                    if tracked.primary_key != keys:
                        raise ChangeTrackingError(
                            f"change tracking on table {str(ref)!r} in source {source.name!r} is keyed by "
                            f"{tracked.primary_key}, not {keys}: disable it first to change the key"
                        )
                    problems = self.installed(conn, tracked, names)
                    if not problems:
                        if retention is not None and retention != tracked.retention:
                            conn.execute(meta.update().where(meta.c.id == tracked.id).values(retention_seconds=int(retention.total_seconds())))
                            conn.commit()
                            return f"change tracking on {str(ref)!r} was already enabled; retention set to {retention}"
                        conn.commit()
                        return f"change tracking on {str(ref)!r} was already enabled (change table {tracked.change_table!r})"
                    log.warning("table %r: %s; re-installing, every earlier version becomes invalid", str(ref), "; ".join(problems))
                ct = self.change_table(info, schema, names["change_table"], keys)
                if tracked is None or not tracked.enabled:
                    if sa.inspect(conn).has_table(names["change_table"], schema=meta.schema):
                        raise ChangeTrackingError(
                            f"cannot enable change tracking on table {str(ref)!r} in source {source.name!r}: "
                            f"a table named {names['change_table']!r} already exists"
                        )
                values = dict(
                    change_table=names["change_table"],
                    primary_key=json.dumps(keys),
                    enabled=1,
                    retention_seconds=None if retention is None else int(retention.total_seconds()),
                    table_identity=self.identity(conn, schema, ref.name),
                )
                if tracked is None:
                    start = self.first_version()
                    conn.execute(meta.insert().values(table_name=ref.name, current_version=start, min_valid_version=start, **values))
                else:
                    if retention is None:
                        values.pop("retention_seconds")
                    conn.execute(meta.update().where(meta.c.id == tracked.id).values(**values))
                tracked = self.load(conn, meta, ref.name)
                ct.create(conn, checkfirst=True)
                if self.separate_sequence:
                    sa.Index(names["index"], ct.c[VERSION]).create(conn, checkfirst=True)
                self.install(conn, tracked, info, names)
                # changes made before the triggers existed were not recorded: no older version is valid
                self.restart_versions(conn, meta, tracked)
                conn.commit()
        except SourceError:
            raise
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "enabling change tracking on", exc) from None
        return (
            f"change tracking enabled on {str(ref)!r} in source {source.name!r}: key {keys}, change table "
            f"{names['change_table']!r}, triggers {names['insert']!r}, {names['update']!r}, {names['delete']!r}"
            + (f", retention {retention}" if retention else "")
        )

    def disable(self, source: Source, ref: TableRef, *, forget: bool) -> str:
        try:
            with source.connect() as conn:
                self.begin(conn)
                schema, meta = self._located(conn, ref)
                names = self.names(conn, ref.name)
                tracked = self.load(conn, meta, ref.name)
                if tracked is None:
                    conn.rollback()
                    return f"change tracking was not enabled on {str(ref)!r}"
                table_exists = sa.inspect(conn).has_table(ref.name, schema=meta.schema)
                self.uninstall(conn, tracked, names, table_exists)
                ct = sa.Table(tracked.change_table, sa.MetaData(), schema=meta.schema)
                ct.drop(conn, checkfirst=True)
                if forget:
                    conn.execute(meta.delete().where(meta.c.id == tracked.id))
                    if conn.execute(sa.select(sa.func.count()).select_from(meta)).scalar() == 0:
                        meta.drop(conn)
                else:
                    # the row stays (disabled) so a later enable continues the versions instead of reusing them
                    conn.execute(meta.update().where(meta.c.id == tracked.id).values(enabled=0))
                conn.commit()
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "disabling change tracking on", exc) from None
        was = "was already disabled; " if not tracked.enabled else ""
        return f"change tracking on {str(ref)!r} {was}removed: triggers and change table {tracked.change_table!r} dropped"

    def status(self, source: Source, ref: TableRef) -> dict[str, Any]:
        try:
            with source.connect() as conn:
                schema, meta = self._located(conn, ref)
                names = self.names(conn, ref.name)
                tracked = self.load(conn, meta, ref.name)
                status: dict[str, Any] = {
                    "table": str(ref), "native": False, "enabled": False, "current_version": None,
                    "min_valid_version": None, "retention": None,
                }
                if tracked is None:
                    return status
                problems = self.installed(conn, tracked, names) if tracked.enabled else []
                self.begin_status(conn)
                current, min_valid = self.versions(conn, meta, tracked)
                conn.rollback()
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "reading the change tracking status of", exc) from None
        status.update(
            enabled=tracked.enabled and not problems,
            change_table=tracked.change_table,
            primary_key=tracked.primary_key,
            current_version=current,
            min_valid_version=min_valid,
            retention=tracked.retention,
            problems=problems,
        )
        return status

    def begin_status(self, conn: sa.Connection) -> None:
        conn.rollback()

    def cleanup(self, source: Source, ref: TableRef, *, retention: dt.timedelta | None) -> str:
        try:
            with source.connect() as conn:
                self.begin(conn)
                schema, meta = self._located(conn, ref)
                tracked = self.load(conn, meta, ref.name)
                if tracked is None or not tracked.enabled:
                    raise not_enabled(source, ref)
                keep = retention if retention is not None else tracked.retention
                if keep is None:
                    conn.rollback()
                    return f"table {str(ref)!r}: no retention configured, nothing cleaned up"
                ct = sa.Table(tracked.change_table, sa.MetaData(), sa.Column(VERSION, sa.BigInteger), sa.Column(TIME, sa.Float(53)), schema=meta.schema)
                cutoff = self.now_epoch() - keep.total_seconds()
                query = sa.select(sa.func.max(ct.c[VERSION])).where(ct.c[TIME] < cutoff)
                horizon = self.cleanup_horizon(conn)
                if horizon is not None:
                    query = query.where(ct.c[VERSION] <= horizon)
                top = conn.execute(query).scalar()
                if top is None:
                    conn.rollback()
                    return f"table {str(ref)!r}: no change older than {keep}"
                deleted = conn.execute(ct.delete().where(ct.c[VERSION] <= top)).rowcount
                conn.execute(
                    meta.update()
                    .where(meta.c.id == tracked.id, meta.c.min_valid_version < top)
                    .values(min_valid_version=int(top))
                )
                conn.commit()
        except SourceError:
            raise
        except sa.exc.DBAPIError as exc:
            raise db_error(source, ref, "cleaning up the change table of", exc) from None
        return f"table {str(ref)!r}: deleted {deleted} change(s) up to version {top}; minimum valid version is now {max(top, tracked.min_valid_version)}"

    @contextmanager
    def read(self, source: Source, info: TableInfo, last: int | None, *, on_expired: str, batch_size: int) -> Iterator[ChangeSet]:
        ref, keys = info.ref, info.primary_key
        with source.connect() as conn:
            try:
                schema, meta = self._located(conn, ref)
                tracked = self.load(conn, meta, ref.name)
                if tracked is None or not tracked.enabled:
                    raise not_enabled(source, ref)
                if tracked.primary_key != keys:
                    raise ChangeTrackingError(
                        f"change tracking on table {str(ref)!r} in source {source.name!r} is keyed by {tracked.primary_key}, "
                        f"not {keys}: configure that primary key, or disable and enable it again with {keys}"
                    )
                problems = self.installed(conn, tracked, self.names(conn, ref.name))
                if problems:
                    raise not_enabled(source, ref, f" ({'; '.join(problems)}: changes may have been missed)")
                self.before_snapshot(source, conn, meta, tracked)
                conn.commit()
                ct = self.change_table(info, schema, tracked.change_table, keys)
                self.begin_snapshot(conn, info, ct)
                current, min_valid = self.versions(conn, meta, tracked)
            except SourceError:
                conn.rollback()
                raise
            except sa.exc.DBAPIError as exc:
                conn.rollback()
                raise db_error(source, ref, "reading the changes of", exc) from None
            try:
                with open_change_set(
                    conn, source, ref, info, last=last, current=current, min_valid=min_valid, on_expired=on_expired,
                    batch_size=batch_size, changes=lambda: self.select_changes(source, info, ct, keys, last, current),
                ) as changes:
                    yield changes
            finally:
                self.end_snapshot(conn)

    def select_changes(self, source: Source, info: TableInfo, ct: sa.Table, keys: Sequence[str], last: int, new: int) -> sa.Select:
        """Net changes per key in ``(last, new]``, SQL Server's rules (see ``base.py``).

        The operation: D when the row is not in the table (in this snapshot), I when the key's
        first change in the range is an insert, U otherwise; the version is the key's latest.
        Deciding D from the row's presence, not from the range's last change, keeps an engine
        whose versions may order two transactions' changes of one key differently from their
        real order (PostgreSQL) from reporting a key deleted while it exists.
        """
        version, seq = ct.c[VERSION], ct.c[self.sequence_column()]
        grouped = (
            sa.select(
                *[ct.c[k] for k in keys],
                sa.func.max(version).label("ia_ct_version"),
                sa.func.min(seq).label("ia_ct_first"),
            )
            .where(version > sa.bindparam("last", last, sa.BigInteger), version <= sa.bindparam("new", new, sa.BigInteger))
            .group_by(*[ct.c[k] for k in keys])
            .subquery("ia_ct_keys")
        )
        first = ct.alias("ia_ct_first_change")
        table = info.table
        absent = table.c[keys[0]].is_(None)
        operation = sa.case((absent, "D"), (first.c[OPERATION] == "I", "I"), else_="U")
        return sa.select(
            *result_columns(source, info, keys, grouped),
            grouped.c.ia_ct_version.label(SYS_CHANGE_VERSION),
            operation.label(SYS_CHANGE_OPERATION),
        ).select_from(
            grouped.join(first, first.c[self.sequence_column()] == grouped.c.ia_ct_first).outerjoin(
                table, sa.and_(*[table.c[k] == grouped.c[k] for k in keys])
            )
        )
