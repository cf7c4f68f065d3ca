"""Change sets: what a read of changes returns or raises, and the part of the read every engine shares.

A read decides, in its snapshot, whether it is a full copy or the net changes since the last
version (:func:`decide`, Microsoft's recipe), selects the table's columns the way the source reads
them (:func:`result_columns`, :func:`select_full`) and streams the rows as Arrow batches into a
:class:`ChangeSet` (:func:`open_change_set`). The engines (``mssql.py``, ``installed.py``) supply
the snapshot, the versions and the SELECT of the changes. What versions mean: ``base.py``.

Apart from ``base.py`` because it is the reading engine, used by every tracker, while ``base.py``
holds the tracker interface, its registry and the public API.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from ..sources.base import Source, SourceError, TableInfo, TableRef, scrub
from ..sources.types import column_converter, rows_to_batch

log = logging.getLogger("incremental_assets")

SYS_CHANGE_VERSION = "SYS_CHANGE_VERSION"
SYS_CHANGE_OPERATION = "SYS_CHANGE_OPERATION"
OPERATIONS = ("I", "U", "D")

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


def change_schema(table_schema: pa.Schema) -> pa.Schema:
    return table_schema.append(pa.field(SYS_CHANGE_VERSION, pa.int64())).append(pa.field(SYS_CHANGE_OPERATION, pa.string()))


# -- errors, and the read every engine shares -----------------------------------------------------
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


def _wrapped(batches: Iterator[pa.RecordBatch], source: Source, ref: TableRef) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except sa.exc.DBAPIError as exc:
        raise db_error(source, ref, "reading the changes of", exc) from None
