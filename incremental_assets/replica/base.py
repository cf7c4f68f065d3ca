"""A SQL replica kept equal to the source by merging landed slices: last writer wins by version.

    replica = Replica("postgresql+psycopg://user@host/db")
    result = replica.merge("customer_table", batches, ["PersonID"], version_column="LastModifytime")
    assert replica.reconcile("customer_table", ["PersonID"]) == reconcile_source(src, src_table, ["PersonID"])

Why merges converge whatever the order and repetition of slices:

- a row is written only when its version is >= the stored one (a NULL version is older than any
  version), so replaying an older slice changes nothing and replaying a slice rewrites the same values;
- a delete removes the row (or, with ``soft_delete=True``, sets its ``_deleted`` flag) and records
  ``(key, version)`` in ``<table>__deleted``; an insert or update older than that tombstone is
  skipped, so a replayed older insert cannot bring a deleted row back;
- duplicates of a key within one merge collapse to the highest version before anything is written.

Each merge is one transaction holding a per-table lock (merges of one table queue, so parallel
backfills neither deadlock nor miscount): the rows are bulk-loaded into a temporary staging table
shaped like the target (or, where an engine has a faster loader on a connection of its own, into a
table of their own that the merge drops), counted against the target, then applied with the
engine's upsert.
Everything specific to one engine lives in its module as a :class:`ReplicaDialect`; this module
never branches on the engine's name.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import itertools
import logging
import time
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ..progress import Progress
from ..landing.formats import list_json_text
from ..sources.base import is_authentication_failure, redact_url, scrub
from ..sources.types import is_binary_type

log = logging.getLogger("incremental_assets")
UTC = dt.timezone.utc
_ARROW_MAJOR = int(pa.__version__.split(".")[0])

#: soft-delete flag column, created on demand by ``merge(..., soft_delete=True)``
DELETED = "_deleted"
#: the tombstone table of ``T`` is ``T + TOMBSTONE_SUFFIX``: key columns + version, primary key on the key
TOMBSTONE_SUFFIX = "__deleted"
#: staging-only column: 1 for a delete, 0 for an insert/update
OP = "__ia_op"
#: rows per merge step when data comes as a stream of batches (bounded memory)
CHUNK_ROWS = 1_000_000
#: a bound parameter's place in driver-level SQL; replaced by the driver's own marker when run
PARAM = "\x00?"


class ReplicaError(Exception):
    """A problem with a replica, its tables or columns; the message never holds a password."""


class ReplicaUnavailable(ReplicaError):
    """The replica could not be reached after the configured retries (transient)."""


class UnstorableValue(ValueError):
    """A value the engine cannot hold (e.g. NaN in MySQL); raised by a dialect while staging."""

    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


@dataclass
class MergeResult:
    """What one merge did, counted against the replica as it was before the merge.

    ``updated`` counts stored rows that the merge changed: the staged version is newer than or
    equal to the stored one and some column differs (NULL equals NULL). A stored row whose values
    all equal the staged ones is ``unchanged`` (a replayed slice: merging a file twice reports 0
    updated the second time) and is not rewritten. ``deleted`` counts rows removed, or flagged
    ``_deleted`` that were not flagged already.
    """

    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    #: staged rows equal to the stored row of their key (same version and values): nothing to write
    unchanged: int = 0
    #: rows ignored because the replica already had a newer version of the key (or a newer tombstone)
    skipped_older: int = 0
    seconds: float = 0.0
    #: columns the merge added to the replica table (schema drift, or ``_deleted`` for soft deletes)
    added_columns: list[str] = field(default_factory=list)
    #: columns whose type the merge widened: ``{column: "old -> new"}``
    widened_columns: dict[str, str] = field(default_factory=dict)
    #: columns of the replica table the data lacks (dropped or renamed at the source, or added
    #: after the data was landed): kept, and left as they are by the merge (NULL in new rows)
    kept_columns: list[str] = field(default_factory=list)


@dataclass
class SchemaChanges:
    """What :meth:`Replica.adapt_table` found and did: the replica table against the data's columns."""

    created: bool = False
    added: list[str] = field(default_factory=list)
    widened: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    #: the table's columns and types afterwards, as the database shows them
    columns: dict[str, str] = field(default_factory=dict)


# -- types ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqlType:
    """A column type as stored in a replica, reduced to what decides which Arrow values it holds."""

    family: str  # bool int float decimal text binary date timestamp time interval array any other
    bits: int | None = None  # int / float width
    unsigned: bool = False
    precision: int | None = None  # decimal; None: unconstrained
    scale: int | None = None
    tz: bool | None = None  # timestamp: True instants, False wall clock, None not recorded (UTC by convention)
    text: str = ""  # as the database shows it, for messages
    item: SqlType | None = None  # array: its elements' type

    def __str__(self) -> str:
        return self.text or self.family


_DIGITS = {8: 3, 16: 5, 32: 10, 64: 19}


def fits(arrow_type: pa.DataType, st: SqlType) -> bool:
    """Whether every value of ``arrow_type`` can be stored exactly in a column of type ``st``."""
    t, f = arrow_type, st.family
    if f == "any" or pa.types.is_null(t):
        return True
    if pa.types.is_boolean(t):
        return f in ("bool", "int")
    if pa.types.is_integer(t):
        unsigned = pa.types.is_unsigned_integer(t)
        if f == "int":
            if st.unsigned:
                return unsigned and (st.bits or 64) >= t.bit_width
            return (st.bits or 64) > t.bit_width if unsigned else (st.bits or 64) >= t.bit_width
        if f == "decimal":
            digits = 20 if (unsigned and t.bit_width == 64) else _DIGITS[t.bit_width]
            return (st.scale or 0) == 0 and (st.precision is None or st.precision >= digits)
        return False
    if pa.types.is_floating(t):
        return f == "float" and (st.bits or 64) >= t.bit_width
    if pa.types.is_decimal(t):
        if f != "decimal":
            return False
        if st.precision is None:
            return True
        scale = st.scale or 0
        return scale >= t.scale and st.precision - scale >= t.precision - t.scale
    if pa.types.is_string(t):
        return f == "text"
    if pa.types.is_binary(t):
        return f == "binary"
    if pa.types.is_date(t):
        return f == "date"
    if pa.types.is_timestamp(t):
        return f == "timestamp" and (st.tz is None or st.tz == (t.tz is not None))
    if pa.types.is_time(t):
        return f == "time"
    if pa.types.is_duration(t):
        return f == "interval" or (f == "int" and not st.unsigned and (st.bits or 64) >= 64)
    if pa.types.is_list(t):
        return f == "array" and st.item is not None and fits(t.value_type, st.item)
    return False


def _int_bounds(bits: int, unsigned: bool) -> tuple[int, int]:
    return (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _digits(bounds: tuple[int, int]) -> int:
    return max(len(str(abs(bounds[0]))), len(str(bounds[1])))


def _decimal(precision: int, scale: int) -> pa.DataType:
    return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)


def widened(st: SqlType, arrow_type: pa.DataType) -> pa.DataType | None:
    """The Arrow type of a column that holds exactly every value of a column of type ``st`` and
    of ``arrow_type`` (a source column widened: int -> bigint, numeric(10,2) -> numeric(12,4)...);
    None when there is none short of changing the kind of value (text, a time zone)."""
    t = arrow_type
    if st.family == "int" and pa.types.is_integer(t):
        old = _int_bounds(st.bits or 64, st.unsigned)
        new = _int_bounds(t.bit_width, pa.types.is_unsigned_integer(t))
        lo, hi = min(old[0], new[0]), max(old[1], new[1])
        for bits in (16, 32, 64):
            if _int_bounds(bits, False)[0] <= lo and hi <= _int_bounds(bits, False)[1]:
                return {16: pa.int16(), 32: pa.int32(), 64: pa.int64()}[bits]
        return pa.decimal128(20, 0)
    if st.family == "decimal" and st.precision is not None and (pa.types.is_decimal(t) or pa.types.is_integer(t)):
        scale = st.scale or 0
        whole = st.precision - scale
        if pa.types.is_decimal(t):
            whole, scale = max(whole, t.precision - t.scale), max(scale, t.scale)
        else:
            whole = max(whole, _digits(_int_bounds(t.bit_width, pa.types.is_unsigned_integer(t))))
        return _decimal(whole + scale, scale)
    if st.family == "int" and pa.types.is_decimal(t):
        whole = max(_digits(_int_bounds(st.bits or 64, st.unsigned)), t.precision - t.scale)
        return _decimal(whole + t.scale, t.scale)
    if st.family == "float" and pa.types.is_floating(t):
        return pa.float64()
    return None


