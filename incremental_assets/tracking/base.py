"""Change tracking: net changes per primary key since a version, with SQL Server's semantics.

SQL Server and Azure SQL have the feature: ``mssql.py`` reads ``CHANGETABLE(CHANGES t, @last)``
the way Microsoft's recipe says. PostgreSQL, MySQL/MariaDB and SQLite get an equivalent that
:func:`enable_change_tracking` installs: a change table per tracked table (its key columns, a
version, an operation, a time), triggers that fill it, and a row in a small metadata table
(``ia_change_tracking``, next to the tracked table) that holds the minimum valid version, the
retention and, where the engine needs one, the version counter. How each engine makes its versions
follow commit order is explained in its module's docstring.

Versions mean the same on every engine, SQL Server's meaning:

- a read returns the changes with ``last < version <= new_version``; ``new_version`` is what the
  next read passes as ``last`` (no change is ever below it once it is returned: nothing skipped,
  nothing returned twice by consecutive reads);
- ``last`` is valid while ``last >= min_valid_version``; below it (change rows cleaned up, table
  truncated, tracking re-enabled) the read re-initialises with a full copy or fails, as asked;
- a full copy's rows carry ``SYS_CHANGE_VERSION = new_version`` (not NULL), so a last-writer-wins
  merge orders them before every later change of the same key;
- every read happens in one snapshot: versions, minimum valid version and rows agree.

Net changes are one row per key, the operation relative to ``last``: insert + update is I,
update + delete is D, insert + delete is D (the key was seen in between by nobody, but a D is
harmless and is what SQL Server reports), delete + re-insert is U. The key comes from the change
table (so deletes keep it); the other columns are joined from the current table (NULL for D).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ..sources.base import Source, SourceError, TableInfo, TableRef, scrub
from ..sources.types import column_converter, rows_to_batch

log = logging.getLogger("incremental_assets")

SYS_CHANGE_VERSION = "SYS_CHANGE_VERSION"
SYS_CHANGE_OPERATION = "SYS_CHANGE_OPERATION"
OPERATIONS = ("I", "U", "D")

#: the metadata table installed next to tracked tables (one row per tracked table)
META_TABLE = "ia_change_tracking"
#: columns of a change table besides the key columns
VERSION, SEQUENCE, OPERATION, TIME = "__ct_version", "__ct_seq", "__ct_op", "__ct_time"
ENABLE_COMMAND = "incremental-assets enable-change-tracking --table {table}"


class ChangeTrackingError(SourceError):
    """Change tracking is missing, misconfigured or cannot serve a read; the message names the table."""


# -- results ---------------------------------------------------------------------------------
@dataclass
class ChangeSet:
    """One read of a tracked table, all in one snapshot; ``batches`` stream while the read is open."""

    previous_version: int | None
    new_version: int
    min_valid_version: int
    reinitialized: bool
    reason: str
    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPERATIONS, 0))

    @property
    def rows(self) -> int:
        return sum(self.counts.values())


@dataclass
class Tracked:
    """What the metadata says about one tracked table (installed engines)."""

    id: int
    schema: str | None
    table: str
    change_table: str
    primary_key: list[str]
    enabled: bool
    current_version: int
    min_valid_version: int
    retention: dt.timedelta | None
    identity: str | None


def change_schema(table_schema: pa.Schema) -> pa.Schema:
    return table_schema.append(pa.field(SYS_CHANGE_VERSION, pa.int64())).append(pa.field(SYS_CHANGE_OPERATION, pa.string()))


def derived_name(base: str, suffix: str, limit: int) -> str:
    """``base + suffix``, shortened with a hash of ``base`` when longer than ``limit`` bytes."""
    name = base + suffix
    if len(name.encode()) <= limit:
        return name
    digest = "_" + hashlib.sha1(base.encode()).hexdigest()[:8]
    room = limit - len((digest + suffix).encode())
    head = base.encode()[:room].decode(errors="ignore")
    return head + digest + suffix


def meta_table(schema: str | None) -> sa.Table:
    """The metadata table (same definition on every installed engine)."""
    from sqlalchemy.dialects import mysql

    name_type = sa.String(255).with_variant(mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")
    return sa.Table(
        META_TABLE,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("table_name", name_type, nullable=False, unique=True),
        sa.Column("change_table", name_type, nullable=False),
        sa.Column("primary_key", sa.Text, nullable=False),
        sa.Column("enabled", sa.Integer, nullable=False),
        sa.Column("current_version", sa.BigInteger, nullable=False),
        sa.Column("min_valid_version", sa.BigInteger, nullable=False),
        sa.Column("retention_seconds", sa.BigInteger, nullable=True),
        sa.Column("table_identity", sa.String(255), nullable=True),
        schema=None if schema is None else TableRef(schema, "x").sa_schema,
    )


# -- the engine interface -------------------------------------------------------------------
class Tracker:
    """Engine-specific change tracking. Subclasses live in the engine modules."""

    #: True where the database has change tracking itself (SQL Server)
    native = False

    def enable(self, source: Source, info: TableInfo, *, retention: dt.timedelta | None) -> str:
        raise NotImplementedError

    def disable(self, source: Source, ref: TableRef, *, forget: bool) -> str:
        raise NotImplementedError

    def status(self, source: Source, ref: TableRef) -> dict[str, Any]:
        raise NotImplementedError

    def cleanup(self, source: Source, ref: TableRef, *, retention: dt.timedelta | None) -> str:
        raise NotImplementedError

    @contextmanager
    def read(
        self, source: Source, info: TableInfo, last: int | None, *, on_expired: str, batch_size: int
    ) -> Iterator[ChangeSet]:
        raise NotImplementedError
        yield  # pragma: no cover


_TRACKERS: dict[str, type[Tracker]] = {}


def register(*names: str):
    def wrap(cls: type[Tracker]) -> type[Tracker]:
        for name in names:
            _TRACKERS[name] = cls
        return cls

    return wrap


def tracker_for(source: Source) -> Tracker:
    from . import mssql, mysql, postgresql, sqlite  # noqa: F401  (registration by import)

    backend = make_url(source.url).get_backend_name()
    try:
        return _TRACKERS[backend]()
    except KeyError:
        raise ChangeTrackingError(f"source {source.name!r}: change tracking is not available for {backend!r}") from None


# -- shared helpers ---------------------------------------------------------------------------
def not_enabled(source: Source, ref: TableRef, detail: str = "") -> ChangeTrackingError:
    return ChangeTrackingError(
        f"change tracking is not enabled on table {str(ref)!r} in source {source.name!r}{detail}; "
        f"enable it with: {ENABLE_COMMAND.format(table=str(ref))}"
    )


def db_error(source: Source, ref: TableRef | str, action: str, exc: BaseException) -> ChangeTrackingError:
    orig = getattr(exc, "orig", None) or exc
    return ChangeTrackingError(
        f"{action} table {str(ref)!r} in source {source.name!r} failed: {scrub(str(orig), source.url).strip()}"
    )


def decide(last: int | None, current: int, min_valid: int, on_expired: str, source: Source, ref: TableRef) -> tuple[bool, str]:
    """Whether a read is a full copy, and why (Microsoft's recipe, plus a version from elsewhere)."""
    if last is None:
        return True, "first run"
    if last < min_valid:
        reason = f"last synced version {last} is below the minimum valid version {min_valid}"
    elif last > current:
        reason = f"last synced version {last} is ahead of the current version {current} (change tracking was reset?)"
    else:
        return False, ""
    if on_expired == "fail":
        raise ChangeTrackingError(
            f"table {str(ref)!r} in source {source.name!r}: {reason}; the changes since then are gone: "
            "re-initialise with a full copy (on_expired='reinitialize')"
        )
    log.warning("table %r in source %r: %s; re-initialising with a full copy", str(ref), source.name, reason)
    return True, reason


def result_columns(source: Source, info: TableInfo, keys: Sequence[str], key_source: Any | None) -> list:
    """The table's selected columns, keys taken from ``key_source`` (the change table) when given."""
    cols = []
    for name in info.columns:
        column = key_source.c[name] if (key_source is not None and name in keys) else info.table.c[name]
        cols.append(source.dialect.result_column(column).label(name))
    return cols


def select_full(source: Source, info: TableInfo, new_version: int) -> sa.Select:
    return sa.select(
        *result_columns(source, info, info.primary_key, None),
        sa.literal(new_version, sa.BigInteger).label(SYS_CHANGE_VERSION),
        sa.literal("I", sa.String(1)).label(SYS_CHANGE_OPERATION),
    ).select_from(info.table)


def stream(conn: sa.Connection, select: sa.Select, schema: pa.Schema, batch_size: int, counts: dict[str, int]) -> Generator[pa.RecordBatch, None, None]:
    """Stream a SELECT on an open (snapshot) connection as Arrow batches, counting operations."""
    converters = [column_converter(f.type) for f in schema]
    result = conn.execute(select, execution_options={"stream_results": True, "max_row_buffer": batch_size})
    try:
        for rows in result.partitions(batch_size):
            batch = rows_to_batch(rows, schema, converters)
            for entry in pc.value_counts(batch.column(SYS_CHANGE_OPERATION)).to_pylist():
                counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
            yield batch
    finally:
        result.close()


@contextmanager
def open_change_set(
    conn: sa.Connection, source: Source, ref: TableRef, info: TableInfo, *, last: int | None, current: int,
    min_valid: int, on_expired: str, batch_size: int, changes: Callable[[], sa.Select],
) -> Iterator[ChangeSet]:
    """The full copy or the net changes, decided and streamed inside the caller's snapshot."""
    full, reason = decide(last, current, min_valid, on_expired, source, ref)
    select = select_full(source, info, current) if full else changes()
    change_set = ChangeSet(
        previous_version=last,
        new_version=current,
        min_valid_version=min_valid,
        reinitialized=full,
        reason=reason,
        schema=change_schema(info.schema),
        batches=iter(()),
    )
    batches = stream(conn, select, change_set.schema, batch_size, change_set.counts)
    change_set.batches = _wrapped(batches, source, ref)
    try:
        yield change_set
    finally:
        batches.close()


def check_columns(source: Source, info: TableInfo, keys: Sequence[str]) -> None:
    clash = [c for c in info.columns if c.upper() in (SYS_CHANGE_VERSION, SYS_CHANGE_OPERATION)]
    if clash:
        raise ChangeTrackingError(f"table {str(info.ref)!r} in source {source.name!r} has column(s) {clash}, reserved for change tracking")


# -- installed change tracking (triggers + change table) ----------------------------------------
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
        """Net changes per key in ``(last, new]``, SQL Server's rules (see the module docstring).

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


def _wrapped(batches: Iterator[pa.RecordBatch], source: Source, ref: TableRef) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except sa.exc.DBAPIError as exc:
        raise db_error(source, ref, "reading the changes of", exc) from None


def ddl(conn: sa.Connection, sql: str) -> None:
    """Run a statement built from quoted identifiers, with no parameters (``%`` and ``:`` stay as they are)."""
    conn.exec_driver_sql(sql, execution_options={"no_parameters": True})


def quoter(conn: sa.Connection):
    """The dialect's identifier quoting, for SQL sent without parameters (so ``%`` is not doubled)."""
    preparer = conn.dialect.identifier_preparer

    def quote(name: str) -> str:
        return preparer.initial_quote + name.replace(preparer.escape_quote, preparer.escape_to_quote) + preparer.final_quote

    return quote


def qualified(conn: sa.Connection, schema: str | None, name: str) -> str:
    q = quoter(conn)
    return f"{q(schema)}.{q(name)}" if schema else q(name)


# -- the public API -----------------------------------------------------------------------------
def _describe(source: Source, table: str, primary_key: Sequence[str] | None, columns: Sequence[str] | None = None) -> TableInfo:
    try:
        ref = TableRef.parse(table)
    except ValueError as exc:
        raise ChangeTrackingError(f"source {source.name!r}: {exc}") from None
    if columns:
        keys_first = [k for k in (primary_key or []) if k not in columns]
        columns = [*keys_first, *columns]
    info = source.describe_table(str(ref), columns=columns, primary_key=primary_key)
    return with_keys(source, info, columns is not None)


def with_keys(source: Source, info: TableInfo, subset: bool) -> TableInfo:
    """Check the table has a key, and that the selected columns hold it (added in front if not)."""
    if not info.primary_key:
        raise ChangeTrackingError(
            f"table {str(info.ref)!r} in source {source.name!r} has no primary key; change tracking needs one: "
            "declare it in the database or give primary_key in the configuration"
        )
    missing = [k for k in info.primary_key if k not in info.columns]
    if missing:
        names = [*missing, *info.columns]
        schema = pa.schema([pa.field(c, source.dialect.arrow_type(info.table.c[c].type)) for c in names])
        info = dataclasses.replace(info, columns=names, schema=schema)
    return info


def enable_change_tracking(
    source: Source, table: str, *, primary_key: list[str] | None = None, retention: dt.timedelta | None = None
) -> str:
    """Turn change tracking on for ``table`` (install it where the engine lacks it); idempotent.

    Returns a human summary of what was done. ``retention`` is how long change rows are kept by
    :func:`cleanup_change_tracking` (installed engines) or the database's retention (SQL Server).
    """
    tracker = tracker_for(source)
    info = _describe(source, table, primary_key)
    return tracker.enable(source, info, retention=retention)


def disable_change_tracking(source: Source, table: str, *, forget: bool = False) -> str:
    """Remove what :func:`enable_change_tracking` installed; idempotent.

    Installed engines keep the table's metadata row (marked disabled) so that enabling again
    continues the versions instead of handing out old ones again; ``forget=True`` removes it too
    (and the metadata table when no other table is tracked).
    """
    try:
        ref = TableRef.parse(table)
    except ValueError as exc:
        raise ChangeTrackingError(f"source {source.name!r}: {exc}") from None
    return tracker_for(source).disable(source, ref, forget=forget)


def change_tracking_status(source: Source, table: str) -> dict[str, Any]:
    """``enabled``, ``current_version``, ``min_valid_version``, ``retention`` (where known), and more."""
    try:
        ref = TableRef.parse(table)
    except ValueError as exc:
        raise ChangeTrackingError(f"source {source.name!r}: {exc}") from None
    return tracker_for(source).status(source, ref)


def cleanup_change_tracking(source: Source, table: str, *, retention: dt.timedelta | None = None) -> str:
    """Delete change rows older than ``retention`` (default: the one set at enable) and raise the
    minimum valid version past them, so readers still behind them re-initialise.

    SQL Server cleans up by itself (AUTO_CLEANUP); elsewhere run this on a schedule.
    """
    try:
        ref = TableRef.parse(table)
    except ValueError as exc:
        raise ChangeTrackingError(f"source {source.name!r}: {exc}") from None
    return tracker_for(source).cleanup(source, ref, retention=retention)


class ChangeReader:
    """Reads a tracked table's net changes since a version, all in one snapshot."""

    def __init__(
        self,
        source: Source,
        table: str,
        *,
        primary_key: list[str] | None = None,
        columns: list[str] | None = None,
        info: TableInfo | None = None,
    ):
        self.source = source
        self.table = table
        self.primary_key = primary_key
        self.columns = columns
        self._info = with_keys(source, info, columns is not None) if info is not None else None
        self.tracker = tracker_for(source)

    @property
    def info(self) -> TableInfo:
        """The table as described by the source (reflected once, on first use)."""
        if self._info is None:
            self._info = _describe(self.source, self.table, self.primary_key, self.columns)
            check_columns(self.source, self._info, self._info.primary_key)
        return self._info

    @property
    def schema(self) -> pa.Schema:
        return change_schema(self.info.schema)

    @contextmanager
    def read(
        self,
        last_version: int | None,
        *,
        on_expired: Literal["reinitialize", "fail"] = "reinitialize",
        batch_size: int = 100_000,
    ) -> Iterator[ChangeSet]:
        """One read: a full copy (first run, or ``last_version`` no longer valid) or the net
        changes since ``last_version``. The snapshot stays open until the block ends: consume
        ``batches`` inside it."""
        if on_expired not in ("reinitialize", "fail"):
            raise ValueError(f"on_expired must be 'reinitialize' or 'fail', not {on_expired!r}")
        with self.tracker.read(self.source, self.info, last_version, on_expired=on_expired, batch_size=batch_size) as changes:
            yield changes
