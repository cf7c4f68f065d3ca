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

This module holds the tracker interface every engine implements, its registry and the public API
over them, with what the installed engines share (the metadata table, the change table's column
and object names). What a read returns and how it is decided and streamed is in ``changes.py``;
the logic of the installed engines in ``installed.py``. Both are importable from here too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ..sources.base import Source, TableInfo, TableRef
from .changes import (  # noqa: F401  (moved there, still importable from here)
    ENABLE_COMMAND,
    OPERATIONS,
    SYS_CHANGE_OPERATION,
    SYS_CHANGE_VERSION,
    ChangeSet,
    ChangeTrackingError,
    change_schema,
    check_columns,
    db_error,
    decide,
    not_enabled,
    open_change_set,
    result_columns,
    select_full,
    stream,
)

#: the metadata table installed next to tracked tables (one row per tracked table)
META_TABLE = "ia_change_tracking"
#: columns of a change table besides the key columns
VERSION, SEQUENCE, OPERATION, TIME = "__ct_version", "__ct_seq", "__ct_op", "__ct_time"


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


# last: InstalledTracker subclasses Tracker, defined above (the package imports this module first)
from .installed import InstalledTracker  # noqa: E402, F401