def storable(t: pa.DataType) -> pa.DataType:
    """The one Arrow type values of ``t`` are written as (microsecond timestamps in UTC, plain strings...)."""
    if pa.types.is_dictionary(t):
        return storable(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_timestamp(t):
        # any zone: the values are instants, kept in UTC
        return pa.timestamp("us", tz=None if t.tz is None else "UTC")
    if pa.types.is_date64(t):
        return pa.date32()
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_duration(t):
        return pa.duration("us")
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_decimal32(t) or pa.types.is_decimal64(t):
        return pa.decimal128(t.precision, t.scale)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(storable(t.value_type))
    return t


def utc_wall_clock(array: pa.ChunkedArray) -> pa.ChunkedArray:
    """Instants as naive UTC wall-clock values (formatting zone-aware values is 20x slower in Arrow)."""
    return array.cast(pa.timestamp("us")) if array.type.tz is not None else array


def timestamp_text(array: pa.ChunkedArray, *, utc_suffix: str = "+00:00") -> pa.ChunkedArray:
    """Fixed-width ISO text (``2024-01-31 10:00:00.123456``, ``+00:00`` for instants): sorts as time does."""
    text = pc.cast(utc_wall_clock(array), pa.string())
    if array.type.tz is not None and utc_suffix:
        text = pc.binary_join_element_wise(text, utc_suffix, "")
    return text


def decimal_text(array: pa.ChunkedArray) -> list:
    """Plain decimal text (``0.0000000001``, never ``1E-10``, which some engines read as a float)."""
    return [None if d is None else format(d, "f") for d in array.to_pylist()]


def duration_micros(array: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(array, pa.int64())


# -- engine dialects ----------------------------------------------------------------------------


@dataclass
class TableShape:
    """An existing table: its columns and every column set it is unique on (primary key first)."""

    columns: dict[str, SqlType]
    unique_keys: list[frozenset[str]]
    primary_key: list[str]


@dataclass
class MergePlan:
    """The names and SQL fragments of one merge, in the target's dialect (identifiers already quoted)."""

    table: str
    target: str
    tombstones: str
    staging: str
    columns: list[str]  # staging/target columns, in order (``_deleted`` included when the table has it)
    key: list[str]
    version: str
    deletes: bool  # an operation column is given: staging has OP
    soft_delete: bool
    flag: bool  # the table has ``_deleted``
    q: Callable[[str], str]
    #: learnt from :meth:`ReplicaDialect.count_sql` for the staged rows: no staged key is in the
    #: target (a plain insert does), or some staged rows are older than the target's (leave them out
    #: of the upsert, which would otherwise lock and rewrite them for nothing)
    new_only: bool = False
    filter_older: bool = False
    #: the name (unquoted) of the staging table's unique index, where it is named
    staging_index: str = ""

    @property
    def staging_columns(self) -> list[str]:
        return self.columns + ([OP] if self.deletes else [])

    @property
    def tomb_columns(self) -> list[str]:
        """The tombstone table's columns: the key, then the version (unless the key holds it)."""
        return self.key + ([] if self.version in self.key else [self.version])

    @property
    def data_columns(self) -> list[str]:
        """The columns an update may change (not the key)."""
        return [c for c in self.columns if c not in self.key]

    def on(self, left: str, right: str) -> str:
        return " AND ".join(f"{left}.{self.q(k)} = {right}.{self.q(k)}" for k in self.key)

    def newer_or_equal(self, new: str, old: str) -> str:
        """``new`` may overwrite ``old``: two-valued even with NULL versions (NULL is older than anything)."""
        v = self.q(self.version)
        return f"({old}.{v} IS NULL OR ({new}.{v} IS NOT NULL AND {new}.{v} >= {old}.{v}))"

    def not_tombstoned(self, new: str, tomb: str = "d") -> str:
        k, v = self.q(self.key[0]), self.q(self.version)
        return f"({tomb}.{k} IS NULL OR ({new}.{v} IS NOT NULL AND {new}.{v} >= {tomb}.{v}))"

    def is_delete(self, alias: str = "s") -> str:
        return f"{alias}.{self.q(OP)} = 1"

    def is_upsert(self, alias: str = "s") -> str:
        return f"{alias}.{self.q(OP)} = 0"


class ReplicaDialect:
    """Engine-specific behaviour of a replica. Subclasses override what their engine does differently."""

    #: keyword arguments for ``sqlalchemy.create_engine``
    engine_kwargs: dict[str, Any] = {}
    #: longest primary key in bytes, when the engine bounds it (text/binary keys then get bounded types)
    max_key_bytes: int | None = None
    #: how the staging table's operation column is created
    op_column_sql = "CAST(0 AS SMALLINT)"
    #: the usual driver's paramstyle, for SQL built offline when that driver cannot be imported
    driver_paramstyle = "pyformat"
    #: whether lists are stored in array columns (else as JSON text, see ``list_json_text``)
    array_columns = False
    #: how the engine compares column names, for messages (see :meth:`name_key`)
    name_rule = "compares column names without regard to case"

    def name_key(self, name: str) -> str:
        """What the engine compares when it tells two column names apart: two names with one key
        are one column (MySQL/MariaDB and SQL Server's usual collations ignore case)."""
        return name.lower()

    def configure_engine(self, engine: sa.Engine) -> None:
        """Install engine event hooks (transactions, session settings)."""

    def prepare(self, conn: sa.Connection) -> None:
        """Learn server specifics on the first connection (e.g. the best collation)."""

    # -- types --------------------------------------------------------------------------------
    def column_type(self, t: pa.DataType, *, key_bytes: int | None = None) -> str:
        """The DDL type for Arrow type ``t``; ``key_bytes`` is set for key columns (their byte budget)."""
        raise NotImplementedError

    #: the soft-delete flag, added to existing rows as false
    flag_column_sql = "BOOLEAN NOT NULL DEFAULT FALSE"

    def sql_type(self, sa_type: sa.types.TypeEngine) -> SqlType:
        """A reflected SQLAlchemy type as a :class:`SqlType`."""
        name = type(sa_type).__name__.upper()
        text = _type_text(sa_type)
        if isinstance(sa_type, sa.ARRAY):
            return SqlType("array", text=text, item=self.sql_type(sa_type.item_type))
        if isinstance(sa_type, sa.Boolean):
            return SqlType("bool", text=text)
        if isinstance(sa_type, sa.Integer):
            bits = 16 if isinstance(sa_type, sa.SmallInteger) else 64 if isinstance(sa_type, sa.BigInteger) else 32
            if name == "TINYINT":
                bits = 8
            if name == "MEDIUMINT":
                bits = 24
            return SqlType("int", bits=bits, unsigned=bool(getattr(sa_type, "unsigned", False)), text=text)
        if isinstance(sa_type, sa.Float) or name in {"REAL", "DOUBLE", "DOUBLE_PRECISION", "FLOAT"}:
            precision = getattr(sa_type, "precision", None)
            bits = 32 if name == "REAL" or (precision is not None and precision <= 24) else 64
            return SqlType("float", bits=bits, text=text)
        if isinstance(sa_type, sa.Numeric):
            return SqlType("decimal", precision=sa_type.precision, scale=sa_type.scale, text=text)
        if name == "DATETIMEOFFSET":
            return SqlType("timestamp", tz=True, text=text)
        if isinstance(sa_type, sa.DateTime):
            return SqlType("timestamp", tz=bool(getattr(sa_type, "timezone", False)), text=text)
        if isinstance(sa_type, sa.Date):
            return SqlType("date", text=text)
        if isinstance(sa_type, sa.Time):
            return SqlType("time", text=text)
        if isinstance(sa_type, sa.Interval) or name == "INTERVAL":
            return SqlType("interval", text=text)
        if is_binary_type(sa_type):
            return SqlType("binary", text=text)
        if isinstance(sa_type, sa.String):
            return SqlType("text", text=text)
        return SqlType("other", text=text)

    # -- reflection ---------------------------------------------------------------------------
    def reflect(self, conn: sa.Connection, schema: str | None, table: str) -> TableShape | None:
        insp = sa.inspect(conn)
        if not insp.has_table(table, schema=schema):
            return None
        columns = self.reflect_columns(conn, insp, schema, table)
        pk = list(insp.get_pk_constraint(table, schema=schema).get("constrained_columns") or [])
        keys = [frozenset(pk)] if pk else []
        try:
            keys += [frozenset(u["column_names"]) for u in insp.get_unique_constraints(table, schema=schema)]
        except NotImplementedError:
            pass
        keys += [frozenset(ix["column_names"]) for ix in insp.get_indexes(table, schema=schema) if ix.get("unique")]
        return TableShape(columns, keys, pk)

    def reflect_columns(self, conn: sa.Connection, insp: Any, schema: str | None, table: str) -> dict[str, SqlType]:
        return {c["name"]: self.sql_type(c["type"]) for c in insp.get_columns(table, schema=schema)}

    # -- DDL ----------------------------------------------------------------------------------
    table_options = ""

    def create_table_sql(self, name: str, columns: list[tuple[str, str, bool]], key: list[str], q) -> str:
        """``columns``: (name, DDL type, NOT NULL)."""
        body = [f"{q(c)} {t}{' NOT NULL' if notnull else ''}" for c, t, notnull in columns]
        body.append(f"PRIMARY KEY ({', '.join(q(k) for k in key)})")
        return f"CREATE TABLE {name} (" + ", ".join(body) + ")" + self.table_options

    def add_column_sql(self, name: str, column: str, type_sql: str) -> str:
        return f"ALTER TABLE {name} ADD COLUMN {column} {type_sql}"

    #: whether :meth:`alter_type_sql` is run by the merge itself (else it is given to the user)
    alters_types = False

    def alter_type_sql(self, name: str, column: str, type_sql: str, *, not_null: bool, using: str | None = None) -> str | None:
        """The statement that changes ``column``'s type to ``type_sql``, keeping its values
        (``using``: an expression of the old value, where a cast needs one); None if the engine
        has none."""
        return None

    def utc_instants_sql(self, column: str) -> str | None:
        """The expression that reads a wall-clock timestamp column as UTC instants, for
        :meth:`alter_type_sql` (None: the engine's own cast does it)."""
        return None

    # -- staging ------------------------------------------------------------------------------
    def staging_name(self, token: str) -> str:
        """A per-merge temporary table name (unique, so it never shadows a real table)."""
        return f"ia_stage_{token}" if token else "ia_stage"

    def staging_select_list(self, plan: MergePlan) -> str:
        """The target's columns (so staging has their exact types and collations), plus OP."""
        cols = ", ".join(plan.q(c) for c in plan.columns)
        if plan.deletes:
            cols += f", {self.op_column_sql} AS {plan.q(OP)}"
        return cols

    def create_staging_sql(self, plan: MergePlan) -> list[str]:
        """An empty temporary table shaped like the target, plus OP, unique on the key (a staged
        key is found by an index lookup whichever way a plan joins it)."""
        return [
            f"CREATE TEMPORARY TABLE {plan.staging} AS SELECT {self.staging_select_list(plan)} FROM {plan.target} WHERE 1 = 0",
            f"CREATE UNIQUE INDEX {plan.q(plan.staging_index)} ON {plan.staging} ({', '.join(plan.q(k) for k in plan.key)})",
        ]

    def clear_staging_sql(self, plan: MergePlan) -> str:
        return f"DELETE FROM {plan.staging}"

    def drop_staging_sql(self, plan: MergePlan) -> str:
        return f"DROP TABLE {plan.staging}"

    def insert_staging_sql(self, plan: MergePlan) -> str:
        cols = ", ".join(plan.q(c) for c in plan.staging_columns)
        marks = ", ".join([PARAM] * len(plan.staging_columns))
        return f"INSERT INTO {plan.staging} ({cols}) VALUES ({marks})"

    def python_values(self, array: pa.ChunkedArray) -> list:
        """Values of one staged column as the driver takes them (executemany paths)."""
        if pa.types.is_duration(array.type):
            return duration_micros(array).to_pylist()
        return array.to_pylist()

    @contextmanager
    def side_staging(self, replica: Replica, table: str) -> Iterator[Any]:
        """Per merge (entered before its transaction begins, left after it ends): None, or a
        faster loader on a connection of its own, whose ``load(conn, staged, execute)`` stages a
        step in a committed table and returns its name (None: use the staging table) and whose
        ``drop_sql()`` lists what the merge drops before committing."""
        yield None

    def load_staging(self, conn: sa.Connection, plan: MergePlan, table: pa.Table, execute) -> None:
        """Bulk-load ``table`` (columns in ``plan.staging_columns`` order) into the staging table."""
        sql = self.insert_staging_sql(plan)
        for batch in table.to_batches(max_chunksize=20_000):
            execute(conn, sql, list(zip(*self.python_columns(batch))))

    def python_columns(self, batch: pa.RecordBatch) -> list[list]:
        columns = []
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                columns.append(self.python_values(pa.chunked_array([column])))
            except ValueError as exc:
                raise UnstorableValue(name, str(exc)) from None
        return columns

    # -- merge SQL ----------------------------------------------------------------------------
    def orders_versions_of(self, t: pa.DataType) -> bool:
        """Whether stored values of type ``t`` compare in version order (``>=`` in SQL)."""
        return True

    def lock(self, conn: sa.Connection, name: str) -> None:
        """Take the per-table lock for the current transaction (merges of one table queue);
        raise ``TimeoutError`` when it cannot be had."""

    def begin_merge(self, conn: sa.Connection) -> None:
        """Session settings for the merge's transaction (called first in it)."""

    def unlock(self, conn: sa.Connection, name: str) -> None:
        """Release a lock that outlives transactions (called after commit or rollback)."""

    def before_step(self, conn: sa.Connection, plan: MergePlan, rows: int, execute) -> None:
        """Called once a step's ``rows`` are staged, before its count and merge statements."""

    def distinct_sql(self, pairs: list[tuple[str, str]]) -> str:
        """Two-valued: some ``(new, old)`` pair differs, NULL being equal to NULL."""
        if not pairs:
            return "1 = 0"
        return "(" + " OR ".join(f"{a} IS DISTINCT FROM {b}" for a, b in pairs) + ")"

    def changed_sql(self, plan: MergePlan, new: str = "s", old: str = "t") -> str:
        """The staged row ``new`` differs from the stored row ``old`` of its key in some column."""
        return self.distinct_sql([(f"{new}.{plan.q(c)}", f"{old}.{plan.q(c)}") for c in plan.data_columns])

    def count_sql(self, plan: MergePlan) -> str:
        """One row, read before any change: rows staged, inserted, updated (newer or equal and
        different), unchanged (equal in every column), deleted, skipped as older, and upserts whose
        key is in the target (updated, unchanged or older)."""
        q, s = plan.q, "s"
        k0 = q(plan.key[0])
        exists, fresh = f"t.{k0} IS NOT NULL", plan.not_tombstoned(s)
        guard = plan.newer_or_equal(s, "t")
        changed = self.changed_sql(plan)
        older_t = f"(t.{k0} IS NOT NULL AND NOT {guard})"
        older_d = f"(t.{k0} IS NULL AND NOT {fresh})"
        up = plan.is_upsert() + " AND " if plan.deletes else ""
        parts = [
            "COUNT(*)",
            f"SUM(CASE WHEN {up}{fresh} AND t.{k0} IS NULL THEN 1 ELSE 0 END)",
            f"SUM(CASE WHEN {up}{fresh} AND {exists} AND {guard} AND {changed} THEN 1 ELSE 0 END)",
            f"SUM(CASE WHEN {up}{fresh} AND {exists} AND {guard} AND NOT {changed} THEN 1 ELSE 0 END)",
        ]
        if plan.deletes:
            # a soft delete of a row flagged already changes nothing: not counted
            flagged = ""
            if plan.soft_delete and plan.flag:
                flagged = " AND " + self.distinct_sql([(f"s.{q(DELETED)}", f"t.{q(DELETED)}")])
            parts += [
                f"SUM(CASE WHEN {plan.is_delete()} AND {exists} AND {guard}{flagged} THEN 1 ELSE 0 END)",
                f"SUM(CASE WHEN ({plan.is_upsert()} AND (NOT {fresh} OR {older_t})) "
                f"OR ({plan.is_delete()} AND ({older_t} OR {older_d})) THEN 1 ELSE 0 END)",
            ]
        else:
            parts += ["0", f"SUM(CASE WHEN NOT {fresh} OR {older_t} THEN 1 ELSE 0 END)"]
        parts.append(f"SUM(CASE WHEN {up}{fresh} AND {exists} THEN 1 ELSE 0 END)")
        return (
            f"SELECT {', '.join(parts)} FROM {plan.staging} AS s "
            f"LEFT JOIN {plan.target} AS t ON {plan.on('t', 's')} "
            f"LEFT JOIN {plan.tombstones} AS d ON {plan.on('d', 's')}"
        )

    def upsert_source_sql(self, plan: MergePlan) -> str:
        """The staged inserts/updates not older than a tombstone of their key (with
        ``filter_older``: and new, or newer than the stored row and different from it)."""
        cols = ", ".join(f"s.{plan.q(c)}" for c in plan.columns)
        where = (plan.is_upsert() + " AND " if plan.deletes else "") + plan.not_tombstoned("s")
        joins = f"LEFT JOIN {plan.tombstones} AS d ON {plan.on('d', 's')}"
        if plan.filter_older:
            joins += f" LEFT JOIN {plan.target} AS t ON {plan.on('t', 's')}"
            where += (
                f" AND (t.{plan.q(plan.key[0])} IS NULL OR ({plan.newer_or_equal('s', 't')} AND {self.changed_sql(plan)}))"
            )
        return f"SELECT {cols} FROM {plan.staging} AS s {joins} WHERE {where}"

    def is_empty_sql(self, plan: MergePlan) -> str:
        """One row, two NULLs when the target and its tombstones are empty (index endpoint reads)."""
        k0 = plan.q(plan.key[0])
        return f"SELECT (SELECT MIN({k0}) FROM {plan.target}), (SELECT MIN({k0}) FROM {plan.tombstones})"

    def all_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        """Whether no staged key can be in the target or its tombstones, asked before anything is
        loaded (the merge's lock keeps it true until commit): here, when both tables are empty."""
        return execute(conn, self.is_empty_sql(plan)).one() == (None, None)

    def insert_if_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool | None:
        """Insert the step's rows if no key of theirs is stored (no deletes): None when they were
        not inserted (the step is merged by key), else whether the staging table now holds them."""
        return self.insert_new(conn, plan, staged, execute) if self.all_new(conn, plan, staged, execute) else None

    def insert_new(self, conn: sa.Connection, plan: MergePlan, staged: pa.Table, execute) -> bool:
        """Insert rows that :meth:`all_new` found new (no deletes); returns whether the staging
        table now holds them."""
        self.load_staging(conn, plan, staged, execute)
        execute(conn, self.insert_all_sql(plan))
        return True

    def insert_all_sql(self, plan: MergePlan) -> str:
        """The fast path into an empty table (no tombstones, no deletes): every staged row is new."""
        cols = ", ".join(plan.q(c) for c in plan.columns)
        return f"INSERT INTO {plan.target} ({cols}) SELECT {cols} FROM {plan.staging}"

    def tombstone_source_sql(self, plan: MergePlan) -> str:
        cols = ", ".join(f"s.{plan.q(c)}" for c in plan.tomb_columns)
        return f"SELECT {cols} FROM {plan.staging} AS s WHERE {plan.is_delete()}"

    def upsert_sql(self, target: str, source: str, columns: list[str], key: list[str], version: str, q) -> str:
        """Insert the rows of SELECT ``source`` into ``target``; update a key only from a version >= the stored one."""
        raise NotImplementedError

    def deleted_keys_sql(self, plan: MergePlan) -> str:
        """The keys a staged delete removes: the staged rows drive, each finds its stored row by key
        (``CROSS JOIN`` keeps SQLite from scanning the target for each staged row)."""
        keys = ", ".join(f"s.{plan.q(k)}" for k in plan.key)
        return (
            f"SELECT {keys} FROM {plan.staging} AS s CROSS JOIN {plan.target} AS t "
            f"WHERE {plan.on('t', 's')} AND {plan.is_delete()} AND {plan.newer_or_equal('s', 't')}"
        )

    # the target is named, not aliased, in these two; the staging table is named (its name is unique)
    # where the target is in scope, so no alias can shadow a target called "s"; each statement finds
    # a stored row by its key for each staged delete, and never reads the target for every row
    def delete_sql(self, plan: MergePlan) -> str:
        keys = ", ".join(plan.q(k) for k in plan.key)
        return f"DELETE FROM {plan.target} WHERE ({keys}) IN ({self.deleted_keys_sql(plan)})"

    def soft_delete_sql(self, plan: MergePlan) -> str:
        T, S, q = plan.target, plan.staging, plan.q
        keys = ", ".join(q(k) for k in plan.key)
        return (
            f"UPDATE {T} SET ({q(plan.version)}, {q(DELETED)}) = "
            f"(SELECT {S}.{q(plan.version)}, {S}.{q(DELETED)} FROM {S} WHERE {plan.on(S, T)}) "
            f"WHERE ({keys}) IN ({self.deleted_keys_sql(plan)})"
        )

    def merge_statements(self, plan: MergePlan) -> list[str]:
        """What applies the staged rows, in order (after :meth:`count_sql`)."""
        statements = []
        if plan.deletes:
            statements.append(self.soft_delete_sql(plan) if plan.soft_delete else self.delete_sql(plan))
        if plan.new_only:
            cols = ", ".join(plan.q(c) for c in plan.columns)
            statements.append(f"INSERT INTO {plan.target} ({cols}) {self.upsert_source_sql(plan)}")
        else:
            statements.append(
                self.upsert_sql(plan.target, self.upsert_source_sql(plan), plan.columns, plan.key, plan.version, plan.q)
            )
        if plan.deletes:
            statements.append(
                self.upsert_sql(
                    plan.tombstones, self.tombstone_source_sql(plan), plan.tomb_columns, plan.key, plan.version, plan.q
                )
            )
        return statements


def on_conflict_upsert(
    target: str, source: str, columns: list[str], key: list[str], version: str, q, *, and_where: str = ""
) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE``: the upsert PostgreSQL and SQLite share.

    ``source`` must end with a WHERE clause (SQLite's parser needs it before ON CONFLICT);
    ``and_where`` further restricts the update (the stored row is ``t``, the new one ``excluded``).
    """
    v = q(version)
    sets = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in columns if c not in key)
    if not sets:  # every column is in the key (which then holds the version): nothing to update
        return (
            f"INSERT INTO {target} AS t ({', '.join(q(c) for c in columns)}) {source} "
            f"ON CONFLICT ({', '.join(q(k) for k in key)}) DO NOTHING"
        )
    where = f"t.{v} IS NULL OR (excluded.{v} IS NOT NULL AND excluded.{v} >= t.{v})"
    if and_where:
        where = f"({where}) AND {and_where}"
    return (
        f"INSERT INTO {target} AS t ({', '.join(q(c) for c in columns)}) {source} "
        f"ON CONFLICT ({', '.join(q(k) for k in key)}) DO UPDATE SET {sets} WHERE {where}"
    )


def _type_text(sa_type: sa.types.TypeEngine) -> str:
    try:
        return str(sa_type)
    except Exception:  # types that cannot render without a dialect
        return type(sa_type).__name__


_DIALECTS: dict[str, type[ReplicaDialect]] = {}


def register(*names: str):
    def wrap(cls: type[ReplicaDialect]) -> type[ReplicaDialect]:
        for name in names:
            _DIALECTS[name] = cls
        return cls

    return wrap


def dialect_for(engine_name: str) -> ReplicaDialect:
    from . import mssql, mysql, postgresql, sqlite  # noqa: F401  (registration by import)

    try:
        return _DIALECTS[engine_name]()
    except KeyError:
        raise ReplicaError(
            f"unsupported replica engine {engine_name!r}: use sqlite, postgresql, mysql/mariadb or mssql"
        ) from None


# -- Arrow preparation ----------------------------------------------------------------------------


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.ChunkedArray:
    """Element-wise equality where NULL equals NULL (and NaN equals NaN)."""
    if pa.types.is_null(a.type):
        return pc.is_null(a)
    same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
    if pa.types.is_floating(a.type):
        same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(a), pc.is_nan(b)), False))
    return same


def _unique(rows: pa.Table, key: list[str]) -> bool:
    """Whether no key occurs twice in ``rows``. A single integer key is sorted rather than hashed:
    several times faster on a million rows, most of all on a process's first merge."""
    if len(key) == 1 and pa.types.is_integer(rows.schema.field(key[0]).type):
        ordered = pc.take(rows.column(key[0]), pc.sort_indices(rows.column(key[0])))
        return not pc.any(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))).as_py()
    return rows.group_by(key).aggregate([]).num_rows == rows.num_rows


def _chunks(data: Any, rows: int) -> Iterator[pa.Table]:
    if isinstance(data, pa.Table):
        yield data
        return
    if isinstance(data, pa.RecordBatch):
        data = [data]
    pending: list[pa.RecordBatch] = []
    count = 0
    for item in data:
        batches = item.to_batches() if isinstance(item, pa.Table) else [item]
        for batch in batches:
            if pending and batch.schema != pending[0].schema:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
            pending.append(batch)
            count += batch.num_rows
            if count >= rows:
                yield pa.Table.from_batches(pending)
                pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


@dataclass
class _Layout:
    """A validated table layout: stored columns (Arrow types as written), key, version."""

    table: str
    schema: pa.Schema
    key: list[str]
    version: str


def _tomb_columns(columns: list[tuple[str, str, bool]], layout: _Layout) -> list[tuple[str, str, bool]]:
    """The tombstone table's columns: the key's, then the version's (unless the key holds it)."""
    return [c for c in columns if c[0] in layout.key] + [
        c for c in columns if c[0] == layout.version and c[0] not in layout.key
    ]


# -- checksums ------------------------------------------------------------------------------------


def _parse_datetime(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))


def _decimal_canonical(d: decimal.Decimal) -> str:
    if not d.is_finite():
        return str(d)
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def canonical(value: Any, kind: str | None = None, zone: dt.tzinfo | None = None) -> str | None:
    """One text per value whatever the engine returned it as (so source and replica compare).

    Timestamps become UTC ``YYYY-MM-DD HH:MM:SS.ffffff`` (naive ones are taken in ``zone``, default
    as they are), decimals lose trailing zeros, booleans are 1/0, binary is hex.
    """
    if value is None:
        return None
    if kind == "timestamp" or isinstance(value, dt.datetime):
        if isinstance(value, str):
            value = _parse_datetime(value)
        elif not isinstance(value, dt.datetime) and isinstance(value, dt.date):
            value = dt.datetime.combine(value, dt.time())
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        elif zone is not None:
            value = value.replace(tzinfo=zone).astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ", timespec="microseconds")
    if kind == "date" or isinstance(value, dt.date):
        if isinstance(value, str):
            value = _parse_datetime(value)
        if isinstance(value, dt.datetime):
            value = value.date()
        return value.isoformat()
    if isinstance(value, bool):
        return "1" if value else "0"
    if kind == "decimal" or isinstance(value, decimal.Decimal):
        if isinstance(value, float):
            value = decimal.Decimal(repr(value))
        return _decimal_canonical(decimal.Decimal(value) if not isinstance(value, decimal.Decimal) else value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def checksum(rows: Iterable[Sequence[Any]], kinds: Sequence[str | None], zone: dt.tzinfo | None = None) -> tuple[int, str]:
    """(row count, order-independent checksum): the sum of a 128-bit hash per row, modulo 2**128.

    A sum, not an XOR, so a doubled row changes the checksum instead of cancelling out.
    """
    total = count = 0
    for row in rows:
        parts = []
        for value, kind in zip(row, kinds):
            text = canonical(value, kind, zone)
            parts.append("\x00" if text is None else f"{len(text)}:{text}")
        digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()
        total += int.from_bytes(digest, "big")
        count += 1
    return count, f"{total % (1 << 128):032x}"


def _kind_of_family(st: SqlType) -> str | None:
    return st.family if st.family in ("timestamp", "date", "decimal") else None


def _kind_of_sa_type(sa_type: sa.types.TypeEngine) -> str | None:
    if isinstance(sa_type, sa.DateTime) or type(sa_type).__name__.upper() == "DATETIMEOFFSET":
        return "timestamp"
    if isinstance(sa_type, sa.Date):
        return "date"
    if isinstance(sa_type, sa.Numeric) and not isinstance(sa_type, (sa.Float, sa.Integer)):
        return "decimal"
    return None


def _streamed(result: sa.CursorResult, size: int = 10_000, progress: Progress | None = None) -> Iterator[Sequence[Any]]:
    for part in result.partitions(size):
        if progress is not None:
            progress.add(len(part))
        yield from part


def reconcile_source(
    engine_or_connection: sa.Engine | sa.Connection,
    sa_table_or_select: sa.FromClause | sa.Select,
    key: Sequence[str],
    version_column: str | None = None,
    *,
    column_timezone: str | None = None,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """(row count, checksum) of a source table's keys [and versions], comparable with :meth:`Replica.reconcile`.

    Rows are streamed and hashed in Python in bounded memory. ``column_timezone`` is the zone of
    naive source timestamps that the landing converted to UTC (as configured for the copy);
    ``progress`` is told of the rows as they are read.
    """
    source = sa_table_or_select
    if isinstance(source, sa.Select):
        source = source.subquery()
    names = list(key) + ([version_column] if version_column else [])
    try:
        columns = [source.c[n] for n in names]
    except KeyError as exc:
        raise ReplicaError(f"source table has no column {exc.args[0]!r}; it has {list(source.c.keys())}") from None
    kinds = [_kind_of_sa_type(c.type) for c in columns]
    # raw driver values (no SQLAlchemy result processing): SQLite text timestamps are parsed here
    query = sa.select(*[sa.type_coerce(c, sa.types.NullType()).label(f"c{i}") for i, c in enumerate(columns)]).select_from(
        source
    )
    zone = zoneinfo.ZoneInfo(column_timezone) if column_timezone else None

    def run(conn: sa.Connection) -> tuple[int, str]:
        result = conn.execute(query, execution_options={"stream_results": True, "max_row_buffer": 10_000})
        return checksum(_streamed(result, progress=progress), kinds, zone)

    if isinstance(engine_or_connection, sa.Engine):
        with engine_or_connection.connect() as conn:
            return run(conn)
    return run(engine_or_connection)


# -- the replica ----------------------------------------------------------------------------------


#: how long a table ensured for a layout is taken as it was (a merge step ensures it, then
#: merges each landed file into it): a change made to the replica table by hand is seen after it
ENSURED_TTL_SECONDS = 10.0


class Replica:
    """One replica database. Table and column names are used as given (quoted by the dialect)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        retries: int = 3,
        retry_delay: float = 1.0,
        chunk_rows: int = CHUNK_ROWS,
    ):
        parsed = self._setup(url, schema=schema, retries=retries, retry_delay=retry_delay, chunk_rows=chunk_rows)
        try:
            # pre-ping: a pooled connection the server ended while idle is replaced at checkout
            self.engine: sa.Engine | None = sa.create_engine(parsed, pool_pre_ping=True, **self.dialect.engine_kwargs)
        except Exception as exc:  # missing driver, bad options
            raise ReplicaError(f"replica {self.redacted_url}: {scrub(str(exc), url)}") from None
        self.dialect.configure_engine(self.engine)
        self.sql_dialect = self.engine.dialect

    def _setup(self, url: str, *, schema: str | None, retries: int, retry_delay: float, chunk_rows: int) -> sa.URL:
        self.url = url
        self.redacted_url = redact_url(url)
        self.schema = schema
        self.retries = retries
        self.retry_delay = retry_delay
        self.chunk_rows = chunk_rows
        self._prepared = False
        #: tables ensured lately, by table and layout: (when, the table's columns, what was found)
        self._ensured: dict[tuple, tuple[float, tuple[str, ...], SchemaChanges]] = {}
        try:
            parsed = make_url(url)
        except Exception:
            raise ReplicaError(f"not a SQLAlchemy URL for a replica: {self.redacted_url}") from None
        self.dialect = dialect_for(parsed.get_backend_name())
        return parsed

    @classmethod
    def offline(cls, url: str, *, schema: str | None = None) -> Replica:
        """A replica that only builds SQL (never connects): for reviewing or golden-testing the T-SQL etc."""
        self = cls.__new__(cls)
        parsed = self._setup(url, schema=schema, retries=0, retry_delay=0.0, chunk_rows=CHUNK_ROWS)
        self.engine = None
        dialect_cls = parsed.get_dialect()
        try:  # the driver's paramstyle, when it is installed (no connection is made)
            self.sql_dialect = dialect_cls(dbapi=dialect_cls.import_dbapi())  # type: ignore[call-arg]
        except ImportError:  # e.g. pyodbc without the unixODBC library
            self.sql_dialect = dialect_cls(paramstyle=self.dialect.driver_paramstyle)  # type: ignore[call-arg]
        return self

    def __repr__(self) -> str:
        return f"Replica({self.redacted_url!r})"

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()

    # -- names --------------------------------------------------------------------------------
    def _q(self, name: str) -> str:
        """Always quoted, by the dialect's rules; ``%`` is not doubled here (SQLAlchemy's
        ``quote_identifier`` does it for its own compiled SQL), :meth:`_execute` does it when needed."""
        p = self.sql_dialect.identifier_preparer
        quoted = p.quote_identifier(name)
        # the preparer doubles % where the driver's paramstyle needs it: told by what it does
        return quoted.replace("%%", "%") if "%%" in p.quote_identifier("%") else quoted

    def _qualified(self, table: str) -> str:
        return (self._q(self.schema) + "." if self.schema else "") + self._q(table)

    def _error(self, message: str, table: str | None = None, column: str | None = None, *,
               kind: type[ReplicaError] = ReplicaError) -> ReplicaError:
        where = f"replica {self.redacted_url}"
        if table is not None:
            where += f", table {table!r}"
        if column is not None:
            where += f", column {column!r}"
        return kind(f"{where}: {message}")

    def _check_name(self, name: Any, what: str, table: str | None = None) -> None:
        limit = getattr(self.sql_dialect, "max_identifier_length", None) or 128
        if not isinstance(name, str) or not name or "\x00" in name or name != name.strip():
            raise self._error(f"invalid {what} name {name!r}", table)
        if len(name.encode("utf-8")) > limit:
            raise self._error(f"{what} name {name!r} is longer than this engine's {limit}-byte identifier limit", table)

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> sa.Connection:
        """Connect, retrying with exponential backoff; fail naming the replica, never the password."""
        if self.engine is None:
            raise self._error("was built offline and cannot connect")
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            try:
                conn = self.engine.connect()
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                if is_authentication_failure(exc):  # the same credentials will not do better: fail now
                    raise self._error(
                        "authentication failed, check the user and the password its URL takes from the "
                        f"environment: {scrub(str(exc.orig), self.url).strip()}"
                    ) from None
                if attempt == self.retries:
                    raise self._error(
                        f"unreachable after {self.retries + 1} attempt(s): {scrub(str(exc.orig), self.url).strip()}",
                        kind=ReplicaUnavailable,
                    ) from None
                log.warning("replica %s unreachable (attempt %d), retrying in %.1fs", self.redacted_url, attempt + 1, delay)
                time.sleep(delay)
                delay *= 2
            else:
                if not self._prepared:
                    try:
                        self.dialect.prepare(conn)
                    except sa.exc.DBAPIError as exc:
                        conn.close()
                        raise self._error(scrub(str(exc.orig), self.url)) from None
                    self._prepared = True
                return conn
        raise AssertionError("unreachable")

    def _lock_name(self, table: str) -> str:
        return f"incremental_assets replica {self.schema or ''}.{table}"

    @contextmanager
    def _transaction(self, table: str, *, lock: bool = True, read_only: bool = False) -> Iterator[sa.Connection]:
        conn = self._connect()
        name = self._lock_name(table)
        try:
            if read_only:
                conn.execution_options(ia_read_only=True)
            with conn.begin():
                if lock:
                    self.dialect.lock(conn, name)
                try:
                    yield conn
                except BaseException:
                    # what failed may have been the table's shape: the next merge looks at it again
                    self._ensured = {memo: v for memo, v in self._ensured.items() if memo[0] != table}
                    raise
        except sa.exc.DBAPIError as exc:
            raise self._error(scrub(str(exc.orig), self.url).strip(), table) from None
        except TimeoutError as exc:  # waiting for another merge of the table
            raise self._error(str(exc), table) from None
        except UnstorableValue as exc:
            raise self._error(str(exc), table, exc.column) from None
        finally:
            if lock:
                try:
                    self.dialect.unlock(conn, name)
                except Exception:  # noqa: BLE001 - a lock we cannot release must not go back to the pool
                    conn.invalidate()
            conn.close()

    @staticmethod
    def _execute(conn: sa.Connection, sql: str, params: Any = None, **options: Any) -> sa.CursorResult:
        """Run driver-level SQL: identifiers are quoted in it, values only ever bound (``PARAM`` marks them)."""
        if params is None:
            return conn.exec_driver_sql(sql, execution_options={"no_parameters": True, **options})
        if conn.dialect.paramstyle in ("format", "pyformat"):
            sql = sql.replace("%", "%%").replace(PARAM, "%s")
        else:
            sql = sql.replace(PARAM, "?")
        return conn.exec_driver_sql(sql, params, execution_options=options)

    # -- layout -----------------------------------------------------------------------------------
    def _layout(
        self, table: str, arrow_schema: pa.Schema, key: Sequence[str], version_column: str, operation_column: str | None
    ) -> _Layout:
        self._check_name(table, "table")
        self._check_name(table + TOMBSTONE_SUFFIX, "tombstone table", table)
        if isinstance(key, str) or not key:
            raise self._error(f"the merge key must be a non-empty list of column names, not {key!r}", table)
        key = list(key)
        names = [f.name for f in arrow_schema]
        for dup in {n for n in names if names.count(n) > 1}:
            raise self._error("appears more than once in the data", table, dup)
        # names the engine cannot tell apart (MySQL/MariaDB, SQLite, SQL Server ignore case)
        seen: dict[str, str] = {}
        for name in names:
            first = seen.setdefault(self.dialect.name_key(name), name)
            if first != name and operation_column not in (first, name):
                raise self._error(
                    f"columns {first!r} and {name!r} would be one column in this replica (the engine "
                    f"{self.dialect.name_rule}); rename one at the source, or leave one out with the "
                    "table's key 'columns'", table, name)
        for reserved in (DELETED, OP):
            clash = seen.get(self.dialect.name_key(reserved))
            if clash not in (None, reserved, operation_column):
                raise self._error(f"is the replica's own column {reserved!r} on this engine "
                                  f"(the engine {self.dialect.name_rule})", table, clash)
        if len(set(key)) != len(key):
            raise self._error(f"the merge key {key} repeats a column", table)
        for reserved in (DELETED, OP):
            if reserved in names and reserved != operation_column:
                raise self._error("is reserved by the replica (soft-delete flag / staging)", table, reserved)
        for k in key:
            if k not in names:
                raise self._error(f"key column is not in the data; it has {names}", table, k)
        if version_column not in names:
            raise self._error(f"version column is not in the data; it has {names}", table, version_column)
        if operation_column is not None and operation_column in key + [version_column]:
            raise self._error("the operation column cannot be a key or the version column", table, operation_column)
        fields = []
        for f in arrow_schema:
            if f.name == operation_column:
                continue
            self._check_name(f.name, "column", table)
            t = storable(f.type)
            if pa.types.is_list(t) and (not self.dialect.array_columns or pa.types.is_nested(t.value_type)):
                t = pa.string()  # JSON text (see list_json_text)
            if pa.types.is_list(t):
                pass  # an array column
            elif pa.types.is_nested(t) or pa.types.is_union(t) or pa.types.is_map(t):
                raise self._error(f"type {f.type} cannot be stored in a replica column", table, f.name)
            fields.append(pa.field(f.name, t))
        layout = _Layout(table, pa.schema(fields), key, version_column)
        self._column_types(layout)  # every type has a mapping on this engine
        version_type = layout.schema.field(version_column).type
        if not self.dialect.orders_versions_of(version_type):
            raise self._error(f"this engine cannot compare {version_type} versions in order", table, version_column)
        return layout

    def _column_types(self, layout: _Layout) -> list[tuple[str, str, bool]]:
        """(name, DDL type, is key) for each column; text/binary keys share the engine's key budget."""
        schema = layout.schema
        variable = [k for k in layout.key if pa.types.is_string(schema.field(k).type) or pa.types.is_binary(schema.field(k).type)]
        budget = None
        limit = self.dialect.max_key_bytes
        if limit:
            fixed = 16 * (len(layout.key) - len(variable))
            budget = max(16, (limit - fixed) // max(1, len(variable)))
        out = []
        for f in schema:
            is_key = f.name in layout.key
            t = pa.string() if pa.types.is_null(f.type) else f.type
            try:
                type_sql = self.dialect.column_type(t, key_bytes=(budget or 0) if is_key else None)
            except ValueError as exc:
                raise self._error(str(exc), layout.table, f.name) from None
            out.append((f.name, type_sql, is_key))
        return out

    def create_table_sql(self, table: str, arrow_schema: pa.Schema, key: Sequence[str], *, version_column: str) -> list[str]:
        """The DDL :meth:`ensure_table` runs for a missing table and its tombstone table (no server needed)."""
        layout = self._layout(table, arrow_schema, key, version_column, None)
        return self._create_sql(table, layout)

    def _create_sql(self, table: str, layout: _Layout) -> list[str]:
        columns = self._column_types(layout)
        tomb_cols = _tomb_columns(columns, layout)
        return [
            self.dialect.create_table_sql(self._qualified(table), columns, layout.key, self._q),
            self._tombstone_sql(table, tomb_cols, layout.key),
        ]

    def _tombstone_sql(self, table: str, tomb_cols: list[tuple[str, str, bool]], key: list[str]) -> str:
        return self.dialect.create_table_sql(self._qualified(table + TOMBSTONE_SUFFIX), tomb_cols, key, self._q)

    # -- ensure_table -------------------------------------------------------------------------------
    def ensure_table(
        self,
        table: str,
        arrow_schema: pa.Schema,
        key: list[str],
        *,
        version_column: str,
        on_schema_change: Literal["fail", "add_columns"] = "add_columns",
        operation_column: str | None = None,
    ) -> list[str]:
        """Create ``table`` (and ``<table>__deleted``) when missing; else adapt it to the data.

        Returns the columns added; :meth:`adapt_table` tells every change.
        """
        return self.adapt_table(
            table, arrow_schema, key, version_column=version_column, on_schema_change=on_schema_change,
            operation_column=operation_column,
        ).added

    def adapt_table(
        self,
        table: str,
        arrow_schema: pa.Schema,
        key: list[str],
        *,
        version_column: str,
        on_schema_change: Literal["fail", "add_columns"] = "add_columns",
        operation_column: str | None = None,
    ) -> SchemaChanges:
        """Create ``table`` (and ``<table>__deleted``) when missing; else follow the data's shape.

        With ``on_schema_change="add_columns"``: a column new in the data is added; a replica column
        the data lacks (dropped or renamed at the source) is kept, and merges leave it as it is;
        a column whose type cannot hold the data's is widened where the engine can do it without
        loss (int -> bigint, numeric(10,2) -> numeric(12,4)), else the :class:`ReplicaError` gives
        the statement to run. ``"fail"`` refuses any of these changes. A table whose primary key
        is not ``key`` is a :class:`ReplicaError`. ``operation_column`` (if in the schema) is not stored.
        """
        layout = self._layout(table, arrow_schema, key, version_column, operation_column)
        return self._ensure(table, layout, on_schema_change, soft_delete=False)[1]

    def ping(self) -> None:
        """Connect once (:class:`ReplicaError` naming the replica when it cannot: authentication
        refused, or unreachable after the retries)."""
        self._connect().close()

    def check_table(
        self,
        table: str,
        arrow_schema: pa.Schema,
        key: list[str],
        *,
        version_column: str,
        on_schema_change: Literal["fail", "add_columns"] = "add_columns",
        operation_column: str | None = None,
    ) -> str:
        """What :meth:`adapt_table` would find, changing nothing: a :class:`ReplicaError` where it
        would fail (no unique key on ``key``, a type it cannot widen itself, any change with
        ``on_schema_change: fail``), else what it would do, in words."""
        layout = self._layout(table, arrow_schema, key, version_column, operation_column)
        with self._transaction(table, lock=False, read_only=True) as conn:
            columns = self._column_types(layout)
            shape = self.dialect.reflect(conn, self.schema, table)
            if shape is None:
                return "missing: the first merge creates it"
            kept, retyped = self._check_table(table, shape, layout)
        new = [c[0] for c in columns if c[0] not in shape.columns]
        if on_schema_change == "fail" and (new or kept or retyped):
            changed = new + kept + [f.name for f in retyped]
            raise self._error(f"the data has changed shape (column(s) {changed}) and on_schema_change is 'fail'",
                              table, changed[0])
        for f in retyped:
            st = shape.columns[f.name]
            if widened(st, f.type) is None:
                raise self._error(f"has type {st} in the replica, which cannot hold the data's {f.type}: convert "
                                  "the column, or drop the table to have it created again", table, f.name)
            if not self.dialect.alters_types:
                raise self._error(f"has type {st} in the replica, which cannot hold the data's {f.type}; the next "
                                  "merge fails giving the statements that change it", table, f.name)
        said = [f"adds column(s) {new}"] if new else []
        said += [f"widens column(s) {[f.name for f in retyped]}"] if retyped else []
        said += [f"keeps column(s) {kept} the source no longer has"] if kept else []
        return "compatible" + (f"; the next merge {', '.join(said)}" if said else "")

    def _ensure(
        self, table: str, layout: _Layout, on_schema_change: str, *, soft_delete: bool
    ) -> tuple[list[str], SchemaChanges]:
        """Returns (the table's columns, what changed). The same table ensured for the same
        layout moments ago (a merge step's :meth:`adapt_table`, then its :meth:`merge` of each
        file) is not reflected again: see :data:`ENSURED_TTL_SECONDS`; it is then as it was, unchanged."""
        if on_schema_change not in ("fail", "add_columns"):
            raise self._error(f"on_schema_change must be 'fail' or 'add_columns', not {on_schema_change!r}", table)
        memo = (table, layout.schema, tuple(layout.key), layout.version, on_schema_change, soft_delete)
        ensured = self._ensured.get(memo)
        if ensured is not None and time.monotonic() - ensured[0] < ENSURED_TTL_SECONDS:
            _, columns, seen = ensured
            return list(columns), SchemaChanges(kept=list(seen.kept), columns=dict(seen.columns))
        existing, changes = self._ensure_now(table, layout, on_schema_change, soft_delete=soft_delete)
        if changes.created or changes.added or changes.widened:
            # the table changed: what was ensured for other layouts is out of date
            self._ensured = {m: v for m, v in self._ensured.items() if m[0] != table}
        self._ensured[memo] = (time.monotonic(), tuple(existing), changes)
        return existing, changes

    def _ensure_now(
        self, table: str, layout: _Layout, on_schema_change: str, *, soft_delete: bool
    ) -> tuple[list[str], SchemaChanges]:
        q, T = self._q, self._qualified(table)
        changes = SchemaChanges()
        with self._transaction(table) as conn:
            columns = self._column_types(layout)  # after connecting: types may depend on the server
            shape = self.dialect.reflect(conn, self.schema, table)
            if shape is None:
                self._execute(conn, self.dialect.create_table_sql(T, columns, layout.key, q))
                existing = [c[0] for c in columns]
                changes.created = True
                log.info("replica %s: created table %r", self.redacted_url, table)
            else:
                kept, retyped = self._check_table(table, shape, layout)
                new = [c for c in columns if c[0] not in shape.columns]
                if on_schema_change == "fail" and (new or kept or retyped):
                    what = [f"new column(s) {[c[0] for c in new]}"] if new else []
                    what += [f"lacks column(s) {kept} of the replica table"] if kept else []
                    what += [f"column(s) {[f.name for f in retyped]} of a type the replica's cannot hold"] if retyped else []
                    raise self._error(
                        f"the data has changed shape ({'; '.join(what)}) and on_schema_change is 'fail'", table,
                        (new[0][0] if new else kept[0] if kept else retyped[0].name),
                    )
                tombstones = self._qualified(table + TOMBSTONE_SUFFIX)
                for f in retyped:
                    companion = tombstones if f.name in layout.key or f.name == layout.version else None
                    changes.widened[f.name] = self._widen(conn, table, T, f, shape.columns[f.name], f.name in layout.key,
                                                          companion=companion)
                for name, type_sql, _ in new:
                    self._execute(conn, self.dialect.add_column_sql(T, q(name), type_sql))
                    changes.added.append(name)
                    log.info("replica %s: added column %r to table %r", self.redacted_url, name, table)
                changes.kept = kept
                existing = list(shape.columns) + changes.added
            if soft_delete and DELETED not in existing:
                self._execute(conn, self.dialect.add_column_sql(T, q(DELETED), self.dialect.flag_column_sql))
                existing.append(DELETED)
                changes.added.append(DELETED)
            self._ensure_tombstones(conn, table, layout, columns)
            if changes.widened or changes.created or changes.added:
                shape = self.dialect.reflect(conn, self.schema, table)
            changes.columns = {c: str(st) for c, st in shape.columns.items()} if shape is not None else {}
        return existing, changes

    def _check_table(self, table: str, shape: TableShape, layout: _Layout) -> tuple[list[str], list[pa.Field]]:
        """Refuses a table whose key is not the merge key; returns its columns the data lacks, and
        the data's columns whose replica type cannot hold them."""
        for k in layout.key:
            if k not in shape.columns:
                raise self._error("the merge key column is missing from the replica table", table, k)
        if frozenset(layout.key) not in shape.unique_keys:
            raise self._error(
                f"the replica table has no primary key or unique index on the merge key {layout.key} "
                f"(its primary key is {shape.primary_key or 'missing'})",
                table,
                layout.key[0],
            )
        names = set(layout.schema.names)
        kept = [name for name in shape.columns if name not in names and name != DELETED]
        retyped = [f for f in layout.schema if f.name in shape.columns and not fits(f.type, shape.columns[f.name])]
        flag = shape.columns.get(DELETED)
        if flag is not None and flag.family not in ("bool", "int"):
            raise self._error(f"the soft-delete flag has type {flag}, not boolean", table, DELETED)
        return kept, retyped

    def _widen(
        self, conn: sa.Connection, table: str, name: str, f: pa.Field, st: SqlType, is_key: bool, *,
        companion: str | None = None,
    ) -> str:
        """Change column ``f.name`` of ``name`` (of type ``st``) to a type that holds its values and
        the data's, where the engine does it without loss; else fail giving the statement to run,
        and the one for the same column of ``companion`` (the tombstone table, for a key or
        version column). Returns ``"old -> new"``."""
        column = self._q(f.name)
        target = widened(st, f.type)
        using, zone_change = None, False
        if target is None and pa.types.is_timestamp(f.type) and st.family == "timestamp" and f.type.tz is not None:
            # wall-clock values to instants: which zone they were in is the user's to say, unless none is stored
            target, using, zone_change = f.type, self.dialect.utc_instants_sql(column), True
        sql = type_sql = None
        if target is not None:
            try:
                type_sql = self.dialect.column_type(target, key_bytes=(self.dialect.max_key_bytes or 0) if is_key else None)
            except ValueError:
                type_sql = None
            if type_sql is not None:
                sql = self.dialect.alter_type_sql(name, column, type_sql, not_null=is_key, using=using)
        if sql is not None and self.dialect.alters_types and (not zone_change or self._all_null(conn, name, column)):
            self._execute(conn, sql)
            log.warning("replica %s: table %r: widened column %r from %s to %s", self.redacted_url, table, f.name, st, type_sql)
            return f"{st} -> {type_sql}"
        why = f"has type {st} in the replica, which cannot hold the data's {f.type}"
        if sql is None:
            raise self._error(
                f"{why}; this engine cannot change it in place: convert the column, or drop the table to have it "
                "created again (and merge every window again)", table, f.name)
        if zone_change:
            why += (" (its values hold no time zone: the statement reads them as UTC; if they were wall-clock times "
                    "of another zone, name that zone in it instead)")
        if companion is not None and type_sql is not None:
            sql += "; " + (self.dialect.alter_type_sql(companion, column, type_sql, not_null=is_key, using=using) or "")
        raise self._error(f"{why}; change it by running: {sql}", table, f.name)

    def _all_null(self, conn: sa.Connection, name: str, column: str) -> bool:
        return self._execute(conn, f"SELECT COUNT(*) FROM {name} WHERE {column} IS NOT NULL").scalar() == 0

    def _ensure_tombstones(self, conn: sa.Connection, table: str, layout: _Layout, columns) -> None:
        name = table + TOMBSTONE_SUFFIX
        tomb_cols = _tomb_columns(columns, layout)
        shape = self.dialect.reflect(conn, self.schema, name)
        if shape is None:
            self._execute(conn, self._tombstone_sql(table, tomb_cols, layout.key))
            return
        for col in layout.key + [layout.version]:
            st = shape.columns.get(col)
            if st is None:
                raise self._error("is missing from the tombstone table (key or version changed?)", name, col)
            if not fits(layout.schema.field(col).type, st):  # widened in the table just before
                self._widen(conn, name, self._qualified(name), layout.schema.field(col), st, col in layout.key)
        if frozenset(layout.key) not in shape.unique_keys:
            raise self._error(f"the tombstone table's primary key is {shape.primary_key}, not {layout.key}", name)

    # -- merge ------------------------------------------------------------------------------------
    def _plan(self, table: str, layout: _Layout, table_columns: list[str], *, deletes: bool, soft_delete: bool, staging: str) -> MergePlan:
        flag = DELETED in table_columns
        columns = list(layout.schema.names) + ([DELETED] if flag else [])
        return MergePlan(
            table=table,
            target=self._qualified(table),
            tombstones=self._qualified(table + TOMBSTONE_SUFFIX),
            staging=self._q(staging),
            staging_index=staging.lstrip("#") + "_key",
            columns=columns,
            key=layout.key,
            version=layout.version,
            deletes=deletes,
            soft_delete=soft_delete,
            flag=flag,
            q=self._q,
        )

    def merge_sql(
        self,
        table: str,
        arrow_schema: pa.Schema,
        key: list[str],
        *,
        version_column: str,
        operation_column: str | None = None,
        soft_delete: bool = False,
        staging: str = "",
    ) -> list[str]:
        """The statements one merge runs, in order (no server needed): staging DDL, the staging insert
        (for executemany engines), the count query, the apply statements, the staging drop."""
        layout = self._layout(table, arrow_schema, key, version_column, operation_column)
        names = list(layout.schema.names) + ([DELETED] if soft_delete else [])
        plan = self._plan(
            table, layout, names, deletes=operation_column is not None, soft_delete=soft_delete,
            staging=self.dialect.staging_name(staging),
        )
        marker = "?" if self.sql_dialect.paramstyle == "qmark" else "%s"
        return [
            *self.dialect.create_staging_sql(plan),
            self.dialect.insert_staging_sql(plan).replace(PARAM, marker),
            self.dialect.count_sql(plan),
            *self.dialect.merge_statements(plan),
            self.dialect.drop_staging_sql(plan),
        ]

    def merge(
        self,
        table: str,
        data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch],
        key: list[str],
        *,
        version_column: str,
        operation_column: str | None = None,
        soft_delete: bool = False,
        on_schema_change: Literal["fail", "add_columns"] = "add_columns",
    ) -> MergeResult:
        """Upsert ``data`` into ``table`` by ``key``, last writer wins by ``version_column``; one transaction.

        ``operation_column`` holds I/U/D per row (change tracking): D deletes the key (or flags it
        ``_deleted`` with ``soft_delete``) and leaves a tombstone; it is not stored. The table is
        created or extended first, in a transaction of its own (DDL commits implicitly on MySQL;
        see :meth:`ensure_table`). A stream of batches is merged in steps of ``chunk_rows``
        rows (bounded memory), all in the one transaction; duplicate keys are collapsed per step.
        """
        started = time.perf_counter()
        chunks = _chunks(data, self.chunk_rows)
        try:
            first = next(chunks, None)
        except pa.ArrowInvalid as exc:
            raise self._error(f"the data's batches do not share one schema: {exc}", table) from None
        if first is None:
            return MergeResult(seconds=time.perf_counter() - started)
        if operation_column is not None and operation_column not in first.column_names:
            raise self._error(f"operation column is not in the data; it has {first.column_names}", table, operation_column)
        layout = self._layout(table, first.schema, key, version_column, operation_column)
        table_columns, changes = self._ensure(table, layout, on_schema_change, soft_delete=soft_delete)
        result = MergeResult(added_columns=changes.added, widened_columns=changes.widened, kept_columns=changes.kept)
        plan = self._plan(
            table, layout, table_columns, deletes=operation_column is not None, soft_delete=soft_delete,
            staging=self.dialect.staging_name(uuid.uuid4().hex[:12]),
        )
        with self.dialect.side_staging(self, table) as side, self._transaction(table) as conn:
            self.dialect.begin_merge(conn)
            for sql in self.dialect.create_staging_sql(plan):
                self._execute(conn, sql)
            staging_loaded = False
            for chunk in itertools.chain([first], chunks):
                staged = self._stage(table, chunk, layout, plan, operation_column)
                if staged.num_rows == 0:
                    continue
                if staging_loaded:
                    self._execute(conn, self.dialect.clear_staging_sql(plan))
                if not plan.deletes:
                    # e.g. an initial load: nothing to compare with, a plain insert is ~2x faster than an upsert
                    loaded = self.dialect.insert_if_new(conn, plan, staged, self._execute)
                    if loaded is not None:
                        staging_loaded = loaded
                        result.inserted += staged.num_rows
                        continue
                side_table = None if side is None else side.load(conn, staged, self._execute)
                if side_table is None:
                    self.dialect.load_staging(conn, plan, staged, self._execute)
                    staging_loaded = True
                step = plan if side_table is None else dataclasses.replace(plan, staging=side_table)
                self.dialect.before_step(conn, step, staged.num_rows, self._execute)
                counts = self._execute(conn, self.dialect.count_sql(step)).one()
                _, inserted, updated, unchanged, deleted, skipped, matched = (int(v or 0) for v in counts)
                # older or unchanged rows among the stored keys: leave them out of the upsert
                step_plan = dataclasses.replace(step, new_only=matched == 0, filter_older=matched > updated)
                for sql in self.dialect.merge_statements(step_plan):
                    self._execute(conn, sql)
                result.inserted += inserted
                result.updated += updated
                result.unchanged += unchanged
                result.deleted += deleted
                result.skipped_older += skipped
            for sql in [] if side is None else side.drop_sql():
                self._execute(conn, sql)
            self._execute(conn, self.dialect.drop_staging_sql(plan))
        result.seconds = time.perf_counter() - started
        log.info(
            "replica %s: merged into %r: %d inserted, %d updated, %d unchanged, %d deleted, %d skipped as older in %.2fs",
            self.redacted_url, table, result.inserted, result.updated, result.unchanged, result.deleted,
            result.skipped_older, result.seconds,
        )
        return result

    def _stage(self, table: str, chunk: pa.Table, layout: _Layout, plan: MergePlan, operation_column: str | None) -> pa.Table:
        """The chunk as staged: cast to the layout's types, validated, duplicates collapsed, + flag/OP columns."""
        expected = set(layout.schema.names) | ({operation_column} if operation_column else set())
        extra = [c for c in chunk.column_names if c not in expected]
        if extra:
            raise self._error(f"a batch has column(s) {extra} that the first batch did not have", table, extra[0])
        arrays: dict[str, pa.ChunkedArray] = {}
        for f in layout.schema:
            if f.name not in chunk.column_names:
                raise self._error("is missing from a batch of the data", table, f.name)
            column = chunk.column(f.name)
            if pa.types.is_dictionary(column.type):
                column = pc.cast(column, column.type.value_type)
            if pa.types.is_string(f.type) and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
                column = list_json_text(column)  # no array columns on this engine
            try:
                arrays[f.name] = column.cast(f.type) if column.type != f.type else column
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise self._error(f"cannot store {column.type} values as {f.type}: {exc}", table, f.name) from None
        for k in layout.key:
            if arrays[k].null_count:
                raise self._error(f"{arrays[k].null_count} row(s) have a NULL key", table, k)
        is_delete = None
        if operation_column is not None:
            is_delete = self._deletes(table, chunk.column(operation_column), operation_column)
            bad = pc.sum(pc.and_(is_delete, pc.is_null(arrays[layout.version]))).as_py()
            if bad:
                raise self._error(f"{bad} delete row(s) have a NULL version", table, layout.version)
        staged = pa.table({**arrays, **({OP: is_delete} if is_delete is not None else {})})
        staged = self._collapse(table, staged.combine_chunks(), layout)
        columns = [staged.column(c) for c in layout.schema.names]
        names = list(layout.schema.names)
        if plan.flag:
            flag = staged.column(OP) if (is_delete is not None and plan.soft_delete) else pa.chunked_array(
                [pa.array([False] * staged.num_rows, pa.bool_())]
            )
            columns.append(flag)
            names.append(DELETED)
        if is_delete is not None:
            columns.append(pc.cast(staged.column(OP), pa.int16()))
            names.append(OP)
        return pa.table(columns, names=names)

    def _deletes(self, table: str, column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
        try:
            text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise self._error(f"operation column of type {column.type} must hold I, U or D", table, name) from None
        ops = pc.utf8_upper(pc.utf8_trim_whitespace(text))
        valid = pc.fill_null(pc.is_in(ops, value_set=pa.array(["I", "U", "D"])), False)
        if not pc.all(valid).as_py():
            first = pc.index(valid, False).as_py()
            raise self._error(f"operation {text[first].as_py()!r} is not I, U or D", table, name)
        return pc.equal(ops, "D")

    def _collapse(self, table: str, rows: pa.Table, layout: _Layout) -> pa.Table:
        """One row per key: the highest version; equal versions must carry equal values."""
        n = rows.num_rows
        if n < 2 or _unique(rows, layout.key):
            return rows
        keys = [(k, "ascending") for k in layout.key] + [(layout.version, "descending")]
        if _ARROW_MAJOR >= 25:  # NULL versions last: the highest real version wins
            order = pc.sort_indices(rows, sort_keys=[(*k, "at_end") for k in keys])
        else:
            order = pc.sort_indices(rows, sort_keys=keys, null_placement="at_end")
        rows = rows.take(order)
        same_key = None
        for k in layout.key:
            col = rows.column(k)
            eq = pc.equal(col.slice(1), col.slice(0, n - 1))
            same_key = eq if same_key is None else pc.and_(same_key, eq)
        version = rows.column(layout.version)
        tie = pc.and_(same_key, _same(version.slice(1), version.slice(0, n - 1)))
        if pc.any(tie).as_py():
            for name in rows.column_names:
                if name in layout.key or name == layout.version:
                    continue
                col = rows.column(name)
                clash = pc.and_(tie, pc.invert(_same(col.slice(1), col.slice(0, n - 1))))
                if pc.any(clash).as_py():
                    i = pc.index(clash, True).as_py() + 1
                    key = {k: rows.column(k)[i].as_py() for k in layout.key}
                    what = "operation" if name == OP else f"column {name!r}"
                    raise self._error(
                        f"key {key} is not unique in the source: two rows have version "
                        f"{rows.column(layout.version)[i].as_py()!r} and different values in {what}",
                        table,
                    )
        keep = pa.concat_arrays([pa.array([True]), pc.invert(same_key).combine_chunks()])
        return rows.filter(keep)

    # -- full snapshots -------------------------------------------------------------------------
    def delete_older_than(
        self, table: str, key: list[str], *, version_column: str, version: Any, soft_delete: bool = False
    ) -> int:
        """After merging a full snapshot taken at ``version``: rows still older than it were deleted
        at the source meanwhile. Remove them (or flag them ``_deleted``), leaving tombstones at
        ``version`` so a replayed older insert cannot bring them back. Returns the rows affected."""
        with self._transaction(table) as conn:
            target = sa.Table(table, sa.MetaData(), schema=self.schema, autoload_with=conn)
            tombs = sa.Table(table + TOMBSTONE_SUFFIX, sa.MetaData(), schema=self.schema, autoload_with=conn)
            v = target.c[version_column]
            stale = v < sa.bindparam("v", version, type_=v.type)
            if soft_delete:
                stale = sa.and_(stale, target.c["_deleted"].is_(sa.false()))
            same_key = sa.and_(*(tombs.c[k] == target.c[k] for k in key))
            conn.execute(sa.delete(tombs).where(sa.exists().where(same_key, stale)))
            if version_column in key:  # the version is the key's: each tombstone keeps its row's
                tomb_select = sa.select(*(target.c[k] for k in key)).where(stale)
                conn.execute(sa.insert(tombs).from_select(list(key), tomb_select))
            else:
                conn.execute(
                    sa.insert(tombs).from_select(
                        [*key, version_column],
                        sa.select(*(target.c[k] for k in key), sa.bindparam("v2", version, type_=v.type)).where(stale),
                    )
                )
            if soft_delete:
                result = conn.execute(sa.update(target).where(stale).values({"_deleted": True}))
            else:
                result = conn.execute(sa.delete(target).where(stale))
            return result.rowcount or 0

    # -- reconcile --------------------------------------------------------------------------------
    def reconcile(self, table: str, key: list[str], version_column: str | None = None, *,
                  progress: Progress | None = None) -> tuple[int, str]:
        """(row count, checksum) of the replica table's keys [and versions], soft-deleted rows excluded.

        Equal to :func:`reconcile_source` on the source table when the two are in sync.
        """
        self._check_name(table, "table")
        names = list(key) + ([version_column] if version_column else [])
        with self._transaction(table, lock=False, read_only=True) as conn:
            shape = self.dialect.reflect(conn, self.schema, table)
            if shape is None:
                raise self._error("does not exist in the replica", table)
            for name in names:
                if name not in shape.columns:
                    raise self._error(f"is not in the replica table; it has {list(shape.columns)}", table, name)
            kinds = [_kind_of_family(shape.columns[n]) for n in names]
            sql = f"SELECT {', '.join(self._q(n) for n in names)} FROM {self._qualified(table)}"
            params = None
            if DELETED in shape.columns:
                sql += f" WHERE {self._q(DELETED)} IS NULL OR {self._q(DELETED)} = {PARAM}"
                params = (False,)
            result = self._execute(conn, sql, params, stream_results=True, max_row_buffer=10_000)
            return checksum(_streamed(result, progress=progress), kinds)
